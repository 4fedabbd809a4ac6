"""The explorer's engine: schedules of one list of requests, run on an in-process target.

    APPLICATION_NAME  what the explorer's own PostgreSQL connection calls itself
    Explorer        an in-process target + oracle for one list of requests: the reference
                    service at one strategy / isolation (explore.targets), or a team's ASGI
                    app (explore.app); every schedule gets a fresh order and payment
    ├── run()           one schedule under a policy (explore.policies), driven by a
    │                   Scheduler (explore.scheduler) -> a ScheduleRun (explore.findings)
    ├── exhaustive()    every schedule (depth-first, re-executing from a fresh payment)
    ├── pilot(), pct()  PCT: k from each request running alone, then seeded runs
    ├── run_steps()     an explicit schedule ("client:payment_read", "webhook-1:end", ...)
    ├── replay()        exactly the schedule an id names
    └── judge()         oracle + the one judge (model.oracle, model.judge): all schedules, then
                        each one, filling ScheduleRun.valid / violated / unknown

Who does what: explore.scheduler decides which request moves next and reads lock waits from
PostgreSQL (explore.waits), by the step model of explore.steps; explore.targets and
explore.app start and stop what is driven; this module owns the payments, the requests
(shaped by the target's profile) and the oracle around them; explore.plan turns a command
or a scenario file into calls of these methods; explore.findings adds the schedules up,
compares them with what the scenario expected, and draws them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any

import asyncpg

from payrace import pausing
from payrace.harness.errors import UsageError
from payrace.harness.explore.findings import ScheduleRun
from payrace.harness.explore.policies import Pct, PctBound, Policy, Prefix, Steps, next_prefix
from payrace.harness.explore.scenario import RequestSpec, ScheduleRef, StepSpec
from payrace.harness.explore.scheduler import ScheduledRequest, ScheduleError, Scheduler
from payrace.harness.explore.targets import ExploreTarget, ReferenceTarget
from payrace.harness.explore.waits import AppWaits, blocking_pids
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.provider import Database
from payrace.harness.model import checker, oracle
from payrace.harness.model.client import AsgiClient, PaymentContext, Reply, prepare
from payrace.harness.model.history import History, Operation, classify
from payrace.harness.model.judge import judge
from payrace.harness.model.watched import OracleError

APPLICATION_NAME = "payrace-explore"  # oracle.observe() does not wait for harness connections


class Explorer:
    """One in-process target (the reference service at a strategy and isolation level, or a
    team's app: explore.targets, explore.app) and the oracle, for many schedules of one list
    of requests; every schedule gets a new order and payment."""

    def __init__(
        self,
        db: Database | str,
        fake: FakeRazorpay,
        gateway_url: str,
        *,
        requests: Sequence[RequestSpec],
        strategy: str = "for_update",
        isolation: str = "READ COMMITTED",
        target: ExploreTarget | None = None,
        bound_s: float = 5.0,
        poll_s: float = 0.002,
        reduce: bool = True,
        amount: int = 50_000,
        keys: GatewayKeys = GatewayKeys(),
    ) -> None:
        self.target = target or ReferenceTarget(strategy, isolation, keys)
        self.db_url = db if isinstance(db, str) else db.url
        self.fake = fake
        self.gateway_url = gateway_url
        self.strategy = self.target.name
        self.isolation = self.target.isolation
        self.specs = tuple(requests)
        self.bound_s = bound_s
        self.poll_s = poll_s
        self.reduce = reduce
        self.amount = amount
        self.profile = self.target.profile
        self.hook = self.profile.before_send()
        self.history = History(strategy=self.strategy)
        self.runs: list[ScheduleRun] = []
        self._active: Scheduler | None = None
        self._stock: list[PaymentContext] = []
        self._started = False
        self._client: AsgiClient | None = None
        self._conn: Any = None
        self._waits: AppWaits | None = None
        self._baseline: oracle.Baseline | None = None
        self.observation: oracle.Observation | None = None

    @property
    def points(self) -> tuple[str, ...]:
        """The pause points the requests reached, in the order first reached."""
        seen: dict[str, None] = {}
        for run in self.runs:
            for point in run.points:
                seen.setdefault(point)
        return tuple(seen)

    async def __aenter__(self) -> Explorer:
        try:
            self._started = True
            app = await self.target.start(self.db_url, self.gateway_url, self)
            self._client = AsgiClient(app)
            # The oracle needs the tables, which the target's startup created.
            try:
                await asyncio.to_thread(oracle.install, self.db_url, self.profile.oracle)
            except OracleError as exc:
                raise UsageError(
                    f"cannot install the oracle's audit triggers ({self.profile.source}): "
                    f"{exc}; the target must create its tables at startup in the database "
                    "payrace gives it (an app: PAYRACE_TARGET_DSN), or --target-dsn must name "
                    "the database where they are"
                ) from None
            self._baseline = await asyncio.to_thread(oracle.baseline, self.db_url)
            self._conn = await asyncpg.connect(
                self.db_url, server_settings={"application_name": APPLICATION_NAME}
            )
            if not self.target.exact_pids:
                self._waits = AppWaits(self._conn)
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
        if self._started:
            self._started = False
            await self.target.stop()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    # -- engine events, routed to the schedule that runs now -------------------------------

    def _label(self) -> str | None:
        probe = pausing.current_probe()
        return probe.label if probe is not None and self._active is not None else None

    def on_statement(self, statement: str) -> None:
        if (label := self._label()) is not None and self._active is not None:
            self._active.on_statement(label, statement)

    def on_commit(self) -> None:
        if (label := self._label()) is not None and self._active is not None:
            self._active.on_commit(label)

    def on_error(self, message: str) -> None:
        if (label := self._label()) is not None and self._active is not None:
            self._active.on_error(label, message)

    # -- running schedules -------------------------------------------------------------------

    async def _fresh(self) -> PaymentContext:
        """A new order and an authorized gateway payment (created a batch at a time)."""
        if not self._stock:
            assert self._client is not None
            orders = await asyncio.gather(*(self._order() for _ in range(16)))
            await self._check_setup(orders)
            for order in orders:
                payment = self.fake.authorize_payment(order["gateway_order_id"])
                self._stock.append(
                    PaymentContext(order["payment_id"], order["gateway_order_id"], payment)
                )
        return self._stock.pop(0)

    async def _check_setup(self, orders: list[dict[str, Any]]) -> None:
        """An app that writes to another database or talks to another gateway than payrace's
        is a setup mistake, said before any schedule (else every verdict would be unknown)."""
        where = f"the target ({self.profile.source})"
        for order in orders:
            if self.fake.order(order["gateway_order_id"]) is None:
                raise UsageError(
                    f"the fake gateway never saw order {order['gateway_order_id']!r} that "
                    f"{where} answered: it creates orders at another gateway; point it at "
                    "PAYRACE_GATEWAY_URL"
                )
        payments = self.profile.oracle.payments
        table = ".".join(_quoted(part) for part in payments.table.split(".", 1))
        ids = [int(order["payment_id"]) for order in orders]
        found = await self._conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE {_quoted(payments.id_column)} = ANY($1::bigint[])",
            ids,
        )
        if found != len(ids):
            raise UsageError(
                f"{where} answered payment ids {ids[:3]}… that {payments.table} in payrace's "
                "database does not hold: it writes to another database; make it use "
                "PAYRACE_TARGET_DSN (or give --target-dsn the database it uses)"
            )

    async def _order(self) -> dict[str, Any]:
        """The profile's create-order request; with `by = "payrace"` the order is created at
        the fake gateway first (as payrace.harness.runner.trials does)."""
        assert self._client is not None
        gateway_order_id = None
        if self.profile.create_order.by == "payrace":
            gateway_order_id = str(
                self.fake.create_order({"amount": self.amount, "currency": "INR"})["id"]
            )
        return await self._client.create_order(
            self.amount, "INR", self.profile, gateway_order_id, self.hook
        )

    async def _blockers(self, pids: list[int]) -> dict[int, list[int]]:
        if self._waits is not None:
            return await self._waits(pids)
        return await blocking_pids(self._conn, pids)

    async def run(
        self, policy: Policy, *, name: str | None = None, expect: str | None = None
    ) -> ScheduleRun:
        ctx = await self._fresh()
        number = len(self.runs) + 1
        assert self._client is not None
        client = self._client
        reqs = [
            ScheduledRequest(i, spec, prepare(spec.step, i, ctx, self.profile, self.hook))
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
            lock_rows=self.target.lock_rows,
            reduce=self.reduce,
            bound_s=self.bound_s,
            poll_s=self.poll_s,
            model=self.target.model,
            exact_pids=self.target.exact_pids,
            statement_of=self._waits.statement if self._waits is not None else None,
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
            points=tuple(dict.fromkeys(p for r in reqs for p in r.trail)),
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
            self.db_url,
            self.profile.oracle,
            since=self._baseline,
            payment_ids=[r.payment_id for r in self.runs],
            gateway_counters=self.fake.counters(),
            gateway_payment_ids=[r.gateway_payment_id for r in self.runs],
        )
        self.observation = obs
        ops = self.history.ops()
        # A schedule delivers payment.captured whenever it says, before any capture at the
        # gateway too (explore orders requests, not the gateway's events), so the phantom
        # direction is judged by `payrace run` and Locust, whose gateway captures first.
        checkers = tuple(c for c in checker.CHECKERS if c is not checker.no_phantom_capture)
        verdict = judge(ops, obs, checkers=checkers).verdict
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
                gateway_captured=obs.gateway_captured & {gid},
                deadlocks=len(run.deadlocks),
                deadlocks_settled=True,
                deadlock_note="",
            )
            v = judge(by_trial.get(run.number, []), sub, checkers=checkers).verdict
            run.valid = v.valid
            run.violated = tuple(n for n, r in v.results.items() if r.valid is False)
            run.unknown = tuple(n for n, r in v.results.items() if r.valid == "unknown")
        return verdict


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


__all__ = ["APPLICATION_NAME", "Explorer"]
