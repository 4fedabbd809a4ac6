"""`payrace load`: the Locust suite against a stack payrace starts, and the gate at its end.

    load_main()      PostgreSQL (provider) -> oracle -> fake gateway -> service (uvicorn) ->
                     Locust headless in its own process group -> reports; exit 0 clean,
                     1 invariant violated, 2 usage or infrastructure error, 130 interrupted
    LoadSettings     what `payrace load` hands Locust through PAYRACE_* environment variables
    LoadTally        one Locust process's samples since its last report: HDR histograms,
                     request counts, the payments it created and the captures it was told of
    LoadRun          the master's merge of every tally; prepare() installs the oracle and takes
                     the baseline, finish() settles, observes, checks, writes the summary
    LocustProcess    the locust child: SIGINT (it writes its reports and runs the gate), then
                     SIGTERM, then SIGKILL of its whole process group
    CpuSampler       CPU seconds of Locust, the service, PostgreSQL and payrace, from /proc

How the parts talk: load_main -> PAYRACE_* variables -> locustfiles/_payrace.py, whose event
listeners feed a LoadTally per process, ship it to the master in Locust's own worker reports,
merge it into a LoadRun there and call LoadRun.finish() at `quitting`. The same locustfiles
run without `payrace load` (distributed Locust against an external PostgreSQL) when the
variables are set by hand; see locustfiles/README.md.

The gate judges what the database and the gateway saw, not what Locust saw: the oracle's
audit rows (a second transaction writing captured is a double capture even when the final
state looks right) and the fake gateway's capture counters. Locust's failure counts and the
deadlock counter are reported beside the verdict but do not decide it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import httpx
import psycopg
from rich.console import Console
from rich.table import Table

from harness import checker, oracle, report
from harness.gateway import FakeRazorpay, GatewayKeys, GatewayServer
from harness.history import Operation
from harness.processes import ServiceProcess, free_port, service_env
from harness.provider import Database, ProviderError, provide_postgres
from harness.stats import PathHistograms
from harness.timeline import from_audit

EXIT_OK, EXIT_VIOLATED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

ENV_DATABASE_URL = "PAYRACE_DATABASE_URL"  # libpq URL of the target's database (the gate)
ENV_GATEWAY_URL = "PAYRACE_GATEWAY_URL"  # the fake Razorpay (authorize payments, counters)
ENV_REPORT_DIR = "PAYRACE_REPORT_DIR"
ENV_RUN_ID = "PAYRACE_RUN_ID"
ENV_COMMAND = "PAYRACE_COMMAND"
ENV_SEED = "PAYRACE_SEED"

LOCUSTFILES = Path(__file__).resolve().parent.parent / "locustfiles"
# The invariants the gate decides on. no_5xx and error_classes read a full history, which a
# load run does not keep (Locust's failure table is the load run's error classes); a zero
# deadlock delta cannot settle while the service's pool is open (see harness.oracle).
GATE_CHECKERS: tuple[checker.Checker, ...] = (
    checker.single_capture_write,
    checker.single_invoice_paid,
    checker.single_order_paid,
    checker.gateway_capture_once,
    checker.no_lost_capture,
)
# Histogram kind of the arrival spread: how far apart the service received the requests of
# one race that were released together (its own X-Payrace-Received-At stamps).
SPREAD = "arrival_spread"
_RUN_TIME = re.compile(r"^(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?$")
_QUIET_POLLS = 3  # consecutive quiet readings of pg_stat_activity before the oracle looks
_LOCUST_GRACE_S = 120.0  # past -t: spawn-up, the gate, the reports


class UsageError(ValueError):
    """The arguments cannot work; the message says what to change."""


# -- arguments ----------------------------------------------------------------------------


def parse_run_time(text: str) -> float:
    """Locust's -t syntax: `90`, `90s`, `1m30s`, `1h` -> seconds."""
    value = text.strip()
    if value.isdigit():
        return float(value)
    m = _RUN_TIME.match(value)
    if not value or m is None:
        raise UsageError(f"run time {text!r} is not like 60s, 1m30s, 1h or 90 (seconds)")
    return float(int(m["h"] or 0) * 3600 + int(m["m"] or 0) * 60 + int(m["s"] or 0))


def resolve_locustfile(spec: str) -> str:
    """A path, a bare scenario name (`race_pairs`), or a comma list of either."""
    resolved = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        candidates = [Path(part)]
        if not part.startswith("_"):  # _payrace.py is the shared helper, not a scenario
            candidates += [LOCUSTFILES / part, LOCUSTFILES / f"{part}.py"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            names = sorted(p.stem for p in LOCUSTFILES.glob("[!_]*.py"))
            raise UsageError(f"locustfile {part!r} not found; scenarios here: {', '.join(names)}")
        resolved.append(str(found.resolve()))
    if not resolved:
        raise UsageError("no locustfile given")
    return ",".join(resolved)


def locust_processes(processes: int) -> list[str]:
    """0 or 1: one local Locust process; N >= 2: master + N workers; -1: one per core."""
    if processes in (0, 1):
        return []
    if processes < -1:
        raise UsageError(f"--processes {processes}: use -1 (one per core), 0/1 or N >= 2")
    return ["--processes", str(processes)]


# -- settings handed to Locust ------------------------------------------------------------


@dataclass(frozen=True)
class LoadSettings:
    gateway_url: str | None
    database_url: str | None
    report_dir: Path
    run_id: str
    command: str
    seed: int | None
    keys: GatewayKeys = field(default_factory=GatewayKeys)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> LoadSettings:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run_id = env.get(ENV_RUN_ID) or f"{stamp}-locust"
        seed = env.get(ENV_SEED)
        return cls(
            gateway_url=(env.get(ENV_GATEWAY_URL) or "").rstrip("/") or None,
            database_url=env.get(ENV_DATABASE_URL) or None,
            report_dir=Path(env.get(ENV_REPORT_DIR) or Path("reports") / run_id),
            run_id=run_id,
            command=env.get(ENV_COMMAND) or shlex.join(["locust", *sys.argv[1:]]),
            seed=int(seed) if seed and seed.lstrip("-").isdigit() else None,
        )

    def to_env(self) -> dict[str, str]:
        env = {
            ENV_REPORT_DIR: str(self.report_dir),
            ENV_RUN_ID: self.run_id,
            ENV_COMMAND: self.command,
        }
        if self.gateway_url:
            env[ENV_GATEWAY_URL] = self.gateway_url
        if self.database_url:
            env[ENV_DATABASE_URL] = self.database_url
        if self.seed is not None:
            env[ENV_SEED] = str(self.seed)
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
    _confirmed_ids: set[int] = field(default_factory=set)

    def request(self, failed: bool) -> None:
        self.requests += 1
        self.failures += failed

    def timing(self, kind: str, path: str, ms: float) -> None:
        if ms >= 0:
            self.hist.record(kind, path, ms)

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
            "hdr": self.hist.encode(),
        }
        self.hist = PathHistograms()
        self.requests = self.failures = 0
        self.payments, self.confirmed = [], []
        # _confirmed_ids stays: a later answer about the same payment is not news.
        return data


@dataclass
class WorkerTotals:
    pid: int
    host: str
    requests: int = 0
    failures: int = 0
    payments: int = 0
    reports: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "host": self.host,
            "requests": self.requests,
            "failures": self.failures,
            "payments": self.payments,
            "reports": self.reports,
        }


@dataclass
class LoadRun:
    """The master's view: every worker's tallies merged, then judged once at the end."""

    settings: LoadSettings
    hist: PathHistograms = field(default_factory=PathHistograms)
    workers: dict[str, WorkerTotals] = field(default_factory=dict)
    payments: dict[int, str | None] = field(default_factory=dict)
    confirmed: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    baseline: oracle.Baseline | None = None
    problems: list[str] = field(default_factory=list)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.perf_counter)

    def absorb(self, client_id: str, data: Mapping[str, Any]) -> None:
        totals = self.workers.get(client_id)
        if totals is None:
            totals = self.workers[client_id] = WorkerTotals(int(data["pid"]), str(data["host"]))
        totals.requests += int(data["requests"])
        totals.failures += int(data["failures"])
        totals.payments += len(data["payments"])
        totals.reports += 1
        for payment_id, gateway_payment_id in data["payments"]:
            self.payments[int(payment_id)] = gateway_payment_id
        for payment_id, f, event in data["confirmed"]:
            self.confirmed.setdefault(int(payment_id), (str(f), event))
        self.hist.merge(PathHistograms.decode(data["hdr"]))

    def prepare(self) -> None:
        """Install the oracle if it is missing and take the baseline (master, before users)."""
        url = self.settings.database_url
        if url is None:
            self.problems.append(f"{ENV_DATABASE_URL} is not set: the database is not checked")
            return
        if not oracle.installed(url):
            oracle.install(url)
        self.baseline = oracle.baseline(url)

    def ops(self) -> list[Operation]:
        """The little history the checkers need: who owns which gateway payment, and which
        payments the target confirmed as captured (no_lost_capture's evidence)."""
        out: list[Operation] = []

        def add(**fields: Any) -> None:
            out.append(Operation(index=len(out), trial=0, time=0, **fields))

        for payment_id, gateway_payment_id in sorted(self.payments.items()):
            if gateway_payment_id:
                value = {"gateway_payment_id": gateway_payment_id}
                add(type="invoke", f="authorize", process="locust", payment=payment_id, value=value)
        for payment_id, (f, event) in sorted(self.confirmed.items()):
            process = f"locust-{payment_id}"
            add(type="invoke", f=f, process=process, payment=payment_id, value={"event": event})
            done = {"status": "captured", "event": event}
            add(type="ok", f=f, process=process, payment=payment_id, value=done, status=200)
        return out

    def finish(self, *, host: str, locust: Mapping[str, Any], window_s: float) -> dict[str, Any]:
        """Wait for the target to go quiet, observe, check, write the reports; the summary."""
        from harness.runner import DECLARED, machine  # see _declared()

        strategy, problems = _target_strategy(host), list(self.problems)
        result: dict[str, Any] = {
            "expected": DECLARED.get(strategy),
            "valid": "unknown",
            "trials": len(self.payments),
            "violating_trials": 0,
            "duration_s": round(window_s, 3),
            "trials_per_second": round(len(self.payments) / window_s, 2) if window_s else 0.0,
            "captures": None,
            "captures_per_second": None,
            "checks": {},
            "first_violation": None,
            **self._latency(),
        }
        url = self.settings.database_url
        if url is not None and self.baseline is not None:
            try:
                result.update(self._judge(url, self.baseline, window_s, problems))
            except (psycopg.Error, oracle.OracleError, httpx.HTTPError, OSError) as exc:
                problems.append(f"the oracle could not judge the run: {type(exc).__name__}: {exc}")
        elif url is not None:
            problems.append("no oracle baseline was taken, so the run cannot be judged")
        valid = result["valid"]
        verdict, code = (
            ("valid", EXIT_OK)
            if valid is True
            else ("violated", EXIT_VIOLATED)
            if valid is False
            else ("unknown", EXIT_ERROR)
        )
        summary = {
            "run_id": self.settings.run_id,
            "command": self.settings.command,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "duration_s": round(time.perf_counter() - self.started, 3),
            "machine": machine(),
            "database": {"route": "dsn", "describe": f"{ENV_DATABASE_URL} (set for Locust)"},
            "target": host,
            "mode": "load",
            "trials": len(self.payments),
            "strategies": {strategy: result},
            "locust": {
                **locust,
                "workers": {cid: w.to_json() for cid, w in sorted(self.workers.items())},
                "worker_count": len(self.workers),
            },
            "problems": problems,
            "gates": [],
            "verdict": verdict,
            "exit_code": code,
        }
        self.write(summary)
        return summary

    def _latency(self) -> dict[str, Any]:
        latency, plots = self.hist.summary(), self.hist.plots()
        spread = latency.pop(SPREAD, {}).get("race")
        plots.pop(SPREAD, None)  # a spread is not a latency; summary.json has its own key
        return {"latency_ms": latency, "plots": plots, "arrival_spread_ms": spread}

    def _judge(
        self, url: str, since: oracle.Baseline, window_s: float, problems: list[str]
    ) -> dict[str, Any]:
        if not wait_quiet(url):
            problems.append("the target's transactions did not go quiet within 10 s")
        counters = None
        if self.settings.gateway_url:
            response = httpx.get(f"{self.settings.gateway_url}/_fake/counters", timeout=10.0)
            response.raise_for_status()
            counters = response.json()
        else:
            problems.append(f"{ENV_GATEWAY_URL} is not set: gateway captures are not counted")
        obs = oracle.observe(
            url,
            since=since,
            payment_ids=set(self.payments),
            gateway_counters=counters,
            gateway_payment_ids=[g for g in self.payments.values() if g],
        )
        verdict = checker.check(self.ops(), obs, checkers=GATE_CHECKERS)
        captured = obs.config.payments.done_value
        captures = sum(1 for s in obs.payments.values() if s.status == captured)
        first = None
        if verdict.violating_payments:
            payment = min(verdict.violating_payments)
            first = {
                "trial": None,
                "payment": payment,
                "checks": [n for n, r in verdict.results.items() if payment in r.payments],
                "timeline": [e.to_json() for e in from_audit(obs.audit, payment)],
            }
        return {
            "valid": verdict.valid,
            "violating_trials": len(verdict.violating_payments),
            "captures": captures,
            "captures_per_second": round(captures / window_s, 2) if window_s else 0.0,
            "checks": {name: r.to_json() for name, r in verdict.results.items()},
            "deadlocks": {"delta": obs.deadlocks, "settled": obs.deadlocks_settled},
            "first_violation": first,
        }

    def write(self, summary: dict[str, Any]) -> None:
        out = self.settings.report_dir
        out.mkdir(parents=True, exist_ok=True)
        hdr = {
            kind: {
                path: {"summary": self.hist.get(kind, path).summary(), "hdr": text}
                for path, text in paths.items()
            }
            for kind, paths in self.hist.encode().items()
        }
        (out / "latency_hdr.json").write_text(json.dumps(hdr, indent=2) + "\n", encoding="utf-8")
        report.write_all(summary, out)


def _declared() -> dict[str, str]:
    # Imported when needed, not at the top: harness.runner brings the whole service (FastAPI,
    # SQLAlchemy, asyncpg), which every Locust worker importing this module would carry.
    from harness.runner import DECLARED

    return DECLARED


def _target_strategy(host: str) -> str:
    """The reference service says its strategy on /healthz; any other target is 'target'."""
    try:
        body = httpx.get(f"{host.rstrip('/')}/healthz", timeout=5.0).json()
    except (httpx.HTTPError, ValueError):
        return "target"
    strategy = body.get("strategy") if isinstance(body, dict) else None
    return strategy if isinstance(strategy, str) else "target"


def wait_quiet(url: str, timeout_s: float = 10.0) -> bool:
    """Wait until no client backend of the target is inside a statement or transaction.

    Locust kills its users mid-request when the run ends, but the service finishes what it
    already received; observing before those captures commit would judge a half-done run.
    """
    deadline = time.monotonic() + timeout_s
    quiet = 0
    with psycopg.connect(url, autocommit=True, application_name="payrace-load") as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
                "AND coalesce(application_name, '') NOT LIKE %s "
                "AND state IS DISTINCT FROM 'idle'",
                (oracle.HARNESS_APPLICATION_PREFIX + "%",),
            ).fetchone()
            quiet = quiet + 1 if row is not None and row[0] == 0 else 0
            if quiet >= _QUIET_POLLS:
                return True
            time.sleep(0.1)
    return False


# -- CPU shares ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgrp: int
    ticks: int  # utime + stime


def _read_procs() -> dict[int, _Proc]:
    procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue  # exited between listing and reading
        # The command name may hold spaces and parentheses; the fields follow the last ')'.
        rest = stat.rsplit(")", 1)[1].split()
        pid = int(entry.name)
        procs[pid] = _Proc(pid, int(rest[1]), int(rest[2]), int(rest[11]) + int(rest[12]))
    return procs


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user
    return total - idle, total


class CpuSampler:
    """Samples /proc once a second; groups are named predicates over processes.

    A process's ticks count from the first sample it is seen in, or from its birth if it
    appears later (a backend forked for a new connection spends all its CPU in the run)."""

    def __init__(self, groups: Mapping[str, Callable[[_Proc, Mapping[int, _Proc]], bool]]) -> None:
        self.groups = dict(groups)
        self.enabled = Path("/proc/stat").exists()
        self._seen: dict[tuple[int, str], int] = {}
        self._cpu: dict[str, int] = dict.fromkeys(self.groups, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._machine0 = self._machine1 = (0, 0)
        self._first = True
        self._t0 = self._t1 = 0.0

    def _sample(self) -> None:
        procs = _read_procs()
        for proc in procs.values():
            for name, member in self.groups.items():
                if not member(proc, procs):
                    continue
                key = (proc.pid, name)
                start = self._seen.setdefault(key, proc.ticks if self._first else 0)
                self._cpu[name] += proc.ticks - start
                self._seen[key] = proc.ticks
        self._first = False
        self._machine1, self._t1 = _machine_ticks(), time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def __enter__(self) -> CpuSampler:
        if self.enabled:
            self._machine0, self._t0 = _machine_ticks(), time.monotonic()
            self._sample()
            self._thread = threading.Thread(target=self._loop, name="payrace-cpu", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._sample()
            self._thread = None

    def result(self) -> dict[str, Any] | None:
        if not self.enabled or self._t1 <= self._t0:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = self._machine1[0] - self._machine0[0]
        total = self._machine1[1] - self._machine0[1]
        out: dict[str, Any] = {
            "window_s": round(self._t1 - self._t0, 2),
            "cpus": os.cpu_count(),
            "machine_busy_percent": round(100.0 * busy / total, 1) if total else None,
            "groups": {},
        }
        for name, ticks in [*self._cpu.items(), ("other", busy - sum(self._cpu.values()))]:
            # "other": everything else that kept the CPUs busy (the kernel, other programs);
            # a large share means the figures above were measured on a shared machine.
            out["groups"][name] = {
                "cpu_s": round(ticks / hz, 2),
                "percent_of_machine": round(100.0 * ticks / total, 1) if total else None,
                "percent_of_busy": round(100.0 * ticks / busy, 1) if busy else None,
            }
        return out


def _in_group(pgrp: int) -> Callable[[_Proc, Mapping[int, _Proc]], bool]:
    return lambda proc, _: proc.pgrp == pgrp


def _cpu_sampler(locust: LocustProcess, service: ServiceProcess, db: Database) -> CpuSampler:
    """Locust and the service are whole process groups (workers included); PostgreSQL is
    the postmaster and its children; payrace itself runs the fake gateway's thread."""
    assert service.proc is not None
    payrace = os.getpid()
    groups: dict[str, Callable[[_Proc, Mapping[int, _Proc]], bool]] = {
        "locust": _in_group(locust.pid),
        "service": _in_group(service.proc.pid),
        "payrace (fake gateway)": lambda proc, _: proc.pid == payrace,
    }
    postmaster = _postmaster_pid(db)
    if postmaster is not None:
        groups["postgres"] = lambda proc, _: postmaster in (proc.pid, proc.ppid)
    return CpuSampler(groups)


def _postmaster_pid(db: Database) -> int | None:
    """The local postmaster behind `db`, found through one of its backends; None if remote."""
    try:
        with psycopg.connect(db.url, autocommit=True, application_name="payrace-load") as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            # Looked at while connected: the backend exits with the connection. In a container
            # the pid is the container's own, so only a local postgres with a postgres parent
            # counts.
            backend = _read_procs().get(int(row[0])) if row is not None else None
            if backend is None or {_comm(backend.pid), _comm(backend.ppid)} != {"postgres"}:
                return None
            return backend.ppid
    except psycopg.Error:
        return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""


# -- Locust as a child process ------------------------------------------------------------


class LocustProcess:
    """locust in its own session, its output teed to a log and to `echo`.

    Its own session keeps a terminal's Ctrl-C away from it (payrace decides when it stops)
    and makes `--processes` workers, which Locust forks into the same group, stoppable with
    one killpg even when the master dies first."""

    def __init__(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        echo: Callable[[str], None],
        *,
        stop_grace_s: tuple[float, float] = (30.0, 10.0),
    ) -> None:
        self.cmd = list(cmd)
        # After SIGINT Locust still writes its reports and runs the gate; after SIGTERM only
        # its reports. Past both, SIGKILL.
        self.stop_grace_s = stop_grace_s
        self.env = dict(env)
        self.log_path = log_path
        self.echo = echo
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> LocustProcess:
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self._reader = threading.Thread(
            target=self._tee, args=(self.proc.stdout,), name="payrace-locust-log", daemon=True
        )
        self._reader.start()
        return self

    def _tee(self, stream: IO[bytes]) -> None:
        with stream, self.log_path.open("wb") as log:
            for raw in stream:
                log.write(raw)
                log.flush()
                self.echo(raw.decode("utf-8", errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None when Locust outlived `timeout_s`."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGINT first: Locust then writes its reports and runs the gate before it exits."""
        assert self.proc is not None
        try:
            graces = zip((signal.SIGINT, signal.SIGTERM), self.stop_grace_s, strict=True)
            for sig, wait_s in graces:
                if self.proc.poll() is not None:
                    break
                self._signal_group(sig)
                try:
                    self.proc.wait(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    continue
        finally:
            # Whatever happened above (even a second Ctrl-C), nothing of the group survives:
            # workers forked by --processes stay in the group after their master exited.
            self._signal_group(signal.SIGKILL)
            if self.proc.poll() is None:
                self.proc.wait(timeout=10)
            if self._reader is not None:
                self._reader.join(timeout=5)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None:
            self.stop()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A SIGTERM (CI cancelling a job) unwinds like Ctrl-C, so every child is stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- payrace load -------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    strategy: str
    users: int
    spawn_rate: float
    run_time: str
    run_time_s: float
    processes: list[str]
    workers: int
    dsn: str | None
    locustfile: str
    run_dir: Path
    run_id: str
    command: str
    extra_args: list[str]

    @classmethod
    def build(
        cls,
        *,
        strategy: str,
        users: int,
        spawn_rate: float,
        run_time: str,
        processes: int,
        workers: int,
        dsn: str | None,
        locustfile: str,
        out_dir: Path,
        extra_args: Sequence[str],
    ) -> LoadPlan:
        declared = _declared()
        if strategy not in declared:
            raise UsageError(f"--strategy {strategy!r}: use one of {', '.join(declared)}")
        if users < 1:
            raise UsageError(f"-u/--users {users}: need at least one user")
        if not spawn_rate > 0:
            raise UsageError(f"-r/--spawn-rate {spawn_rate}: must be > 0 users per second")
        if not 1 <= workers <= 32:
            raise UsageError(f"--workers {workers}: the service runs 1 to 32 uvicorn workers")
        seconds = parse_run_time(run_time)
        if seconds <= 0:
            raise UsageError(f"-t/--run-time {run_time!r}: must be longer than zero")
        resolved = resolve_locustfile(locustfile)
        scenario = "+".join(Path(p).stem for p in resolved.split(","))
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run_id = f"{stamp}-load-{strategy}-{scenario}"
        args = [
            "payrace", "load", "--strategy", strategy, "-u", str(users), "-r", f"{spawn_rate:g}",
            "-t", run_time, "--processes", str(processes), "--workers", str(workers),
            "--locustfile", locustfile, "--out", str(out_dir), *extra_args,
        ]  # fmt: skip
        return cls(
            strategy=strategy,
            users=users,
            spawn_rate=spawn_rate,
            run_time=run_time,
            run_time_s=seconds,
            processes=locust_processes(processes),
            workers=workers,
            dsn=dsn,
            locustfile=resolved,
            run_dir=out_dir / run_id,
            run_id=run_id,
            command=shlex.join(args),
            extra_args=list(extra_args),
        )

    def locust_cmd(self, host: str, master_port: int | None = None) -> list[str]:
        cmd = [
            sys.executable, "-m", "locust", "-f", self.locustfile, "--headless",
            "-u", str(self.users), "-r", f"{self.spawn_rate:g}", "-t", self.run_time,
            "--host", host,
            "--html", str(self.run_dir / "locust.html"),
            "--csv", str(self.run_dir / "locust"),
        ]  # fmt: skip
        if self.processes:
            # Locust's fixed default (5557 on every interface) would collide with any other
            # run on this machine; its own workers find the master on loopback.
            port = str(master_port or free_port())
            cmd += [*self.processes, "--master-bind-host", "127.0.0.1"]
            cmd += ["--master-bind-port", port, "--master-port", port]
        return [*cmd, *self.extra_args]

    def service_pool(self) -> dict[str, str]:
        # 90 connections in all, so even a server left at max_connections = 100 has room for
        # the oracle and a psql; the embedded and docker clusters allow 300.
        per_worker = max(2, 45 // self.workers)
        return {"DB_POOL_SIZE": str(per_worker), "DB_MAX_OVERFLOW": str(per_worker)}


def load_main(
    strategy: str,
    users: int,
    spawn_rate: float,
    run_time: str,
    processes: int,
    workers: int,
    dsn: str | None,
    locustfile: str,
    out_dir: Path,
    console: Console,
    extra_args: list[str],
) -> int:
    """`payrace load`; see the module docstring. Returns the process exit code."""
    try:
        plan = LoadPlan.build(
            strategy=strategy,
            users=users,
            spawn_rate=spawn_rate,
            run_time=run_time,
            processes=processes,
            workers=workers,
            dsn=dsn,
            locustfile=locustfile,
            out_dir=out_dir,
            extra_args=extra_args,
        )
    except UsageError as exc:
        console.print(f"[bold red]payrace load:[/] {exc}")
        return EXIT_ERROR
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _sigterm_as_interrupt():
            return _run(plan, console)
    except KeyboardInterrupt:
        # Locust got SIGINT too and judged what had run so far; a violation found in a cut
        # short run is still a violation.
        summary = _read_summary(plan.run_dir)
        if summary is not None:
            _finish_reports(summary, None, plan, console, None)
        console.print(f"[yellow]interrupted[/]; everything started was stopped ({plan.run_dir})")
        if summary is not None and summary.get("exit_code") == EXIT_VIOLATED:
            return EXIT_VIOLATED
        return EXIT_INTERRUPTED
    except (ProviderError, oracle.OracleError) as exc:
        console.print(f"[bold red]payrace load:[/] {exc}")
        return EXIT_ERROR
    except (OSError, TimeoutError, RuntimeError, psycopg.Error) as exc:
        problem = f"infrastructure error: {type(exc).__name__}: {exc}"
        console.print(f"[bold red]payrace load:[/] {problem}")
        return EXIT_ERROR


def _run(plan: LoadPlan, console: Console) -> int:
    def say(line: str) -> None:
        console.print(line, highlight=False, markup=False)

    def echo(line: str) -> None:
        console.out(line, highlight=False)

    with ExitStack() as stack:
        db = stack.enter_context(provide_postgres(plan.dsn, announce=say))
        gateway = stack.enter_context(GatewayServer(FakeRazorpay(GatewayKeys())))
        env = {**service_env(db, gateway.url, plan.strategy), **plan.service_pool()}
        service = stack.enter_context(
            ServiceProcess(env, workers=plan.workers, log_path=plan.run_dir / "service.log")
        )
        # The service created its tables on start; the triggers go on them before any load.
        oracle.install(db.url)
        say(
            f"payrace load: service {service.url} ({plan.strategy}, {plan.workers} uvicorn "
            f"worker(s)), fake gateway {gateway.url}, reports in {plan.run_dir}"
        )
        settings = LoadSettings(
            gateway_url=gateway.url,
            database_url=db.url,
            report_dir=plan.run_dir,
            run_id=plan.run_id,
            command=plan.command,
            seed=None,
        )
        locust_env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
        locust = LocustProcess(
            plan.locust_cmd(service.url), locust_env, plan.run_dir / "locust.log", echo
        )
        stack.enter_context(locust)
        with _cpu_sampler(locust, service, db) as sampler:
            code = locust.wait(plan.run_time_s + _LOCUST_GRACE_S)
        if code is None:
            console.print(
                f"[bold red]payrace load:[/] Locust still ran {_LOCUST_GRACE_S:.0f} s past "
                f"-t {plan.run_time}; stopped it (see {plan.run_dir / 'locust.log'})"
            )
    summary = _read_summary(plan.run_dir)
    if summary is None:
        console.print(
            f"[bold red]payrace load:[/] Locust exited with code {code} before its gate wrote "
            f"summary.json; see {plan.run_dir / 'locust.log'}"
        )
        return EXIT_ERROR
    return _finish_reports(summary, db, plan, console, sampler.result(), code)


def _read_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _finish_reports(
    summary: dict[str, Any],
    db: Database | None,
    plan: LoadPlan,
    console: Console,
    cpu: dict[str, Any] | None,
    locust_code: int | None = None,
) -> int:
    summary["command"] = plan.command
    if db is not None:
        summary["database"] = {
            "route": db.route,
            "server_version": db.server_version,
            "fast": db.fast,
            "describe": db.describe(),
        }
    summary["cpu"] = cpu
    summary.setdefault("locust", {})["exit_code"] = locust_code
    paths = report.write_all(summary, plan.run_dir)
    for name in ("locust.html", "locust_stats.csv", "latency_hdr.json", "locust.log"):
        if (plan.run_dir / name).exists():
            paths[name] = plan.run_dir / name
    report.render_console(summary, console, paths)
    console.print(load_table(summary))
    for problem in summary.get("problems") or []:
        console.print(f"[yellow]note:[/] {problem}", highlight=False)
    console.print(f"reports: {plan.run_dir}", highlight=False)
    return int(summary.get("exit_code", EXIT_ERROR))


def load_table(summary: Mapping[str, Any]) -> Table:
    """The figures a performance team asks for first."""
    table = Table(title="load", title_justify="left")
    for column in ("strategy", "payments", "captures/s", "capture request p50/p99 ms",
                   "lock p50/p99 ms", "hold p50/p99 ms", "requests", "failures"):  # fmt: skip
        table.add_column(column, justify="left" if column == "strategy" else "right")
    locust = summary.get("locust") or {}
    for name, s in (summary.get("strategies") or {}).items():
        latency = s.get("latency_ms") or {}

        def pair(kind: str, latency: Mapping[str, Any] = latency) -> str:
            a = (latency.get(kind) or {}).get("all") or {}
            return f"{a.get('p50', '-')}/{a.get('p99', '-')}"

        table.add_row(
            name,
            str(s.get("trials", "-")),
            str(s.get("captures_per_second", "-")),
            pair("request"),
            pair("lock"),
            pair("hold"),
            str(locust.get("requests", "-")),
            str(locust.get("failures", "-")),
        )
    cpu = summary.get("cpu") or {}
    shares = []
    for group, figures in (cpu.get("groups") or {}).items():
        shares.append(f"{group} {figures.get('percent_of_machine')}%")
    if shares:
        table.caption = "CPU share of the machine during the run: " + ", ".join(shares)
    return table
