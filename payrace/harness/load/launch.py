"""`payrace load`: the stack payrace starts, Locust run headless against it, the reports.

    load_main()      PostgreSQL (provider) -> oracle -> fake gateway -> service (uvicorn) ->
                     Locust headless in its own process group -> reports; exit 0 clean,
                     1 invariant violated, 2 usage or infrastructure error, 130 interrupted
    LoadArgs         the options as the command line gives them
    LoadPlan         the options checked (UsageError says what to change) and turned into a
                     run directory, a Locust command line and the service's pool size
        parse_run_time(), resolve_locustfile(), locust_processes()   one option each
    load_table()     the figures a performance team asks for first, under the usual report

The judging happens inside Locust, at its `quitting` event on the master: payrace.harness.load.gate
writes summary.json there, and load_main reads it back once Locust has exited, reads the
deadlock counter again once the service has stopped (only then does a zero delta settle),
adds the database route and the CPU shares of Locust, the service, PostgreSQL and payrace
(payrace.harness.infra.cpu.CpuSampler), and renders the reports. Every process is started as
a context manager (infra.provider, gateway.server, infra.processes), so none outlives the
run, also on Ctrl-C, SIGTERM or a failure.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, NotRequired, TypedDict, Unpack

import psycopg
from rich.console import Console
from rich.table import Table

from payrace.harness.errors import UsageError
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.cpu import CpuSampler, Member, in_group, postmaster_pid
from payrace.harness.infra.processes import LocustProcess, ServiceProcess, free_port, service_env
from payrace.harness.infra.provider import Database, ProviderError, provide_postgres
from payrace.harness.load.gate import LoadSettings, settle_deadlocks
from payrace.harness.model import oracle, watched
from payrace.harness.model.verdict import DECLARED, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_VIOLATED
from payrace.harness.reports.console import render_console
from payrace.harness.reports.writers import write_all

LOCUSTFILES = Path(__file__).resolve().parents[2] / "locustfiles"
_RUN_TIME = re.compile(r"^(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?$")
_LOCUST_GRACE_S = 120.0  # past -t: spawn-up, the gate, the reports


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


# -- the plan ----------------------------------------------------------------------------


class LoadArgs(TypedDict):
    """load_main's options, as `payrace load` gives them; LoadPlan.build checks them."""

    strategy: str
    users: int
    spawn_rate: float
    run_time: str
    processes: int  # Locust's --processes
    workers: int  # the service's uvicorn workers
    dsn: str | None  # None: the provider's first route that works
    locustfile: str
    out_dir: Path
    extra_args: Sequence[str]  # handed to Locust as they are
    durable: NotRequired[bool]  # keep fsync/synchronous_commit on a throwaway cluster


@dataclass(frozen=True)
class LoadPlan:
    """The options checked and resolved; building one starts nothing."""

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
    durable: bool = False

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
        durable: bool = False,
    ) -> LoadPlan:
        if strategy not in DECLARED:
            raise UsageError(f"--strategy {strategy!r}: use one of {', '.join(DECLARED)}")
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
            durable=durable,
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


# -- the run -----------------------------------------------------------------------------


def load_main(console: Console, **args: Unpack[LoadArgs]) -> int:
    """`payrace load`; see the module docstring. Returns the process exit code."""
    try:
        plan = LoadPlan.build(**args)
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
    except (ProviderError, watched.OracleError) as exc:
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

    deadlocks = _DeadlockReading(plan.run_dir)
    with ExitStack() as stack:
        db = stack.enter_context(provide_postgres(plan.dsn, durable=plan.durable, announce=say))
        # Unwound after the service (registered before it), while PostgreSQL still runs.
        stack.callback(deadlocks.read, db.url)
        gateway = stack.enter_context(GatewayServer(FakeRazorpay(GatewayKeys())))
        env = {
            **service_env(db, gateway.url, plan.strategy, keys=gateway.fake.keys),
            **plan.service_pool(),
        }
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
        deadlocks.wanted = code is not None
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
    if deadlocks.reading is not None:
        settle_deadlocks(summary, *deadlocks.reading)
    if deadlocks.problem:
        summary.setdefault("problems", []).append(deadlocks.problem)
    return _finish_reports(summary, db, plan, console, sampler.result(), code)


class _DeadlockReading:
    """pg_stat_database.deadlocks read again once the service has stopped.

    The gate inside Locust reads the counter while the service's pool is still open, when a
    zero delta cannot be trusted (idle backends flush their counts up to 10 s late). Once the
    service is stopped its backends exit and flush, so this reading settles at once."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.wanted = False  # only after Locust ended on its own: not on Ctrl-C or a failure
        self.reading: tuple[int, bool, str] | None = None
        self.problem: str | None = None

    def read(self, url: str) -> None:
        summary = _read_summary(self.run_dir) if self.wanted else None
        baselines = [
            s["deadlocks"]["baseline"]
            for s in ((summary or {}).get("strategies") or {}).values()
            if isinstance(s, dict) and isinstance(s.get("deadlocks"), dict)
            and "baseline" in s["deadlocks"]
        ]  # fmt: skip
        if not baselines:
            return
        try:
            since = oracle.Baseline.from_json(baselines[0])
            self.reading = oracle.deadlocks_since(url, since, settle_timeout_s=5.0)
        except (psycopg.Error, watched.OracleError, KeyError, ValueError) as exc:
            self.problem = f"the deadlock counter could not be read again: {exc}"


def _cpu_sampler(locust: LocustProcess, service: ServiceProcess, db: Database) -> CpuSampler:
    """Locust and the service are whole process groups (workers included); PostgreSQL is
    the postmaster and its children; payrace itself runs the fake gateway's thread."""
    assert service.proc is not None
    payrace = os.getpid()
    groups: dict[str, Member] = {
        "locust": in_group(locust.pid),
        "service": in_group(service.proc.pid),
        "payrace (fake gateway)": lambda proc, _: proc.pid == payrace,
    }
    postmaster = postmaster_pid(db.url)
    if postmaster is not None:
        groups["postgres"] = lambda proc, _: postmaster in (proc.pid, proc.ppid)
    return CpuSampler(groups)


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
    paths = write_all(summary, plan.run_dir)
    for name in ("locust.html", "locust_stats.csv", "latency_hdr.json", "locust.log"):
        if (plan.run_dir / name).exists():
            paths[name] = plan.run_dir / name
    render_console(summary, console, paths)
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
