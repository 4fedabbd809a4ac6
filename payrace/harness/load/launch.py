"""`payrace load`: Locust run headless against the reference service payrace starts, or a
running service a target profile describes; the reports.

    load_main()      the reference service: PostgreSQL (provider) -> oracle -> fake gateway ->
                     service (uvicorn) -> Locust headless in its own process group -> reports;
                     with --profile: the target, its gateway (--gateway-url) and its database
                     (--target-dsn) checked -> oracle -> Locust -> reports. Exit 0 clean,
                     1 invariant violated, 2 usage, setup or infrastructure error,
                     130 interrupted
    LoadArgs         the options as the command line gives them
    LoadPlan         the options checked (UsageError says what to change) and turned into a
                     run directory, a Locust command line and the service's pool size
        parse_run_time(), resolve_locustfile(), locust_processes()   one option each
    load_table()     the figures a performance team asks for first, under the usual report
    mark_locust_report()  the oracle's verdict at the top of Locust's locust.html, linking
                     report.html (which links back: summary["locust"]["html"])

The judging happens inside Locust, at its `quitting` event on the master: payrace.harness.load.gate
judges the invariants and the --gate expressions (checked here before anything starts, as
`payrace run` checks them) and writes summary.json there, and load_main reads it back once
Locust has exited, reads the deadlock counter again once the service has stopped (only then
does a zero delta settle, and the gates are judged again),
adds the database route and the CPU shares of Locust, the service, PostgreSQL and payrace
(payrace.harness.infra.cpu.CpuSampler), and renders the reports.

A profile run starts nothing but Locust: the target, its database and its fake gateway are
the user's. The profile's path reaches every Locust process as PAYRACE_PROFILE (gate.
LoadSettings), so the workers shape their requests by it and the gate watches through its
[oracle]; the gate's deadlock reading is the last one (payrace cannot stop a running target
to settle it), so it waits out the statistics flush once (--settle-s). Every process is started as
a context manager (infra.provider, gateway.server, infra.processes), so none outlives the
run, also on Ctrl-C, SIGTERM or a failure.
"""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from types import FrameType
from typing import Any, NotRequired, TypedDict, Unpack
from urllib.parse import urlsplit

import httpx
import psycopg
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from payrace.harness.errors import UsageError
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.infra.cpu import CpuSampler, Member, in_group, postmaster_pid
from payrace.harness.infra.processes import LocustProcess, ServiceProcess, free_port, service_env
from payrace.harness.infra.provider import Database, ProviderError, provide_postgres
from payrace.harness.load.gate import settle_deadlocks
from payrace.harness.load.worker import LoadSettings
from payrace.harness.model import oracle, watched
from payrace.harness.model.gates import Baseline, Gate, check_gates, write_baseline
from payrace.harness.model.profile import Profile
from payrace.harness.model.verdict import DECLARED, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_VIOLATED
from payrace.harness.reports.console import render_console, render_reports_line
from payrace.harness.reports.summary import (
    NOT_MEASURED,
    number,
    outcome,
    strategies_of,
    write_atomically,
)
from payrace.harness.reports.writers import claim_run_dir, write_all
from payrace.harness.runner.reconcile import http_sweep_env
from payrace.redact import redact
from payrace.service.strategies import UnknownStrategy, resolve

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

    strategy: str | None  # the reference service's flow; None: for_update (refused with a profile)
    users: int
    spawn_rate: float
    run_time: str
    processes: int  # Locust's --processes
    workers: int | None  # the reference service's uvicorn workers; None: 1
    dsn: str | None  # None: the provider's first route that works
    locustfile: str
    out_dir: Path
    extra_args: Sequence[str]  # handed to Locust as they are
    durable: NotRequired[bool]  # keep fsync/synchronous_commit on a throwaway cluster
    # A running service instead of the reference one (docs/profile.md):
    profile: NotRequired[Path | None]  # its target profile
    target: NotRequired[str | None]  # overrides the profile's [target].base_url
    target_dsn: NotRequired[str | None]  # its own database, where the oracle watches
    gateway_url: NotRequired[str | None]  # the fake gateway it talks to (`payrace gateway`)
    expect: NotRequired[str | None]  # valid | violated; default: the profile's, else valid
    settle_s: NotRequired[float | None]  # the oracle's wait for the deadlock count to settle
    gates: NotRequired[Sequence[str]]  # `--gate` expressions (model.gates)
    baseline: NotRequired[Path | None]  # what '*baseline' gates compare with
    write_baseline: NotRequired[Path | None]  # where a valid run leaves its figures


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
    profile: Profile | None = None  # a running target; None: the reference service
    profile_path: Path | None = None
    target_dsn: str | None = None
    gateway_url: str | None = None
    expect: str | None = None
    settle_s: float | None = None
    gates: tuple[Gate, ...] = ()
    baseline: Baseline | None = None
    write_baseline: Path | None = None

    @classmethod
    def build(
        cls,
        *,
        strategy: str | None,
        users: int,
        spawn_rate: float,
        run_time: str,
        processes: int,
        workers: int | None,
        dsn: str | None,
        locustfile: str,
        out_dir: Path,
        extra_args: Sequence[str],
        durable: bool = False,
        profile: Path | None = None,
        target: str | None = None,
        target_dsn: str | None = None,
        gateway_url: str | None = None,
        expect: str | None = None,
        settle_s: float | None = None,
        gates: Sequence[str] = (),
        baseline: Path | None = None,
        write_baseline: Path | None = None,
    ) -> LoadPlan:
        running: Profile | None = None
        if profile is not None:
            running = _running_target(
                profile, strategy, workers, dsn, durable, target, target_dsn, gateway_url
            )
            name = running.name
        else:
            if target or target_dsn or gateway_url:
                raise UsageError(
                    "--target, --target-dsn and --gateway-url describe a running service: give "
                    "its --profile too (docs/profile.md); without one, payrace load starts the "
                    "reference service itself"
                )
            strategy = strategy or "for_update"
            try:
                resolve(strategy)  # a built-in name or package.module:Name
            except UnknownStrategy as exc:
                raise UsageError(f"--strategy: {exc}") from None
            name = strategy
        workers = 1 if workers is None else workers
        if expect not in (None, "valid", "violated"):
            raise UsageError(f"--expect must be valid or violated, got {expect!r}")
        if settle_s is not None and not 0 <= settle_s <= 600:
            raise UsageError("--settle-s must be between 0 and 600 seconds")
        if users < 1:
            raise UsageError(f"-u/--users {users}: need at least one user")
        if not spawn_rate > 0:
            raise UsageError(f"-r/--spawn-rate {spawn_rate}: must be > 0 users per second")
        if not 1 <= workers <= 32:
            raise UsageError(f"--workers {workers}: the service runs 1 to 32 uvicorn workers")
        parsed, base = _checked_gates(gates, name, baseline, write_baseline, running is not None)
        seconds = parse_run_time(run_time)
        if seconds <= 0:
            raise UsageError(f"-t/--run-time {run_time!r}: must be longer than zero")
        resolved = resolve_locustfile(locustfile)
        scenario = "+".join(Path(p).stem for p in resolved.split(","))
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run_id = f"{stamp}-load-{name}-{scenario}"
        if running is None:
            what = ["--strategy", name, "--workers", str(workers)]
        else:
            assert running.base_url is not None and target_dsn and gateway_url
            what = ["--profile", str(profile), "--target", running.base_url, "--target-dsn",
                    target_dsn, "--gateway-url", gateway_url]  # fmt: skip
            what += ["--expect", expect] if expect else []
        what += ["--settle-s", f"{settle_s:g}"] if settle_s is not None else []
        what += [arg for g in parsed for arg in ("--gate", g.expr)]
        what += ["--baseline", str(baseline)] if baseline is not None else []
        what += ["--write-baseline", str(write_baseline)] if write_baseline is not None else []
        args = [
            "payrace", "load", *what, "-u", str(users), "-r", f"{spawn_rate:g}",
            "-t", run_time, "--processes", str(processes),
            "--locustfile", locustfile, "--out", str(out_dir), *extra_args,
        ]  # fmt: skip
        return cls(
            strategy=name,
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
            # Passwords typed on the command line must not reach the reports CI uploads.
            command=redact(shlex.join(args)),
            extra_args=list(extra_args),
            durable=durable,
            profile=running,
            profile_path=profile,
            target_dsn=target_dsn,
            gateway_url=gateway_url.rstrip("/") if gateway_url else None,
            expect=expect,
            settle_s=settle_s,
            gates=tuple(parsed),
            baseline=base,
            write_baseline=write_baseline,
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

    def settings(self, gateway_url: str, database_url: str) -> LoadSettings:
        """What Locust's processes are told (worker.LoadSettings, through PAYRACE_* variables)."""
        return LoadSettings(
            gateway_url=gateway_url,
            database_url=database_url,
            report_dir=self.run_dir,
            run_id=self.run_id,
            command=self.command,
            seed=None,
            profile=self.profile_path,
            expect=self.expect,
            # The service payrace load started is stopped before the deadlock counter is
            # read again (_DeadlockReading), and that reading decides; the gate's own wait
            # could not settle it while the pool is open (idle backends flush 10 s late on
            # PostgreSQL 15+), so it reads at once: 2 s less per run. A running target's
            # last reading is the gate's, which waits it out (worker.RUNNING_TARGET_SETTLE_S).
            settle_s=self.settle_s if self.settle_s is not None or self.profile else 0.0,
            gates=tuple(g.expr for g in self.gates),
            baseline=self.baseline.path if self.baseline is not None else None,
        )

    def service_pool(self) -> dict[str, str]:
        # 90 connections in all, so even a server left at max_connections = 100 has room for
        # the oracle and a psql; the embedded and docker clusters allow 300.
        per_worker = max(2, 45 // self.workers)
        return {"DB_POOL_SIZE": str(per_worker), "DB_MAX_OVERFLOW": str(per_worker)}


def _running_target(
    path: Path,
    strategy: str | None,
    workers: int | None,
    dsn: str | None,
    durable: bool,
    target: str | None,
    target_dsn: str | None,
    gateway_url: str | None,
) -> Profile:
    """The profile read and checked, --target applied; options that act on the reference
    service payrace starts are refused, as `payrace run` refuses them, since a running
    target would silently ignore them."""
    profile = Profile.load(path).with_overrides(base_url=target)
    refused = {
        "--strategy": (strategy, "picks a flow of the reference service; a running target "
                       "runs its own: leave --strategy out (the run is named after the "
                       f"profile, {profile.name!r})"),
        "--workers": (workers, "sets the reference service's uvicorn workers; a running "
                      "target runs as it was started: leave --workers out"),
        "--dsn": (dsn, "picks the PostgreSQL server payrace provisions for the reference "
                  "service; a running target has its own database: give it as --target-dsn"),
        "--durable": (durable or None, "sets the throwaway cluster payrace provisions; a "
                      "running target's database is its own: leave --durable out"),
    }  # fmt: skip
    for flag, (value, why) in refused.items():
        if value is not None:
            raise UsageError(f"{flag} {why}")
    if profile.base_url is None:
        raise UsageError(f"{path} has no [target].base_url: add it, or give --target URL")
    if not target_dsn or not gateway_url:
        raise UsageError(
            "--profile needs --target-dsn (the target's own database, where the oracle "
            "installs its audit triggers) and --gateway-url (the fake gateway it talks to, "
            "e.g. one started with `payrace gateway --profile`)"
        )
    if urlsplit(gateway_url).scheme not in ("http", "https"):
        raise UsageError(
            f"--gateway-url must be a URL like http://127.0.0.1:9411, got {gateway_url!r}"
        )
    return profile


def _checked_gates(
    exprs: Sequence[str],
    name: str,
    baseline: Path | None,
    write_baseline: Path | None,
    running: bool,
) -> tuple[list[Gate], Baseline | None]:
    """--gate, --baseline and --write-baseline checked as `payrace run` checks them: a gate
    naming a strategy this run does not race, or a baseline gate without its baseline, is
    refused before anything starts. A running target's name is its profile's."""
    gates = [Gate.parse(expr) for expr in exprs]
    base = Baseline.load(baseline) if baseline is not None else None
    check_gates(
        gates, [name], known=list(DECLARED), baseline=base, mode="load", profile_named=running
    )
    if write_baseline is not None and write_baseline.is_dir():
        raise UsageError(f"--write-baseline {write_baseline} is a directory; name a file")
    return gates, base


# -- the run -----------------------------------------------------------------------------


def load_main(console: Console, quiet: bool = False, **args: Unpack[LoadArgs]) -> int:
    """`payrace load`; see the module docstring. Returns the process exit code. quiet: Locust's
    own output goes to locust.log only."""
    try:
        plan = LoadPlan.build(**args)
    except UsageError as exc:
        console.print(f"[bold red]payrace load:[/] {escape(str(exc))}")
        return EXIT_ERROR
    run_dir = claim_run_dir(plan.run_dir.parent, plan.run_id)  # never another run's directory
    plan = replace(plan, run_dir=run_dir, run_id=run_dir.name)
    try:
        with _sigterm_as_interrupt():
            return _run(plan, console, quiet)
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
    except (UsageError, ProviderError, watched.OracleError) as exc:
        console.print(f"[bold red]payrace load:[/] {escape(str(exc))}")
        return EXIT_ERROR
    except (OSError, TimeoutError, RuntimeError, psycopg.Error) as exc:
        problem = f"infrastructure error: {type(exc).__name__}: {exc}"
        console.print(f"[bold red]payrace load:[/] {escape(problem)}")
        return EXIT_ERROR


def _run(plan: LoadPlan, console: Console, quiet: bool = False) -> int:
    if plan.profile is not None:
        return _run_profile(plan, plan.profile, console, quiet)

    def say(line: str) -> None:
        console.print(line, highlight=False, markup=False)

    def echo(line: str) -> None:
        if not quiet:
            console.out(line, highlight=False)

    deadlocks = _DeadlockReading(plan.run_dir)
    with ExitStack() as stack:
        db = stack.enter_context(provide_postgres(plan.dsn, durable=plan.durable, announce=say))
        # Unwound after the service (registered before it), while PostgreSQL still runs.
        stack.callback(deadlocks.read, db.url)
        gateway = stack.enter_context(GatewayServer(FakeRazorpay(Profile.reference().keys)))
        env = {
            **service_env(db, gateway.url, plan.strategy, keys=gateway.fake.keys),
            **plan.service_pool(),
            # Its reconciler sweeps soon enough for the gate's window (load.gate), unless the
            # environment sets its cadence (RECONCILE_INTERVAL_S=0: off).
            **http_sweep_env(),
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
        settings = plan.settings(gateway.url, db.url)
        locust_env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
        locust = LocustProcess(
            plan.locust_cmd(service.url), locust_env, plan.run_dir / "locust.log", echo
        )
        stack.enter_context(locust)
        with _cpu_sampler(locust, service.proc.pid if service.proc else None, db) as sampler:
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
        settle_deadlocks(summary, *deadlocks.reading, gates=plan.gates, baseline=plan.baseline)
    if deadlocks.problem:
        summary.setdefault("problems", []).append(deadlocks.problem)
    return _finish_reports(summary, db, plan, console, sampler.result(), code)


def _run_profile(plan: LoadPlan, profile: Profile, console: Console, quiet: bool = False) -> int:
    """A running target: check what the user started answers, install the oracle in its
    database, run Locust against it; nothing else is started, so nothing else is stopped."""
    assert profile.base_url is not None and plan.target_dsn and plan.gateway_url
    _answers(profile.base_url, "--target", "start your service first", profile.verify_tls)
    _answers(
        f"{plan.gateway_url}/_fake/counters",
        "--gateway-url",
        "start one with `payrace gateway --profile`",
    )
    try:
        oracle.install(plan.target_dsn, profile.oracle)
    except psycopg.OperationalError as exc:
        raise UsageError(f"cannot connect to --target-dsn: {str(exc).strip()}") from None
    except (watched.OracleError, psycopg.Error) as exc:
        raise UsageError(f"cannot install the oracle's audit triggers: {exc}") from None
    console.print(
        f"payrace load: target {profile.base_url} ({profile.name}, {profile.source}), fake "
        f"gateway {plan.gateway_url}, reports in {plan.run_dir}",
        highlight=False,
        markup=False,
    )
    settings = plan.settings(plan.gateway_url, plan.target_dsn)
    locust_env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    with LocustProcess(
        plan.locust_cmd(profile.base_url.rstrip("/")),
        locust_env,
        plan.run_dir / "locust.log",
        (lambda line: None) if quiet else (lambda line: console.out(line, highlight=False)),
    ) as locust:
        with _cpu_sampler(locust, None, None) as sampler:
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
    return _finish_reports(summary, None, plan, console, sampler.result(), code)


def _answers(url: str, flag: str, hint: str, verify_tls: bool = True) -> None:
    """A running target or gateway that is down is a setup mistake: said before Locust
    starts, not found out as a run of failed requests. Any HTTP answer means it is up."""
    try:
        httpx.get(url, timeout=5.0, verify=verify_tls)
    except httpx.HTTPError as exc:
        raise UsageError(
            f"nothing answers at {flag} {url} ({type(exc).__name__}: {exc}); {hint}"
        ) from None


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


def _cpu_sampler(locust: LocustProcess, service: int | None, db: Database | None) -> CpuSampler:
    """Locust and the service are whole process groups (workers included); PostgreSQL is
    the postmaster and its children; payrace itself runs the fake gateway's thread. A running
    target's service, database and gateway are not payrace's: only Locust is sampled then."""
    groups: dict[str, Member] = {"locust": in_group(locust.pid)}
    if service is None or db is None:
        return CpuSampler(groups)
    payrace = os.getpid()
    groups["service"] = in_group(service)
    groups["payrace (fake gateway)"] = lambda proc, _: proc.pid == payrace
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


def _redact_file(path: Path) -> None:
    """Locust's own reports repeat its host and command line: passwords out, as in ours."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    clean = redact(text)
    if clean != text:
        path.write_text(clean, encoding="utf-8")


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
    locust_page = plan.run_dir / "locust.html"
    if locust_page.exists():
        # Relative: the run directory is moved as a whole (a CI artefact), links and all.
        summary["locust"]["html"] = locust_page.name
    paths = write_all(summary, plan.run_dir)
    if locust_page.exists() and not mark_locust_report(locust_page, summary):
        console.print(f"[yellow]note:[/] {locust_page} has no <body>: no verdict added to it")
    for name in ("locust.html", "locust_stats.csv", "latency_hdr.json", "locust.log"):
        if (plan.run_dir / name).exists():
            paths[name] = plan.run_dir / name
            _redact_file(plan.run_dir / name)
    render_console(summary, console, paths)
    console.print(load_table(summary))
    mistakes = summary.get("setup_errors") or []
    for problem in summary.get("problems") or []:
        if problem not in mistakes:
            console.print(f"[yellow]note:[/] {escape(str(problem))}", highlight=False)
    if plan.write_baseline is not None and locust_code is not None:  # not from a cut-short run
        console.print(write_baseline(summary, plan.write_baseline), highlight=False, markup=False)
    # Last but the reports line, where the eye lands: what to fix before the run can say
    # anything about the target.
    for mistake in mistakes:
        console.print(
            f"[bold red]payrace load: setup mistake:[/] {escape(str(mistake))}", highlight=False
        )
    render_reports_line(console, plan.run_dir)
    return int(summary.get("exit_code", EXIT_ERROR))


_MARK_START, _MARK_END = "<!-- payrace verdict -->", "<!-- /payrace verdict -->"
_MARKED = re.compile(re.escape(_MARK_START) + ".*?" + re.escape(_MARK_END), re.DOTALL)


def mark_locust_report(page: Path, summary: Mapping[str, Any]) -> bool:
    """Put the oracle's verdict, each strategy's outcome and a link to report.html at the top
    of Locust's HTML report, after Locust wrote it; False if the page has no <body>.

    Why after the fact: Locust writes `--html` once its `quitting` listeners (where the gate
    judges) have run, from a fixed template and arguments no listener can extend; its web-UI
    extension hooks serve the live UI only, not this file. The page is a React app rendering
    into <div id="root">, so a static block placed right after <body> sits beside it, needs
    no script, and depends on nothing but the page having a body. A second call replaces the
    block (the marks), so the verdict is always the final one."""
    text = _MARKED.sub("", page.read_text(encoding="utf-8"))
    at = _body_end(text)
    if at is None:
        return False
    verdict = str(summary.get("verdict", "unknown"))
    ok = verdict == "valid"
    color, background = ("#176b2c", "#e8f5ec") if ok else ("#b3261e", "#fdecea")
    outcomes = "; ".join(
        f"{html.escape(name)}: {html.escape(outcome(s).label)}"
        for name, s in strategies_of(summary).items()
    )
    block = (
        f'{_MARK_START}<div id="payrace-verdict" style="font-family:system-ui,sans-serif;'
        f"font-size:15px;padding:10px 16px;color:{color};background:{background};"
        f'border-bottom:3px solid {color}"><b>payrace oracle: {html.escape(verdict)}</b> '
        f"(exit code {html.escape(str(summary.get('exit_code', '?')))})"
        + (f" &middot; {outcomes}" if outcomes else "")
        + ' &middot; <a href="report.html">payrace report (invariants, lock waits)</a>'
        f"</div>{_MARK_END}"
    )
    write_atomically(page, text[:at] + block + text[at:])
    return True


class _BodyFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.at: tuple[int, int, int] | None = None  # line, column, length of <body ...>

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body" and self.at is None:
            line, column = self.getpos()
            self.at = (line, column, len(self.get_starttag_text() or ""))


def _body_end(text: str) -> int | None:
    """Where the <body> start tag ends, as an HTML parser reads the page: Locust's minified
    scripts in <head> contain the string "<body" too, which a parser knows is script text."""
    finder = _BodyFinder()
    finder.feed(text)
    finder.close()
    if finder.at is None:
        return None
    line, column, length = finder.at
    offset = 0
    for _ in range(line - 1):  # the parser counts lines by "\n" only (not str.splitlines)
        offset = text.index("\n", offset) + 1
    return offset + column + length


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
            if not a.get("count"):
                return NOT_MEASURED
            return f"{number(a.get('p50'))}/{number(a.get('p99'))}"

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
