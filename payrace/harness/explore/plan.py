"""What a command asks the explorer for, and running it: plan, execute, report.

    Plan            one exploration: a scenario (explore.scenario) and, optionally, a replay id
    make_plan()     a scenario file, a replay id, or the command line's words -> a Plan;
                    usage mistakes raise ScenarioError
    execute()       a Plan -> ExploreResult (explore.findings): starts an Explorer
                    (explore.engine), runs the plan's mode, judges
    explore_main()  `payrace explore` (payrace.harness.cli): provision PostgreSQL and the fake
                    gateway, execute, write the reports, print, exit code
    write_reports() summary.json, junit.xml, report.html (payrace.harness.reports), explore.txt
                    (the golden text), timeline.html; history.jsonl when given a history

The modes: exhaustive (every schedule, equivalent ones collapsed), pct (seeded PCT runs after
a pilot that measures k), schedules (the scenario's explicit schedules), replay (one id).
tools/bench_explore.py times execute() for the benchmarks in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.text import Text

from payrace.harness.explore.engine import Explorer
from payrace.harness.explore.findings import EXIT_ERROR, ExploreResult, ScheduleRun
from payrace.harness.explore.policies import PctBound
from payrace.harness.explore.scenario import (
    ExplicitSchedule,
    Scenario,
    ScenarioError,
    ScheduleRef,
    load_scenario,
    normalise_isolation,
    parse_requests,
    parse_schedule_id,
)
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.provider import Database, ProviderError, provide_postgres
from payrace.harness.model import watched
from payrace.harness.model.history import History
from payrace.harness.reports.writers import write_all
from payrace.service.capture import STRATEGIES


@dataclass(frozen=True)
class Plan:
    """One exploration: a scenario file, a replay id, or the command line's words."""

    scenario: Scenario
    replay: ScheduleRef | None = None


def make_plan(
    *,
    strategy: str,
    requests: Sequence[str],
    isolation: str,
    pct_runs: int | None,
    depth: int,
    seed: int,
    replay: str | None,
    scenario: Path | None,
) -> Plan:
    if replay and scenario:
        raise ScenarioError("give either --replay ID or --scenario FILE, not both")
    if scenario is not None:
        return Plan(load_scenario(scenario, strategies=list(STRATEGIES)))
    if replay:
        ref = parse_schedule_id(replay)
        strategy, isolation, requests = ref.strategy, ref.isolation, list(ref.requests)
    if strategy not in STRATEGIES:
        raise ScenarioError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if depth < 1 or depth > 10:
        raise ScenarioError("--depth must be between 1 and 10")
    if pct_runs is not None and not 1 <= pct_runs <= 1_000_000:
        raise ScenarioError("--pct must be between 1 and 1000000 runs")
    specs = parse_requests(requests)
    mode = (
        "schedules"
        if replay
        else ("pct" if pct_runs is not None or len(specs) > 2 else "exhaustive")
    )
    sc = Scenario(
        name=f"{strategy} at {normalise_isolation(isolation)}",
        strategy=strategy,
        isolation=normalise_isolation(isolation),
        requests=tuple(s.kind.token for s in specs),
        mode=mode,  # type: ignore[arg-type]
        pct_runs=pct_runs or 0,
        depth=depth,
        seed=seed,
        specs=specs,
    )
    return Plan(sc, parse_schedule_id(replay) if replay else None)


async def execute(
    plan: Plan,
    db: Database,
    fake: FakeRazorpay,
    gateway_url: str,
    *,
    on_start: Callable[[str, int | None], None] = lambda text, total: None,
    on_run: Callable[[ScheduleRun], None] = lambda r: None,
    poll_s: float = 0.002,
) -> ExploreResult:
    sc = plan.scenario
    explorer = Explorer(
        db,
        fake,
        gateway_url,
        strategy=sc.strategy,
        isolation=sc.isolation,
        requests=sc.specs,
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
    )


async def _explicit(explorer: Explorer, schedule: ExplicitSchedule) -> ScheduleRun:
    if schedule.id is not None:
        return await explorer.replay(
            parse_schedule_id(schedule.id), name=schedule.name, expect=schedule.expect
        )
    return await explorer.run_steps(schedule.steps, name=schedule.name, expect=schedule.expect)


def explore_main(
    strategy: str,
    requests: list[str],
    isolation: str,
    pct_runs: int | None,
    depth: int,
    seed: int,
    replay: str | None,
    scenario: Path | None,
    dsn: str | None,
    out_dir: Path,
    console: Console,
    durable: bool = False,
) -> int:
    """`payrace explore`: 0 clean (or as the scenario expects), 1 violation, 2 usage or
    infrastructure error (the message says what to do)."""
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
        )
    except ScenarioError as exc:
        console.print(Text(f"payrace explore: {exc}", style="bold red"))
        return EXIT_ERROR
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
    )
    task = progress.add_task("starting", total=None, found="")
    found = Counter[str]()

    def on_start(text: str, total: int | None) -> None:
        progress.update(task, description=text, total=total, completed=0)

    def on_run(run: ScheduleRun) -> None:
        found["waiting"] += bool(run.waits)
        progress.update(task, advance=1, found=f"{found['waiting']} waited")

    try:
        with provide_postgres(
            dsn, durable=durable, announce=lambda line: console.print(Text(line))
        ) as db:
            fake = FakeRazorpay(GatewayKeys(), seed=seed)
            with GatewayServer(fake) as server, progress:
                result = asyncio.run(
                    execute(plan, db, fake, server.url, on_start=on_start, on_run=on_run)
                )
            database = {
                "route": db.route,
                "server_version": db.server_version,
                "fast": db.fast,
                "describe": db.describe(),
            }
    except KeyboardInterrupt:
        console.print(
            Text(
                "payrace explore: interrupted; everything it started was stopped", style="bold red"
            )
        )
        return EXIT_ERROR
    except ProviderError as exc:
        console.print(Text(f"payrace explore: {exc}", style="bold red"))
        return EXIT_ERROR
    except ScenarioError as exc:
        console.print(Text(f"payrace explore: {exc}", style="bold red"))
        return EXIT_ERROR
    except (OSError, TimeoutError, RuntimeError, watched.OracleError, asyncpg.PostgresError) as exc:
        console.print(
            Text(
                f"payrace explore: infrastructure error: {type(exc).__name__}: {exc}; check that "
                "PostgreSQL is reachable (--dsn) and that nothing else holds the tables' locks",
                style="bold red",
            )
        )
        return EXIT_ERROR
    out = out_dir / run_id
    write_reports(result, out, command=command, run_id=run_id, database=database,
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
