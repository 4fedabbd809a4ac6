"""A race the test fires itself: the seed's `gather(verify_payment(), handle_webhook_event())`.

    capture_config()      what payrace.testing.capture_race() was asked, as a one-trial
                          RunConfig, checked (UsageError) before anything starts
    CaptureRace.start()   a fresh database on the given server, a fresh fake Razorpay on
                          loopback, the reference service in this event loop (its razorpay SDK
                          talks to the fake over HTTP), the oracle's triggers, one payment
                          authorized at the gateway; on leaving: the service stops, the oracle
                          observes, the one judge (runner.run.judge) decides, reports are
                          written, and the database is dropped
    CaptureRace           .payment (PaymentUnderRace); verify_payment() and
                          handle_webhook_event() return the coroutines to gather, each one
                          operation in the history; .result (testing.RaceResult) once judged

Forced (the default): a Rendezvous (service.instrument.probes) holds every request after its
payment read until every request started so far has read too, has finished, or waits on a
lock in PostgreSQL. "Started so far" counts the coroutines created: gather creates them all
before it runs any, so both read `pending` before either writes; requests awaited one after
the other never wait for each other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from payrace.harness.errors import UsageError
from payrace.harness.gateway.controls import LocalGateway
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import new_event_id
from payrace.harness.infra.provider import Database, provide_postgres
from payrace.harness.model import oracle
from payrace.harness.model.checker import CAPTURE_EVENTS
from payrace.harness.model.client import PaymentContext, Prepared, Reply
from payrace.harness.model.lockwatch import LockWatch
from payrace.harness.reports.timeline import from_probes
from payrace.harness.reports.writers import write_all
from payrace.harness.runner.config import RunConfig, oracle_config
from payrace.harness.runner.run import judge, summary_of, write_history
from payrace.harness.runner.target import Target, start_target
from payrace.harness.runner.trials import (
    BlockedProbe,
    Recorder,
    StrategyRun,
    TrialOutcome,
    _complete,
)
from payrace.service.instrument import probes
from payrace.testing import RaceResult, fail

EVENTS = ("payment.captured", "payment.authorized", "order.paid", "payment.failed")


def capture_config(
    strategy: str, *, forced: bool, event: str, amount: int, isolation: str, seed: int
) -> RunConfig:
    if event not in EVENTS:
        raise UsageError(f"event must be one of {', '.join(EVENTS)}, got {event!r}")
    if not 100 <= amount <= 10**12:
        raise UsageError(f"amount must be 100..10**12 (paise), got {amount!r}")
    config = RunConfig(
        strategies=[strategy],
        trials=1,
        # forced: the pause handshake in this process; otherwise gather alone releases them,
        # together, which is what aligned mode means in-process.
        mode="forced" if forced else "aligned",
        force="pause" if forced else None,
        seed=seed,
        isolation=isolation,
        amount=amount,
    )
    config.validate()
    return config


@dataclass(frozen=True)
class PaymentUnderRace:
    """The payment both requests are about: the service's id and the gateway's."""

    payment_id: int  # the service's (internal_payment_id)
    gateway_order_id: str  # order_...
    gateway_payment_id: str  # pay_..., authorized at the fake gateway
    amount: int
    currency: str


@dataclass(frozen=True)
class Answer:
    """What the service answered one request: HTTP status and JSON body."""

    status: int | None  # None: no answer (the request failed in transport)
    body: dict[str, Any]

    @property
    def idempotent(self) -> bool:
        """The service said the call repeated a capture already made."""
        return bool(self.body.get("idempotent"))


class CaptureRace:
    def __init__(
        self,
        config: RunConfig,
        target: Target,
        gateway: LocalGateway,
        pool: asyncpg.Pool,
        event: str,
    ) -> None:
        self.config = config
        self.event = event  # what handle_webhook_event() delivers unless told otherwise
        self._received: list[int] = []  # the service's arrival stamps (ns)
        self.strategy = config.strategies[0]
        self._target = target
        self._gateway = gateway
        self._run = StrategyRun(self.strategy)
        self._captured: dict[str, probes.ProbeContext] = {}
        self._started = 0
        self._webhooks = 0
        self._ctx: PaymentContext | None = None
        self.payment: PaymentUnderRace | None = None
        self.result: RaceResult | None = None
        self._controller: probes.PauseController = Recorder()
        self._rendezvous: probes.Rendezvous | None = None
        if config.mode == "forced":
            self._rendezvous = probes.Rendezvous(
                1, BlockedProbe(pool), timeout_s=config.pause_timeout_s
            )
            self._controller = self._rendezvous

    @classmethod
    @asynccontextmanager
    async def start(
        cls, config: RunConfig, server: Database, event: str = "payment.captured"
    ) -> AsyncIterator[CaptureRace]:
        quiet = lambda line: None  # noqa: E731  # the test's output is the test's
        started_at, started = datetime.now(UTC), time.perf_counter()
        async with AsyncExitStack() as stack:
            db = stack.enter_context(provide_postgres(server.url, announce=quiet))
            fake = FakeRazorpay(config.target_profile().keys, seed=config.seed)
            gateway_url = stack.enter_context(GatewayServer(fake)).url
            gateway = LocalGateway(fake)
            # payrace-…: the oracle does not wait for the harness's own backends to go idle.
            harness = {"application_name": "payrace-harness"}
            pool = await asyncpg.create_pool(
                db.url, min_size=1, max_size=2, server_settings=harness
            )
            stack.push_async_callback(pool.close)
            async with AsyncExitStack() as running:
                # The service creates its tables on start; the oracle's triggers go on them.
                target = await running.enter_async_context(
                    start_target(config, config.strategies[0], db, gateway_url)
                )
                await asyncio.to_thread(oracle.install, db.url, oracle_config(config))
                race = cls(config, target, gateway, pool, event)
                await race._prepare_payment()
                race._run.since = await asyncio.to_thread(oracle.baseline, db.url)
                watch = await running.enter_async_context(LockWatch(db.url))
                started_run = time.perf_counter()
                yield race
                race._run.duration_s = time.perf_counter() - started_run
            # Left the block: the service stopped, its backends exited and flushed their
            # deadlock counts, so the oracle's reading settles (as in runner.run).
            race._finish(watch)
            judged = await judge(config, race._run, gateway, db.url)
            database = {"route": db.route, "server_version": db.server_version,
                        "fast": db.fast, "describe": db.describe()}  # fmt: skip
            summary = summary_of(
                config,
                {race.strategy: judged},
                database=database,
                started_at=started_at,
                duration_s=time.perf_counter() - started,
            )
            where = config.out_dir / config.run_id
            write_history(summary, where / "history.jsonl")
            race.result = RaceResult(summary, write_all(summary, where)["html"])

    async def _prepare_payment(self) -> None:
        amount, profile = self.config.amount, self._target.profile
        order = await self._target.client.create_order(amount, "INR", profile)
        authorized = await asyncio.to_thread(self._gateway.authorize, order["gateway_order_id"])
        self._ctx = PaymentContext(
            order["payment_id"], order["gateway_order_id"], authorized, amount=amount
        )
        self.payment = PaymentUnderRace(
            int(order["payment_id"]),
            str(order["gateway_order_id"]),
            str(authorized["id"]),
            amount,
            "INR",
        )

    def verify_payment(self) -> Coroutine[Any, Any, Answer]:
        """The customer's browser callback (Razorpay Checkout's signed fields), as a coroutine
        to gather; its answer once awaited."""
        ctx = self._context()
        out = self._target.profile.signed_callback(
            ctx.values(), ctx.gateway_order_id, ctx.gateway_payment["id"], self._target.hook
        )
        value = {"gateway_payment_id": ctx.gateway_payment["id"]}
        req = Prepared(out.method, out.path, out.body, out.headers, "verify", value)
        return self._send("client", req)

    def handle_webhook_event(
        self, event: str | None = None, *, event_id: str | None = None
    ) -> Coroutine[Any, Any, Answer]:
        """Razorpay's signed webhook for the payment (`event`, default capture_race's), as a
        coroutine to gather. The same `event_id` as an earlier delivery makes a duplicate."""
        ctx = self._context()
        event = event or self.event
        if event not in EVENTS:
            fail(f"payrace: event must be one of {', '.join(EVENTS)}, got {event!r}")
        self._webhooks += 1
        event_id = event_id or new_event_id()
        if event in CAPTURE_EVENTS:
            # Razorpay sends these only for a payment it captured (its automatic capture), as
            # payrace run does: the gateway's state comes first (no_phantom_capture).
            ctx.gateway_payment = self._gateway.auto_capture(ctx.gateway_payment["id"])
        out = self._target.profile.signed_webhook(
            ctx.values(), event, ctx.gateway_payment, event_id, self._target.hook
        )
        pay_id = ctx.gateway_payment["id"]
        value = {"event": event, "event_id": event_id, "gateway_payment_id": pay_id}
        req = Prepared(out.method, out.path, out.body, out.headers, "webhook", value)
        return self._send(f"webhook-{self._webhooks}", req)

    def assert_exactly_once(self) -> None:
        """The oracle's verdict on what the block did (see testing.RaceResult)."""
        if self.result is None:
            fail(
                "payrace: the verdict is taken when the `async with capture_race(...)` block "
                "ends (the service stops first, so PostgreSQL's counters settle): call "
                "r.assert_exactly_once() after the block"
            )
        self.result.assert_exactly_once()

    @property
    def valid(self) -> bool | str:
        if self.result is None:
            return "unknown"
        return self.result.valid

    def _context(self) -> PaymentContext:
        if self._ctx is None or self.result is not None:
            fail("payrace: fire the requests inside the `async with capture_race(...)` block")
        return self._ctx

    def _send(self, process: str, req: Prepared) -> Coroutine[Any, Any, Answer]:
        # Counted when the coroutine is made, not when it runs: see the module docstring.
        self._started += 1
        if self._rendezvous is not None:
            self._rendezvous.size = self._started
        return self._fire(process, req)

    async def _fire(self, process: str, req: Prepared) -> Answer:
        ctx = self._context()
        run = self._run
        invoke = run.history.invoke(req.f, process, 0, ctx.payment_id, req.value)
        with probes.controlled(self._controller, process) as probe:
            reply: Reply = await self._target.client.send(req)
        self._captured[process] = probe
        server = _complete(run, invoke, reply)  # recorded as fire_trials records an answer
        if "received_at_ns" in server:
            self._received.append(int(server["received_at_ns"]))
        path = "client" if req.f == "verify" else "webhook"
        for kind in ("lock", "hold"):
            if kind in server:
                run.latency.record(kind, path, float(server[kind]))
        return Answer(reply.status, reply.body)

    def _finish(self, watch: LockWatch) -> None:
        """The one trial's outcome, as fire_trials records a trial's."""
        assert self._ctx is not None
        run = self._run
        run.server_side = watch.result.to_json()
        run.lock_cycles = watch.result.cycles
        timeouts = self._rendezvous.timeouts if self._rendezvous is not None else 0
        run.pause_timeouts = timeouts
        received = self._received
        spread = (max(received) - min(received)) / 1e6 if len(received) > 1 else None
        if spread is not None and self.config.mode == "aligned":
            run.arrival.record_ms(spread)
        forced = self._rendezvous is not None and timeouts == 0 and self._started > 1
        run.outcomes[0] = TrialOutcome(
            0,
            self._ctx.payment_id,
            self._ctx.gateway_payment["id"],
            spread,
            from_probes(self._captured),
            timeouts,
            forced,
        )
