"""What a run is asked to do, checked before anything starts.

Mode, MODES    forced | aligned | jitter (how a race is forced; see runner.trials)
Force, FORCES  locks | pause: what holds the requests in forced mode (runner.forcing: the
               harness's own row locks and gateway holds; pause: the target's pause points)
Gate           `[strategy:]metric<=threshold` (model.gates: a number, K*other_metric or
               K*baseline), checked against the run's strategies and --baseline in validate()
RunConfig      strategies, trials, mode, target, seed, gates, nemesis, ...; validate()
               raises UsageError (exit 2) before anything is provisioned
oracle_config  the oracle's view of the target's schema (the target profile's [oracle])

A run races one target profile (model.profile): the reference service's own, or a team's
(`--profile`), whose base URL makes it a running target.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from payrace.harness.errors import UsageError
from payrace.harness.model import watched
from payrace.harness.model.gates import Baseline, check_gates
from payrace.harness.model.gates import Gate as Gate  # where the CLI and plugin import it
from payrace.harness.model.generator import MAX_WEBHOOKS
from payrace.harness.model.nemesis import NemesisSpecError, parse_spec, unfit
from payrace.harness.model.profile import Profile
from payrace.postgres import normalise_isolation

# --jitter-ms and --hold-ms: a minute is far past any lock wait worth racing, and keeps a
# typo (an extra zero or three) from parking a run for hours.
MAX_OFFSET_MS = 60_000.0

# PostgreSQL 15+ flushes an idle backend's deadlock count within 10 s (PGSTAT_IDLE_INTERVAL);
# a pooled target's idle connections have flushed once they sat idle 11 s (model.oracle).
EXTERNAL_SETTLE_S = 15.0
# A customer reloads a failed return page a few times, not forever.
MAX_CALLBACK_RELOADS = 10

Mode = Literal["forced", "aligned", "jitter"]
MODES: tuple[Mode, ...] = ("forced", "aligned", "jitter")
Force = Literal["locks", "pause"]
FORCES: tuple[Force, ...] = ("locks", "pause")


@dataclass
class RunConfig:
    # Empty: the default, for_update for the reference service; a running target runs its own
    # flow, named after its profile.
    strategies: list[str] = field(default_factory=list)
    trials: int = 100
    mode: Mode = "forced"
    target: str = "inproc"  # inproc | http | http(s)://host:port[/prefix] (a running service)
    profile: Path | None = None  # the target profile (docs/profile.md); default: the reference
    dsn: str | None = None
    seed: int = 1
    webhooks: int = 1
    first_event: str = "payment.captured"
    concurrency: int = 4
    jitter_ms: float = 5.0
    hold_ms: float = 0.0
    isolation: str = "READ COMMITTED"
    # The reference service's webhook event-id dedupe (its WEBHOOK_DEDUPE setting).
    webhook_dedupe: bool = True
    gates: list[Gate] = field(default_factory=list)
    baseline: Path | None = None  # an earlier run's summary.json, for '*baseline' gates
    write_baseline: Path | None = None  # where to write this run's baseline when it is valid
    out_dir: Path = Path("reports")
    durable: bool = False
    amount: int = 50_000
    pause_timeout_s: float = 5.0
    target_dsn: str | None = None  # a running target's own database, for the oracle
    gateway_url: str | None = None  # the fake gateway a running target talks to
    oracle_config: Path | None = None  # a team's own schema (TOML); default: the reference
    nemesis: str | None = None  # faults during the trials: "gateway-errors:0.2,kill-backends:1"
    command: str = "payrace run"
    run_id: str = ""
    # What the target is expected to be ("valid" / "violated"); the reference strategies are
    # declared (model.verdict.DECLARED), a team's own service says it here.
    expect: str | None = None
    # How long the oracle may wait at the end for the deadlock counter to settle. None: 2 s
    # when payrace stopped the target (its backends flush on exit); for a running target,
    # whose pool stays open, long enough for idle backends to flush (oracle module docstring).
    settle_s: float | None = None
    # How long, at most, the target gets after the trials to reconcile captures the gateway
    # made that its database does not show (runner.reconcile). None: its default window.
    reconcile_s: float | None = None
    # A client callback answered 5xx (or not at all) is sent again this many times, as a
    # customer reloading the checkout's return page would (trials._resend). 0: never.
    callback_reloads: int = 0
    _profile: Profile | None = field(default=None, init=False, repr=False, compare=False)
    _baseline: Baseline | None = field(default=None, init=False, repr=False, compare=False)
    # Forced mode: "locks" (the harness's row locks in the target's database and its gateway
    # holds: nothing asked of the target) or "pause" (the target's pause points: the reference
    # service's probes in-process, X-Payrace-Pause over HTTP). None: pause for the reference
    # service payrace starts, locks for a running target; validate() settles it.
    force: Force | None = None

    @property
    def external(self) -> bool:
        """A running service payrace did not start (a URL)."""
        return self.target not in ("inproc", "http")

    def target_profile(self) -> Profile:
        """The profile this run races through: --profile or the reference one, with --target
        and --oracle-config applied. Read once; a mistake in it is a UsageError."""
        if self._profile is None:
            base = Profile.load(self.profile) if self.profile else Profile.reference()
            if self.profile is None and self.external:
                # The reference contract, not its service: nothing to assume it cooperates.
                base = replace(base, name="target", force="locks")
            oracle = None
            if self.oracle_config is not None:
                if self.profile is not None:
                    raise UsageError(
                        f"--oracle-config and --profile both describe the oracle; move the "
                        f"oracle's tables into [oracle] of {self.profile} and drop --oracle-config"
                    )
                try:
                    oracle = watched.OracleConfig.from_toml(self.oracle_config)
                except watched.OracleError as exc:
                    raise UsageError(str(exc)) from exc
            url = self.target if self.external else None
            self._profile = base.with_overrides(base_url=url, oracle=oracle)
        return self._profile

    def settle_timeout_s(self) -> float:
        if self.settle_s is not None:
            return self.settle_s
        return EXTERNAL_SETTLE_S if self.external else 2.0

    def validate(self) -> None:
        if self.trials < 1 or self.trials > 1_000_000:
            raise UsageError("--trials must be between 1 and 1000000")
        if self.mode not in MODES:
            raise UsageError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.concurrency < 1 or self.concurrency > 64:
            raise UsageError("--concurrency must be between 1 and 64")
        if not 0 <= self.webhooks <= MAX_WEBHOOKS:
            raise UsageError(
                f"--webhooks must be between 0 and {MAX_WEBHOOKS} (webhooks per trial besides "
                f"the client callback), got {self.webhooks}"
            )
        for flag, value in (("--jitter-ms", self.jitter_ms), ("--hold-ms", self.hold_ms)):
            # NaN passes every comparison's `not`, inf every lower bound: say so up front,
            # not in a JSON encoder after the whole run.
            if not (math.isfinite(value) and 0 <= value <= MAX_OFFSET_MS):
                raise UsageError(
                    f"{flag} must be a number of milliseconds between 0 and "
                    f"{MAX_OFFSET_MS:g}, got {value!r}"
                )
        if any(not s.strip() for s in self.strategies):
            raise UsageError(
                f"--strategy names an empty strategy; choose from {', '.join(_names())} "
                "(or leave --strategy out for for_update)"
            )
        try:
            self.isolation = normalise_isolation(self.isolation)
        except ValueError as exc:
            raise UsageError(f"--isolation: {exc}") from None
        if self.external and not self.target.startswith(("http://", "https://")):
            raise UsageError(
                f"--target must be inproc, http or a URL like http://127.0.0.1:8000, "
                f"got {self.target!r}"
            )
        profile = self.target_profile()
        if self.profile is not None and not self.external:
            if profile.base_url is None:
                raise UsageError(
                    f"{self.profile} has no [target].base_url: add it, or give --target URL"
                )
            if self.target != "inproc":
                raise UsageError(
                    f"--target {self.target} starts the reference service; a profile races a "
                    "running service: give --target URL or the profile's [target].base_url"
                )
            self.target = profile.base_url
        if self.external:
            if self.strategies not in ([], [profile.name]):
                raise UsageError(
                    "--strategy picks a flow of the reference service; a running target runs "
                    "its own: leave --strategy out (the run is named after the profile, "
                    f"{profile.name!r})"
                )
            self.strategies = [profile.name]
            if not self.target_dsn or not self.gateway_url:
                raise UsageError(
                    "--target URL needs --target-dsn (the target's own database, where the "
                    "oracle installs its audit triggers) and --gateway-url (the fake gateway "
                    "it talks to, e.g. one started with `payrace gateway`)"
                )
            # Options that act on what payrace starts mean nothing for a running target.
            if self.isolation != "READ COMMITTED":
                raise UsageError(
                    "--isolation sets the reference service payrace starts; a running target "
                    "keeps its own isolation level: leave --isolation out"
                )
            if not self.webhook_dedupe:
                raise UsageError(
                    "--no-webhook-dedupe sets the reference service payrace starts; a running "
                    "target dedupes webhooks its own way: leave --no-webhook-dedupe out"
                )
        else:
            # Imported here, not at the top: it brings in the service (FastAPI, SQLAlchemy),
            # which a run of a running target, `payrace gateway` or --help never use.
            from payrace.service import strategies

            self.strategies = self.strategies or ["for_update"]
            for name in self.strategies:
                try:
                    strategies.resolve(name)  # a built-in name or package.module:Name
                except strategies.UnknownStrategy as exc:
                    raise UsageError(str(exc)) from None
        if self.first_event not in ("payment.captured", "payment.authorized", "order.paid"):
            raise UsageError(
                f"--event must be payment.captured, payment.authorized or order.paid, "
                f"got {self.first_event!r}"
            )
        if self.hold_ms < 0 or self.jitter_ms < 0:
            raise UsageError("--hold-ms and --jitter-ms must be >= 0")
        if self.hold_ms and self.mode != "forced":
            raise UsageError("--hold-ms is injected at the forced-mode pause; use --mode forced")
        self._settle_force()
        if self.expect not in (None, "valid", "violated"):
            raise UsageError(f"--expect must be valid or violated, got {self.expect!r}")
        if self.settle_s is not None and not 0 <= self.settle_s <= 600:
            raise UsageError("--settle-s must be between 0 and 600 seconds")
        if self.reconcile_s is not None and not (
            math.isfinite(self.reconcile_s) and 0 <= self.reconcile_s <= 3600
        ):
            raise UsageError(
                f"--reconcile-s must be between 0 and 3600 seconds (0: judge without waiting "
                f"for the target to reconcile), got {self.reconcile_s!r}"
            )
        if not 0 <= self.callback_reloads <= MAX_CALLBACK_RELOADS:
            raise UsageError(
                f"--callback-reloads must be between 0 and {MAX_CALLBACK_RELOADS} (how often "
                f"a callback answered 5xx is sent again), got {self.callback_reloads}"
            )
        if self.nemesis is not None:
            try:
                faults = parse_spec(self.nemesis)
            except NemesisSpecError as exc:
                raise UsageError(str(exc)) from exc
            why = unfit(faults, target=self.target, external=self.external, dsn=self.dsn)
            if why is not None:
                raise UsageError(why)
        self._check_gates()
        # Last: the probe creates --out, which a run refused for another reason must not leave.
        _check_writable(self.out_dir)

    def _check_gates(self) -> None:
        """Last, once the strategies are settled: a gate naming a strategy the run does not
        race would otherwise vanish from the verdict, and a baseline gate never decide."""
        self._baseline = Baseline.load(self.baseline) if self.baseline is not None else None
        check_gates(
            self.gates,
            self.strategies,
            known=_names(),
            baseline=self._baseline,
            mode=self.mode,
            profile_named=self.external,
        )
        if self.write_baseline is not None and self.write_baseline.is_dir():
            raise UsageError(
                f"--write-baseline {self.write_baseline} is a directory; name a file, "
                "e.g. payrace-baseline.json"
            )

    def restarts_postgres(self) -> bool:
        """The nemesis restarts the PostgreSQL server payrace starts (so it starts one it can)."""
        return bool(self.nemesis) and any(
            f.name == "restart-postgres" for f in parse_spec(self.nemesis or "")
        )

    def loaded_baseline(self) -> Baseline | None:
        """--baseline as validate() read it."""
        return self._baseline

    def _settle_force(self) -> None:
        if self.mode != "forced":
            if self.force is not None:
                raise UsageError(
                    f"--force chooses how forced mode holds the requests; --mode {self.mode} "
                    "forces nothing: leave --force out or use --mode forced"
                )
            return
        if self.force is None:  # a running target's profile says; it needs nothing by default
            self.force = self.target_profile().force if self.external else "pause"
        if self.force not in FORCES:
            raise UsageError(f"--force must be locks or pause, got {self.force!r}")
        if self.force == "locks" and self.hold_ms:
            raise UsageError(
                "--hold-ms keeps a request's locks at the target's before-commit pause point, "
                "which --force locks does not use (the harness holds rows of its own): leave "
                "--hold-ms out, or use --force pause against a target with the pause handshake"
            )


def _check_writable(out_dir: Path) -> None:
    """The reports directory takes a file now, not after every trial ran: create it (the run
    would) and write and delete a probe file. Permission bits alone do not tell, as root."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".payrace-probe-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(
            f"--out {out_dir} cannot take the reports ({exc.strerror or exc}): choose a "
            "directory you can write to"
        ) from None


def oracle_config(config: RunConfig) -> watched.OracleConfig:
    return config.target_profile().oracle


def _names() -> list[str]:
    """The reference service's strategy names (imported on use: see validate())."""
    from payrace.service.strategies import names

    return names()
