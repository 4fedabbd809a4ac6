"""What a command asks the explorer for, and running it: plan, execute, report.

    Plan            one exploration: a scenario (explore.scenario), optionally a replay id,
                    and for a team's app its `--app module:factory` and profile
    make_plan()     a scenario file, a replay id, or the command line's words -> a Plan;
                    usage mistakes raise ScenarioError (UsageError for the profile)
    execute()       a Plan -> ExploreResult (explore.findings): starts an Explorer
                    (explore.engine) on the reference service or the app (explore.app),
                    runs the plan's mode, judges
    explore_main()  `payrace explore` (payrace.harness.cli): provision PostgreSQL (or take
                    the app's own, --target-dsn) and the fake gateway, execute, write the
                    reports, print, exit code
    write_reports() summary.json, junit.xml, report.html (payrace.harness.reports), explore.txt
                    (the golden text), timeline.html; history.jsonl when given a history

The modes: exhaustive (every schedule, equivalent ones collapsed), pct (seeded PCT runs after
a pilot that measures k), schedules (the scenario's explicit schedules), replay (one id). An
app is explored from the command line's words (exhaustive, pct, replay); scenario files
name the reference service's strategies and pause points.

The database of an app. Without --target-dsn payrace provisions a throwaway database as for
every run (--dsn / PAYRACE_DSN names a server to create it on, else Docker, else
embedded) and hands its URL to the app (PAYRACE_TARGET_DSN, explore.app). --target-dsn
names a database the app already uses (the same flag as `payrace run --target URL`): it is
used as it is, nothing created or dropped, the oracle's triggers installed in it — and it
must serve nothing else while the explorer runs, since every backend in it that waits for
a lock is taken for one of the schedule's requests (explore.waits).
tools/bench_explore.py times execute() for the benchmarks in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.text import Text

from payrace.harness.errors import UsageError
from payrace.harness.explore.app import AppTarget
from payrace.harness.explore.engine import Explorer
from payrace.harness.explore.findings import EXIT_ERROR, ExploreResult, ScheduleRun
from payrace.harness.explore.policies import PctBound
from payrace.harness.explore.scenario import (
    APP_ISOLATION,
    ExplicitSchedule,
    Scenario,
    ScenarioError,
    ScheduleRef,
    app_name,
    load_scenario,
    normalise_isolation,
    parse_requests,
    parse_schedule_id,
)
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra import loop
from payrace.harness.infra.provider import Database, ProviderError, provide_postgres
from payrace.harness.model import watched
from payrace.harness.model.history import History
from payrace.harness.model.profile import Profile
from payrace.harness.reports.writers import claim_run_dir, write_all
from payrace.postgres import DsnError, libpq_url
from payrace.service.strategies import STRATEGIES, UnknownStrategy, resolve


@dataclass(frozen=True)
class Plan:
    """One exploration: a scenario file, a replay id, or the command line's words; for a
    team's app, its factory (`module:factory`) and profile too."""

    scenario: Scenario
    replay: ScheduleRef | None = None
    app: str | None = None
    profile: Profile | None = None

    def replay_command(self) -> str:
        if self.app is None or self.profile is None:
            return "payrace explore"
        return shlex.join(
            ["payrace", "explore", "--app", self.app, "--profile", self.profile.source]
        )


def make_plan(
    *,
    strategy: str | None,
    requests: Sequence[str],
    isolation: str | None,
    pct_runs: int | None,
    depth: int,
    seed: int,
    replay: str | None,
    scenario: Path | None,
    app: str | None = None,
    profile: Path | None = None,
) -> Plan:
    if replay and scenario:
        raise ScenarioError("give either --replay ID or --scenario FILE, not both")
    if app is not None or profile is not None:
        return _app_plan(strategy, requests, isolation, pct_runs, depth, seed, replay, scenario,
                         app, profile)  # fmt: skip
    if scenario is not None:
        return Plan(load_scenario(scenario, strategies=list(STRATEGIES)))
    strategy, isolation = strategy or "for_update", isolation or "READ COMMITTED"
    if replay:
        ref = parse_schedule_id(replay)
        if ref.isolation == APP_ISOLATION:
            raise ScenarioError(
                f"{replay} is the id of an app's schedule: replay it with the same "
                "--app module:factory --profile FILE it was found with"
            )
        strategy, isolation, requests = ref.strategy, ref.isolation, list(ref.requests)
    try:
        resolve(strategy)
    except UnknownStrategy as exc:
        raise ScenarioError(str(exc)) from None
    if depth < 1 or depth > 10:
        raise ScenarioError("--depth must be between 1 and 10")
    if pct_runs is not None and not 1 <= pct_runs <= 1_000_000:
        raise ScenarioError("--pct must be between 1 and 1000000 runs")
    specs = parse_requests(requests)
    sc = Scenario(
        name=f"{strategy} at {normalise_isolation(isolation)}",
        strategy=strategy,
        isolation=normalise_isolation(isolation),
        requests=tuple(s.kind.token for s in specs),
        mode=_mode(replay, pct_runs, len(specs)),
        pct_runs=pct_runs or 0,
        depth=depth,
        seed=seed,
        specs=specs,
    )
    return Plan(sc, parse_schedule_id(replay) if replay else None)


def _mode(replay: str | None, pct_runs: int | None, requests: int) -> Any:
    if replay:
        return "schedules"
    return "pct" if pct_runs is not None or requests > 2 else "exhaustive"


def _app_plan(
    strategy: str | None,
    requests: Sequence[str],
    isolation: str | None,
    pct_runs: int | None,
    depth: int,
    seed: int,
    replay: str | None,
    scenario: Path | None,
    app: str | None,
    profile_path: Path | None,
) -> Plan:
    """`--app module:factory --profile FILE`: the app's own flow, named after its profile."""
    if app is None or profile_path is None:
        raise UsageError(
            "--app and --profile go together: --app module:factory builds your ASGI app, "
            "--profile FILE says its routes, bodies, keys and oracle tables (docs/profile.md); "
            "a service that is already running is raced with `payrace run --profile`"
        )
    for flag, value in (("--strategy", strategy), ("--isolation", isolation)):
        if value is not None:
            raise UsageError(
                f"{flag} sets up the reference service; an app runs its own flow at its own "
                f"isolation level: leave {flag} out with --app"
            )
    if scenario is not None:
        raise UsageError(
            "scenario files name the reference service's strategies and pause points; with "
            "--app give --requests (and --pct or --replay)"
        )
    profile = Profile.load(profile_path)
    name = app_name(profile.name)
    if depth < 1 or depth > 10:
        raise ScenarioError("--depth must be between 1 and 10")
    if pct_runs is not None and not 1 <= pct_runs <= 1_000_000:
        raise ScenarioError("--pct must be between 1 and 1000000 runs")
    ref = None
    if replay:
        ref = parse_schedule_id(replay)
        if (ref.strategy, ref.isolation) != (name, APP_ISOLATION):
            raise ScenarioError(
                f"{replay} was not found against this app (its ids start {name}.app.): "
                "replay an id with the --app and --profile it was found with"
            )
        requests = list(ref.requests)
    specs = parse_requests(requests)
    sc = Scenario(
        name=f"{profile.name} ({app})",
        strategy=name,
        isolation=APP_ISOLATION,
        requests=tuple(s.kind.token for s in specs),
        mode=_mode(replay, pct_runs, len(specs)),
        pct_runs=pct_runs or 0,
        depth=depth,
        seed=seed,
        specs=specs,
        expect=profile.expect,  # type: ignore[arg-type]  # checked by Profile.load
    )
    return Plan(sc, ref, app=app, profile=profile)


async def execute(
    plan: Plan,
    db: Database | str,
    fake: FakeRazorpay,
    gateway_url: str,
    *,
    on_start: Callable[[str, int | None], None] = lambda text, total: None,
    on_run: Callable[[ScheduleRun], None] = lambda r: None,
    poll_s: float = 0.002,
) -> ExploreResult:
    sc = plan.scenario
    target = None
    if plan.app is not None:
        assert plan.profile is not None
        target = AppTarget(plan.app, plan.profile)
    explorer = Explorer(
        db,
        fake,
        gateway_url,
        strategy=sc.strategy,
        isolation=sc.isolation,
        requests=sc.specs,
        target=target,
        bound_s=sc.bound_s,
        poll_s=poll_s,
        reduce=sc.reduce,
    )
    complete = True
    bound = None
    notes: list[str] = []
    async with explorer:
        started = time.perf_counter()  # the exploration itself: service start excluded
        if plan.replay is not None:
            on_start("replay", 1)
            on_run(await explorer.replay(plan.replay, name="replay"))
        elif sc.mode == "schedules":
            on_start("explicit schedules", len(sc.schedules))
            for schedule in sc.schedules:
                on_run(await _explicit(explorer, schedule))
        elif sc.mode == "exhaustive":
            on_start("every schedule", None)
            complete = await explorer.exhaustive(limit=sc.max_schedules, on_run=on_run)
            if not complete:
                notes.append(f"stopped after {len(explorer.runs)} schedules (max_schedules)")
        else:
            on_start("PCT pilot runs", None)
            k = await explorer.pilot(on_run)
            probe = PctBound(len(sc.specs), k, sc.depth)
            runs = sc.pct_runs or min(probe.runs_for(sc.confidence), 2000)
            if not sc.pct_runs:
                notes.append(
                    f"--pct not given: running {runs} runs "
                    f"({probe.runs_for(sc.confidence)} needed for {sc.confidence:.0%} confidence)"
                )
            on_start("PCT runs", runs)
            bound = await explorer.pct(runs, sc.depth, sc.seed, k=k, on_run=on_run)
            biggest = max((len(r.choices) for r in explorer.runs), default=0)
            if biggest > k:
                notes.append(
                    f"a run took {biggest} steps, more than k={k}: the bound is approximate"
                )
        duration = time.perf_counter() - started
    verdict = await asyncio.to_thread(explorer.judge)
    return ExploreResult(
        title=f"scenario {sc.name}" + (f": {sc.description}" if sc.description else ""),
        strategy=sc.strategy,
        isolation=sc.isolation,
        specs=sc.specs,
        mode="replay" if plan.replay else sc.mode,
        runs=explorer.runs,
        verdict=verdict,
        duration_s=duration,
        complete=complete,
        bound=bound,
        confidence=sc.confidence,
        scenario=sc if sc.path is not None else None,
        notes=notes,
        app=plan.app,
        points=explorer.points,
        replay_command=plan.replay_command(),
        declared=plan.profile.expect if plan.profile is not None else None,
    )


async def _explicit(explorer: Explorer, schedule: ExplicitSchedule) -> ScheduleRun:
    if schedule.id is not None:
        return await explorer.replay(
            parse_schedule_id(schedule.id), name=schedule.name, expect=schedule.expect
        )
    return await explorer.run_steps(schedule.steps, name=schedule.name, expect=schedule.expect)


def explore_main(
    strategy: str | None,
    requests: list[str],
    isolation: str | None,
    pct_runs: int | None,
    depth: int,
    seed: int,
    replay: str | None,
    scenario: Path | None,
    dsn: str | None,
    out_dir: Path,
    console: Console,
    durable: bool = False,
    app: str | None = None,
    profile: Path | None = None,
    target_dsn: str | None = None,
    quiet: bool = False,
) -> int:
    """`payrace explore`: 0 clean (or as the scenario expects), 1 violation, 2 usage or
    infrastructure error (the message says what to do)."""

    def fail(message: str) -> int:
        console.print(Text(f"payrace explore: {message}", style="bold red"))
        return EXIT_ERROR

    try:
        plan = make_plan(
            strategy=strategy,
            requests=requests,
            isolation=isolation,
            pct_runs=pct_runs,
            depth=depth,
            seed=seed,
            replay=replay,
            scenario=scenario,
            app=app,
            profile=profile,
        )
        if target_dsn is not None:
            if plan.app is None:
                raise UsageError(
                    "--target-dsn is the database of your app (with --app); the reference "
                    "service gets a fresh one: use --dsn to name the server it is created on"
                )
            target_dsn = libpq_url(target_dsn)
    except (ScenarioError, UsageError, DsnError) as exc:
        return fail(str(exc))
    command = shlex.join(["payrace", *sys.argv[1:]]) if sys.argv[1:] else "payrace explore"
    started_at = datetime.now(UTC)
    sc = plan.scenario
    run_id = f"{started_at:%Y%m%d-%H%M%S}-{sc.strategy}-explore"
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        MofNCompleteColumn(),
        TextColumn("{task.fields[found]}"),
        console=console,
        transient=True,
        disable=quiet,
    )
    task = progress.add_task("starting", total=None, found="")
    found = Counter[str]()

    def on_start(text: str, total: int | None) -> None:
        progress.update(task, description=text, total=total, completed=0)

    def on_run(run: ScheduleRun) -> None:
        found["waiting"] += bool(run.waits)
        progress.update(task, advance=1, found=f"{found['waiting']} waited")

    keys = plan.profile.keys if plan.profile is not None else GatewayKeys()
    try:
        with ExitStack() as stack:
            db: Database | str
            if target_dsn is not None:
                db = target_dsn
                database: dict[str, Any] = {
                    "route": "target",
                    "describe": "the app's own database (--target-dsn), used as it is",
                }
            else:
                db = stack.enter_context(
                    provide_postgres(
                        dsn, durable=durable, announce=lambda line: console.print(Text(line))
                    )
                )
                database = {
                    "route": db.route,
                    "server_version": db.server_version,
                    "fast": db.fast,
                    "describe": db.describe(),
                }
            fake = FakeRazorpay(keys, seed=seed)
            server = stack.enter_context(GatewayServer(fake))
            with progress:
                result = loop.run(
                    execute(plan, db, fake, server.url, on_start=on_start, on_run=on_run)
                )
    except KeyboardInterrupt:
        return fail("interrupted; everything it started was stopped")
    except (ProviderError, ScenarioError, UsageError) as exc:
        return fail(str(exc))
    except (OSError, TimeoutError, RuntimeError, watched.OracleError, asyncpg.PostgresError) as exc:
        where = "--target-dsn" if target_dsn is not None else "--dsn"
        return fail(
            f"infrastructure error: {type(exc).__name__}: {exc}; check that PostgreSQL is "
            f"reachable ({where}) and that nothing else holds the tables' locks"
        )
    out = claim_run_dir(out_dir, run_id)  # never another run's directory
    write_reports(result, out, command=command, run_id=out.name, database=database,
                  started_at=started_at.isoformat(timespec="seconds"))  # fmt: skip
    result.render(console, out)
    return result.exit_code()


def write_reports(
    result: ExploreResult,
    out: Path,
    *,
    command: str,
    run_id: str,
    database: dict[str, Any],
    started_at: str,
    history: History | None = None,
) -> dict[str, Path]:
    """summary.json / junit.xml / report.html (reports.writers), explore.txt, timeline.html."""
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary(
        command=command, run_id=run_id, database=database, started_at=started_at
    )
    written = write_all(summary, out)
    (out / "explore.txt").write_text(result.golden(), encoding="utf-8")
    (out / "timeline.html").write_text(result.html_fragment() + "\n", encoding="utf-8")
    written |= {"explore": out / "explore.txt", "timeline": out / "timeline.html"}
    if history is not None:
        history.to_jsonl(out / "history.jsonl")
    return written


__all__ = ["Plan", "execute", "explore_main", "make_plan", "write_reports"]
