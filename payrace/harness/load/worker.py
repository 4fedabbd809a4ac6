"""What every Locust process needs, a worker above all: light enough for a load machine.

    ENV_*            the PAYRACE_* variables `payrace load` (or a user, by hand) sets
    LoadSettings     those variables read back; target_profile(): the profile the requests are
                     shaped by and the oracle watches through (PAYRACE_PROFILE, else the
                     reference service's)
    LoadTally        one Locust process's samples since its last report: HDR histograms,
                     request counts, the payments it created, the captures it was told of
                     and the setup mistakes it saw; drain() is what a worker ships to the
                     master in Locust's own reports
    keep(), keep_setup_error()   the capped example lists, also used by the master's merge
    SPREAD           the histogram kind of the arrival spread
    worker_recipe()  how a load machine joins a master: the light install and `locust --worker`
                     (`payrace load --worker-command` prints it)

Split from load.gate, the master's side (the oracle in PostgreSQL, the checkers, the reports),
so that the locustfiles run on a machine with nothing but Locust and hdrhistogram installed
and payrace's code on the path: this module and what it imports use only the standard library,
hdrhistogram and payrace's own light modules (model.profile, model.stats, model.answers,
gateway.signing, infra.env). tests/harness/load/test_worker.py holds it to that, in a
virtualenv with only Locust and hdrhistogram.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from payrace.harness.infra.env import TARGET_DSN
from payrace.harness.infra.env import read as read_setting
from payrace.harness.model.answers import is_crash
from payrace.harness.model.profile import Profile
from payrace.harness.model.stats import PathHistograms
from payrace.redact import redact

if TYPE_CHECKING:
    from payrace.harness.model.gates import Baseline, Gate

# libpq URL of the target's database, where the gate's oracle watches (the service's own
# database, not a server to create one on; PAYRACE_DATABASE_URL is read for one more release).
ENV_TARGET_DSN = TARGET_DSN
ENV_GATEWAY_URL = "PAYRACE_GATEWAY_URL"  # the fake Razorpay (authorize payments, counters)
ENV_REPORT_DIR = "PAYRACE_REPORT_DIR"
ENV_RUN_ID = "PAYRACE_RUN_ID"
ENV_COMMAND = "PAYRACE_COMMAND"
ENV_SEED = "PAYRACE_SEED"
ENV_PROFILE = "PAYRACE_PROFILE"  # a running target's profile (TOML path); unset: the reference
ENV_EXPECT = "PAYRACE_EXPECT"  # valid | violated, what the target is declared to be
ENV_SETTLE_S = "PAYRACE_SETTLE_S"  # how long the oracle may wait for the deadlock count
ENV_GATES = "PAYRACE_GATES"  # `payrace load --gate` expressions, one per line
ENV_BASELINE = "PAYRACE_BASELINE"  # the summary '*baseline' gates compare with (--baseline)

# A running target keeps its pool open, so its idle backends flush their deadlock counts only
# after PGSTAT_IDLE_INTERVAL: the oracle waits that out once (as runner.config's
# EXTERNAL_SETTLE_S for `payrace run --target URL`; a test keeps the two equal).
RUNNING_TARGET_SETTLE_S = 15.0
# payrace load stops the reference service before its final reading (settle_deadlocks).
_STARTED_SETTLE_S = 2.0
_SETUP_ERRORS_KEPT = 3

# 5xx answers kept as examples, per kind (crash or handled fault), per report and on the
# master; the counts are always complete.
_EXAMPLES_KEPT = 25


def keep_setup_error(kept: list[str], message: str) -> None:
    if message not in kept and len(kept) < _SETUP_ERRORS_KEPT:
        kept.append(message)


def keep(examples: list[list[Any]], entry: list[Any]) -> None:
    """Append [f, status, code, payment] unless _EXAMPLES_KEPT of its kind are there: a flood
    of handled faults must not crowd out the one crash that decides the gate."""
    crash = is_crash(entry[1], entry[2])
    if sum(is_crash(e[1], e[2]) == crash for e in examples) < _EXAMPLES_KEPT:
        examples.append(entry)


# Histogram kind of the arrival spread: how far apart the service received the requests of
# one race that were released together (its own X-Payrace-Received-At stamps).
SPREAD = "arrival_spread"


# -- settings handed to Locust ------------------------------------------------------------


@dataclass(frozen=True)
class LoadSettings:
    gateway_url: str | None
    database_url: str | None
    report_dir: Path
    run_id: str
    command: str
    seed: int | None
    profile: Path | None = None  # None: the reference service, which payrace load started
    expect: str | None = None
    settle_s: float | None = None
    gates: tuple[str, ...] = ()  # gate expressions (model.gates), judged at the end
    baseline: Path | None = None  # what '*baseline' gates compare with

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> LoadSettings:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run_id = env.get(ENV_RUN_ID) or f"{stamp}-locust"
        seed = env.get(ENV_SEED)
        try:
            settle_s: float | None = float(env.get(ENV_SETTLE_S) or "")
        except ValueError:  # unset, or not a number: the default for the target
            settle_s = None
        return cls(
            gateway_url=(env.get(ENV_GATEWAY_URL) or "").rstrip("/") or None,
            database_url=read_setting(ENV_TARGET_DSN, env) or None,
            report_dir=Path(env.get(ENV_REPORT_DIR) or Path("reports") / run_id),
            run_id=run_id,
            command=redact(env.get(ENV_COMMAND) or shlex.join(["locust", *sys.argv[1:]])),
            seed=int(seed) if seed and seed.lstrip("-").isdigit() else None,
            profile=Path(env[ENV_PROFILE]) if env.get(ENV_PROFILE) else None,
            expect=env.get(ENV_EXPECT) or None,
            settle_s=settle_s,
            gates=tuple(g.strip() for g in (env.get(ENV_GATES) or "").splitlines() if g.strip()),
            baseline=Path(env[ENV_BASELINE]) if env.get(ENV_BASELINE) else None,
        )

    def judged_gates(self) -> tuple[list[Gate], Baseline | None]:
        """The gates and their baseline; a mistake in them is a UsageError (payrace load
        checks them before Locust starts; set by hand, they are checked here)."""
        from payrace.harness.model.gates import Baseline, Gate  # the master's: not on workers

        gates = [Gate.parse(expr) for expr in self.gates]
        baseline = Baseline.load(self.baseline) if self.baseline is not None else None
        return gates, baseline

    def target_profile(self) -> Profile:
        """The profile every Locust process shapes its requests by and the gate watches
        through; read once per process. A mistake in it is a UsageError."""
        cached: Profile | None = self.__dict__.get("_profile")
        if cached is None:
            cached = Profile.load(self.profile) if self.profile else Profile.reference()
            object.__setattr__(self, "_profile", cached)  # frozen: a cache, not a setting
        return cached

    def settle_timeout_s(self) -> float:
        if self.settle_s is not None:
            return self.settle_s
        return RUNNING_TARGET_SETTLE_S if self.profile else _STARTED_SETTLE_S

    def to_env(self) -> dict[str, str]:
        env = {
            ENV_REPORT_DIR: str(self.report_dir),
            ENV_RUN_ID: self.run_id,
            ENV_COMMAND: self.command,
        }
        if self.gateway_url:
            env[ENV_GATEWAY_URL] = self.gateway_url
        if self.database_url:
            env[ENV_TARGET_DSN] = self.database_url
        if self.seed is not None:
            env[ENV_SEED] = str(self.seed)
        if self.profile is not None:
            # Absolute: Locust's workers may start in another directory.
            env[ENV_PROFILE] = str(self.profile.resolve())
        if self.expect:
            env[ENV_EXPECT] = self.expect
        if self.settle_s is not None:
            env[ENV_SETTLE_S] = f"{self.settle_s:g}"
        if self.gates:
            env[ENV_GATES] = "\n".join(self.gates)
        if self.baseline is not None:
            env[ENV_BASELINE] = str(self.baseline.resolve())
        return env


# -- what workers send, what the master keeps ---------------------------------------------


@dataclass
class LoadTally:
    """One Locust process's samples since its last report; drain() hands them over."""

    hist: PathHistograms = field(default_factory=PathHistograms)
    requests: int = 0
    failures: int = 0
    payments: list[list[Any]] = field(default_factory=list)  # [payment id, gateway id | None]
    confirmed: list[list[Any]] = field(default_factory=list)  # [payment id, f, event | None]
    answered: int = 0  # answers from the target (the fake gateway's are not counted)
    server_errors: int = 0  # of which 5xx
    crashes: int = 0  # of which a 500, or a 5xx without a deliberate error code
    server_error_examples: list[list[Any]] = field(default_factory=list)  # [f, status, code, pid]
    setup_errors: list[str] = field(default_factory=list)  # what to fix before any race counts
    conflicts: int = 0  # answers 409 (a lock not taken, a serialisation failure given up on)
    # Attempts the target aborted and re-ran itself, as its Server-Timing says (40001, 40P01).
    serialization_failures: int = 0
    deadlocks_retried: int = 0
    _confirmed_ids: set[int] = field(default_factory=set)

    def request(self, failed: bool) -> None:
        self.requests += 1
        self.failures += failed

    def answer(self, f: str, status: int, code: str | None, payment_id: int | None) -> None:
        """The target answered `f` with `status`; a 5xx is kept for the gate's no_5xx."""
        self.answered += 1
        self.conflicts += status == 409
        if status >= 500:
            self.server_errors += 1
            self.crashes += is_crash(status, code)
            keep(self.server_error_examples, [f, status, code, payment_id])

    def timing(self, kind: str, path: str, ms: float) -> None:
        if ms >= 0:
            self.hist.record(kind, path, ms)

    def aborted(self, timings: dict[str, float]) -> None:
        """The attempts the target re-ran for one answer (Server-Timing `serialization`,
        `deadlock`: counts, not durations)."""
        self.serialization_failures += int(timings.get("serialization", 0))
        self.deadlocks_retried += int(timings.get("deadlock", 0))

    def setup(self, message: str) -> None:
        """A setup mistake was seen; the first few distinct ones are enough to fix it."""
        keep_setup_error(self.setup_errors, message)

    def payment(self, payment_id: int, gateway_payment_id: str | None) -> None:
        self.payments.append([payment_id, gateway_payment_id])

    def confirm(self, payment_id: int, f: str, event: str | None) -> None:
        """The target said this payment is captured; the first word per payment is enough."""
        if payment_id not in self._confirmed_ids:
            self._confirmed_ids.add(payment_id)
            self.confirmed.append([payment_id, f, event])

    def drain(self) -> dict[str, Any]:
        data = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "requests": self.requests,
            "failures": self.failures,
            "payments": self.payments,
            "confirmed": self.confirmed,
            "answered": self.answered,
            "server_errors": self.server_errors,
            "crashes": self.crashes,
            "server_error_examples": self.server_error_examples,
            "setup_errors": self.setup_errors,
            "conflicts": self.conflicts,
            "serialization_failures": self.serialization_failures,
            "deadlocks_retried": self.deadlocks_retried,
            "hdr": self.hist.encode(),
        }
        self.hist = PathHistograms()
        self.requests = self.failures = self.answered = self.server_errors = self.crashes = 0
        self.conflicts = self.serialization_failures = self.deadlocks_retried = 0
        self.payments, self.confirmed, self.server_error_examples = [], [], []
        self.setup_errors = []
        # _confirmed_ids stays: a later answer about the same payment is not news.
        return data


# -- how a load machine joins -------------------------------------------------------------

REQUIREMENTS = Path(__file__).resolve().parents[2] / "locustfiles" / "requirements-worker.txt"


def worker_recipe(
    locustfiles: Sequence[Path],
    *,
    gateway_url: str | None,
    profile: Path | None,
    master_host: str = "MASTER_HOST",
) -> str:
    """Shell lines that make a machine with Python a light Locust worker of this run."""
    pins = [
        line.strip()
        for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # Paths inside a checkout of payrace on the load machine (its PYTHONPATH).
    files = ",".join(
        f"$PAYRACE_CHECKOUT/payrace/locustfiles/{f.name}"
        if f.parent.resolve() == REQUIREMENTS.parent
        else str(f)
        for f in locustfiles
    )
    variables = [f"{ENV_GATEWAY_URL}={shlex.quote(gateway_url or 'http://GATEWAY_HOST:9411')}"]
    if profile is not None:
        variables.append(f"{ENV_PROFILE}={shlex.quote(str(profile))}")
    lines = [
        "# on each load machine: Locust, hdrhistogram and payrace's code, none of its stack",
        "python -m venv payrace-worker && . payrace-worker/bin/activate",
        f"pip install {' '.join(shlex.quote(p) for p in pins)}",
        "export PAYRACE_CHECKOUT=/path/to/payrace   # a checkout of payrace's repository",
        'export PYTHONPATH="$PAYRACE_CHECKOUT"',
    ]
    if profile is not None:
        lines.append(
            f"# the profile at {profile} on that machine, and every variable its [keys] "
            "name with *_env, set as on the master"
        )
    lines.append(
        f'{" ".join(variables)} locust -f "{files}" --worker --master-host {master_host} '
        "--processes -1"
    )
    return "\n".join(lines)
