"""The deterministic interleaving explorer: every schedule of the capture path's pause points.

    Explorer        an in-process service + oracle for one strategy / isolation / requests
    ├── run()           one schedule under a policy of harness.explore.scheduler, on a fresh payment
    ├── exhaustive()    every schedule (depth-first, re-executing from a fresh payment)
    ├── pilot(), pct()  PCT: k from each request running alone, then seeded runs
    ├── run_steps()     an explicit schedule ("client:payment_read", "webhook-1:end", ...)
    ├── replay()        exactly the schedule an id names
    └── judge()         oracle + checkers (model.oracle, model.checker), per schedule too
    Plan, make_plan() a scenario file, a replay id, or the command line's words
    execute()       a Plan -> ExploreResult (payrace.harness.explore.findings)
    explore_main()  `payrace explore`: provision PostgreSQL and the fake gateway, run, report
    write_reports() summary.json, junit.xml, report.html, explore.txt, timeline.html
    pause_overhead()  what a pause point costs without a controller (python -m ...engine)

Who does what: harness.explore.scheduler decides which request moves next and reads lock waits from
PostgreSQL (the step model, the reduction, PCT); this module owns the service, the payments
and the oracle around it; harness.explore.findings adds the schedules up, compares them with what
the scenario expected, and draws them.
"""

from __future__ import annotations

import asyncio
import random
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.text import Text
from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext

from payrace.harness.explore.findings import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_VIOLATED,
    ExploreResult,
    ScheduleRun,
)
from payrace.harness.explore.scenario import (
    ExplicitSchedule,
    RequestSpec,
    Scenario,
    ScenarioError,
    ScheduleRef,
    StepSpec,
    load_scenario,
    normalise_isolation,
    parse_requests,
    parse_schedule_id,
)
from payrace.harness.explore.scheduler import (
    Pct,
    PctBound,
    Policy,
    Prefix,
    ScheduledRequest,
    ScheduleError,
    Scheduler,
    Steps,
    blocking_pids,
    next_prefix,
)
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.provider import Database, ProviderError, provide_postgres
from payrace.harness.model import checker, oracle
from payrace.harness.model.client import AsgiClient, PaymentContext, Reply, prepare
from payrace.harness.model.history import History, Operation, classify
from payrace.service import probes
from payrace.service.app import Runtime, create_app
from payrace.service.capture import STRATEGIES
from payrace.service.settings import Settings

APPLICATION_NAME = "payrace-explore"  # oracle.observe() does not wait for harness connections


# -- the explorer -----------------------------------------------------------------------------


class Explorer:
    """One in-process reference service (strategy, isolation) and the oracle, for many
    schedules of one list of requests; every schedule gets a new order and payment."""

    def __init__(
        self,
        db: Database,
        fake: FakeRazorpay,
        gateway_url: str,
        *,
        strategy: str,
        isolation: str,
        requests: Sequence[RequestSpec],
        bound_s: float = 5.0,
        poll_s: float = 0.002,
        reduce: bool = True,
        amount: int = 50_000,
        keys: GatewayKeys = GatewayKeys(),
    ) -> None:
        if strategy not in STRATEGIES:
            raise ScenarioError(
                f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}"
            )
        self.db = db
        self.fake = fake
        self.gateway_url = gateway_url
        self.strategy = strategy
        self.isolation = normalise_isolation(isolation)
        self.specs = tuple(requests)
        self.bound_s = bound_s
        self.poll_s = poll_s
        self.reduce = reduce
        self.amount = amount
        self.keys = keys
        self.history = History(strategy=strategy)
        self.runs: list[ScheduleRun] = []
        # Whether the payment read takes a lock: FOR UPDATE, or the advisory lock before it.
        # A strategy this table does not know is assumed to lock (the guard tells if not).
        chosen = STRATEGIES[strategy]
        self.lock_rows = bool(
            getattr(chosen, "lock_rows", True) or getattr(chosen, "advisory", False)
        )
        self._active: Scheduler | None = None
        self._stock: list[PaymentContext] = []
        self._runtime: Runtime | None = None
        self._client: AsgiClient | None = None
        self._conn: Any = None
        self._baseline: oracle.Baseline | None = None
        self.observation: oracle.Observation | None = None

    async def __aenter__(self) -> Explorer:
        settings = Settings(
            database_url=self.db.asyncpg_url(),
            capture_strategy=self.strategy,
            isolation_level=self.isolation,
            razorpay_key_id=self.keys.key_id,
            razorpay_key_secret=self.keys.key_secret,
            razorpay_webhook_secret=self.keys.webhook_secret,
            razorpay_base_url=self.gateway_url,
            db_pool_size=10,
        )
        app = create_app(settings)
        self._runtime = app.state.runtime
        try:
            await self._runtime.startup()
            self._client = AsgiClient(app)
            # The oracle needs the tables, which startup() just created.
            await asyncio.to_thread(oracle.install, self.db.url)
            self._baseline = await asyncio.to_thread(oracle.baseline, self.db.url)
            self._conn = await asyncpg.connect(
                self.db.url, server_settings={"application_name": APPLICATION_NAME}
            )
            engine = self._runtime.engine.sync_engine
            event.listen(engine, "before_cursor_execute", self._on_statement)
            event.listen(engine, "commit", self._on_commit)
            event.listen(engine, "handle_error", self._on_error)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._active is not None:
            await self._active.close()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._runtime is not None:
            # Closing the pool ends the service's backends, which flushes their deadlock
            # counters: the oracle's reading settles at once (see payrace.harness.model.oracle).
            await self._runtime.shutdown()
            self._runtime = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    # -- engine events, routed to the schedule that runs now -------------------------------

    def _label(self) -> str | None:
        probe = probes.current_probe()
        return probe.label if probe is not None and self._active is not None else None

    def _on_statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if (label := self._label()) is not None and self._active is not None:
            self._active.on_statement(label, statement)

    def _on_commit(self, conn: Any) -> None:
        if (label := self._label()) is not None and self._active is not None:
            self._active.on_commit(label)

    def _on_error(self, context: ExceptionContext) -> None:
        if (label := self._label()) is None or self._active is None:
            return
        exc: BaseException | None = context.original_exception
        cause = exc.__cause__ if exc is not None and exc.__cause__ is not None else exc
        message = str(getattr(cause, "message", None) or cause or "error").splitlines()[0]
        self._active.on_error(label, message)

    # -- running schedules -------------------------------------------------------------------

    async def _fresh(self) -> PaymentContext:
        """A new order and an authorized gateway payment (created a batch at a time)."""
        if not self._stock:
            assert self._client is not None
            orders = await asyncio.gather(
                *(self._client.create_order(self.amount, "INR") for _ in range(16))
            )
            for order in orders:
                payment = self.fake.authorize_payment(order["gateway_order_id"])
                self._stock.append(
                    PaymentContext(order["payment_id"], order["gateway_order_id"], payment)
                )
        return self._stock.pop(0)

    async def _blockers(self, pids: list[int]) -> dict[int, list[int]]:
        return await blocking_pids(self._conn, pids)

    async def run(
        self, policy: Policy, *, name: str | None = None, expect: str | None = None
    ) -> ScheduleRun:
        ctx = await self._fresh()
        number = len(self.runs) + 1
        assert self._client is not None
        client = self._client
        reqs = [
            ScheduledRequest(i, spec, prepare(spec.step, i, ctx, self.keys))
            for i, spec in enumerate(self.specs)
        ]

        async def send(r: ScheduledRequest) -> Reply:
            r.invoke = self.history.invoke(
                r.prepared.f, r.label, number, ctx.payment_id, r.prepared.value
            )
            return await client.send(r.prepared)

        sched = Scheduler(
            reqs,
            send=send,
            blockers=self._blockers,
            isolation=self.isolation,
            lock_rows=self.lock_rows,
            reduce=self.reduce,
            bound_s=self.bound_s,
            poll_s=self.poll_s,
        )
        self._active = sched
        error = None
        try:
            await sched.drive(policy)
        except ScheduleError as exc:
            error = str(exc)
        finally:
            await sched.close()
            self._active = None
        for r in reqs:
            if r.invoke is not None:
                reply = r.reply or Reply(None, {}, {}, "no answer")
                self.history.complete(
                    r.invoke,
                    classify(reply.status),
                    value=reply.body,
                    status=reply.status,
                    error=reply.error,
                    server=reply.server(),
                )
        run = ScheduleRun(
            number=number,
            ref=ScheduleRef(
                self.strategy,
                self.isolation,
                tuple(s.kind.token for s in self.specs),
                tuple(sched.choices),
            ),
            payment_id=ctx.payment_id,
            gateway_payment_id=str(ctx.gateway_payment["id"]),
            name=name,
            decisions=sched.decisions,
            events=sched.events,
            replies={r.label: r.reply for r in reqs if r.reply is not None},
            waits=sched.waits,
            deadlocks=sched.deadlocks,
            stuck=sched.stuck,
            guard=sched.guard,
            error=error,
            pruned=sched.pruned,
            expect=expect,
            races=sched.races,
        )
        if isinstance(policy, Prefix) and policy.diverged_at is not None and not error:
            if sched.races and sched.races[0][0] < policy.diverged_at:
                run.note = (
                    f"went its own way at step {policy.diverged_at}, after PostgreSQL decided "
                    f"the race at step {sched.races[0][0]}"
                )
            else:
                run.error = "not deterministic: " + "; ".join(policy.notes)
        self.runs.append(run)
        return run

    async def exhaustive(
        self, *, limit: int = 5000, on_run: Callable[[ScheduleRun], None] = lambda r: None
    ) -> bool:
        """Every schedule, depth-first; True when the search finished within `limit`."""
        prefix: list[int] = []
        count = 0
        while True:
            run = await self.run(Prefix(prefix))
            count += 1
            on_run(run)
            if run.guard or (run.error and run.error.startswith("not deterministic")):
                return False
            nxt = next_prefix(run.decisions)
            if nxt is None:
                return True
            if count >= limit:
                return False
            prefix = nxt

    async def pilot(self, on_run: Callable[[ScheduleRun], None] = lambda r: None) -> int:
        """k for PCT: the steps each request takes when it runs alone first, summed."""
        k = 0
        for spec in self.specs:
            run = await self.run(
                Steps([StepSpec(spec.label, "end")]), name=f"pilot: {spec.label} first"
            )
            on_run(run)
            k += sum(1 for c in run.choices if self.specs[c].label == spec.label)
        return max(k, 1)

    async def pct(
        self,
        runs: int,
        depth: int,
        seed: int,
        *,
        k: int | None = None,
        on_run: Callable[[ScheduleRun], None] = lambda r: None,
    ) -> PctBound:
        if k is None:
            k = await self.pilot(on_run)
        bound = PctBound(len(self.specs), k, depth)
        for i in range(runs):
            rng = random.Random(seed * 1_000_003 + i)
            on_run(await self.run(Pct(len(self.specs), k, depth, rng), name=f"pct run {i + 1}"))
        return bound

    async def run_steps(
        self, steps: Sequence[StepSpec], *, name: str | None = None, expect: str | None = None
    ) -> ScheduleRun:
        return await self.run(Steps(steps), name=name, expect=expect)

    async def replay(
        self, ref: ScheduleRef, *, name: str | None = None, expect: str | None = None
    ) -> ScheduleRun:
        return await self.run(Prefix(ref.choices, exact=True), name=name, expect=expect)

    # -- judging -------------------------------------------------------------------------------

    def judge(self) -> checker.Verdict:
        """Observe every schedule's payment with the oracle; judge all, then each schedule.

        Call after the `async with` block: the service's pool must be closed first so the
        deadlock counter has settled. Per schedule, no_deadlock reads the mutual waits the
        scheduler saw for that schedule's requests (pg_blocking_pids), since the counter
        is one number for the whole database."""
        assert self._baseline is not None
        obs = oracle.observe(
            self.db.url,
            oracle.OracleConfig.reference(),
            since=self._baseline,
            payment_ids=[r.payment_id for r in self.runs],
            gateway_counters=self.fake.counters(),
            gateway_payment_ids=[r.gateway_payment_id for r in self.runs],
        )
        self.observation = obs
        ops = self.history.ops()
        verdict = checker.check(ops, obs)
        by_trial: dict[int, list[Operation]] = {}
        for op in ops:
            by_trial.setdefault(op.trial, []).append(op)
        for run in self.runs:
            gid = run.gateway_payment_id
            state = obs.payments.get(run.payment_id)
            sub = replace(
                obs,
                audit=tuple(a for a in obs.audit if a.payment_id == run.payment_id),
                payments={run.payment_id: state} if state is not None else {},
                gateway_captures={gid: obs.gateway_captures[gid]}
                if gid in obs.gateway_captures
                else {},
                gateway_accepted={gid: obs.gateway_accepted[gid]}
                if gid in obs.gateway_accepted
                else {},
                deadlocks=len(run.deadlocks),
                deadlocks_settled=True,
                deadlock_note="",
            )
            v = checker.check(by_trial.get(run.number, []), sub)
            run.valid = v.valid
            run.violated = tuple(n for n, r in v.results.items() if r.valid is False)
            run.unknown = tuple(n for n, r in v.results.items() if r.valid == "unknown")
        return verdict


# -- what a command asks for ----------------------------------------------------------------


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
    except (OSError, TimeoutError, RuntimeError, oracle.OracleError, asyncpg.PostgresError) as exc:
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
    """summary.json / junit.xml / report.html (reports.report), explore.txt, timeline.html."""
    from payrace.harness.reports import report

    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary(
        command=command, run_id=run_id, database=database, started_at=started_at
    )
    written = report.write_all(summary, out)
    (out / "explore.txt").write_text(result.golden(), encoding="utf-8")
    (out / "timeline.html").write_text(result.html_fragment() + "\n", encoding="utf-8")
    written |= {"explore": out / "explore.txt", "timeline": out / "timeline.html"}
    if history is not None:
        history.to_jsonl(out / "history.jsonl")
    return written


# -- the pause point's price -----------------------------------------------------------------


def pause_overhead(iterations: int = 200_000) -> dict[str, float]:
    """ns per `await pause(point)` without a controller, against not calling it at all and
    against awaiting an empty coroutine (what any call point in async code costs)."""

    async def empty() -> None:
        return None

    async def timed(kind: str) -> float:
        started = time.perf_counter_ns()
        if kind == "pause":
            for _ in range(iterations):
                await probes.pause("payment_read", "pending")
        elif kind == "empty":
            for _ in range(iterations):
                await empty()
        else:
            for _ in range(iterations):
                pass
        return (time.perf_counter_ns() - started) / iterations

    async def best() -> dict[str, float]:
        # Best of five: what the call costs, not what else the machine was doing meanwhile.
        return {
            kind: min([await timed(kind) for _ in range(5)]) for kind in ("pause", "empty", "loop")
        }

    ns = asyncio.run(best())
    return {
        "pause_ns": ns["pause"],
        "empty_coroutine_ns": ns["empty"],
        "loop_ns": ns["loop"],
        "overhead_ns": ns["pause"] - ns["loop"],
    }


def _bench(argv: Sequence[str]) -> int:
    """python -m payrace.harness.explore.engine [pause-overhead | bench [--dsn DSN]]

    bench: every schedule of a client callback + payment.captured webhook pair at READ
    COMMITTED, for naive and for_update, collapsed and not."""
    if not argv or argv[0] == "pause-overhead":
        figures = pause_overhead()
        print(
            f"await pause() without a controller: {figures['pause_ns']:.0f} ns/call; "
            f"await of an empty coroutine: {figures['empty_coroutine_ns']:.0f} ns; loop without "
            f"either: {figures['loop_ns']:.0f} ns/iteration; pause() costs "
            f"{figures['overhead_ns']:.0f} ns/call more than not calling it"
        )
        return 0
    if argv[0] == "bench":
        dsn = argv[2] if len(argv) > 2 and argv[1] == "--dsn" else None
        with provide_postgres(dsn) as db:
            fake = FakeRazorpay(GatewayKeys())
            with GatewayServer(fake) as server:
                for strategy in ("naive", "for_update"):
                    for reduce in (True, False):
                        plan = make_plan(strategy=strategy, requests=["client", "webhook"],
                                         isolation="READ COMMITTED", pct_runs=None, depth=2,
                                         seed=1, replay=None, scenario=None)  # fmt: skip
                        plan = Plan(replace(plan.scenario, reduce=reduce))
                        started = time.perf_counter()
                        result = asyncio.run(execute(plan, db, fake, server.url))
                        total = time.perf_counter() - started
                        print(
                            f"{strategy:<10} {'collapsed' if reduce else 'every interleaving'}: "
                            f"{len(result.runs)} schedules in {result.duration_s:.2f} s = "
                            f"{result.schedules_per_s:.1f} schedules/s ({total:.2f} s with "
                            f"service start and judging); {len(result.violating())} violating, "
                            f"{len(result.waiting())} with a lock wait"
                        )
        return 0
    print(_bench.__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(_bench(sys.argv[1:]))


__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_VIOLATED",
    "ExploreResult",
    "Explorer",
    "Plan",
    "ScheduleRun",
    "execute",
    "explore_main",
    "make_plan",
    "pause_overhead",
    "write_reports",
]
