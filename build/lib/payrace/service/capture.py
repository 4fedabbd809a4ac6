"""The one capture routine both paths call, and the strategies that serialise it.

    CaptureCommand   what the client callback or a webhook asks for
    CaptureResult    the payment's state after the call, and whether it was a repeat
    Strategy         how rows are read: NAIVE (the bug, kept on purpose), FOR_UPDATE (the fix)
    capture()        lock order payment -> invoice -> order, status checked after the lock
    mark_failed()    payment.failed: never downgrades a captured payment

Inside one transaction: read the payment the strategy's way, dedupe the webhook event id,
check its status, call the gateway's capture if the payment is only authorized, then write
payment, invoice and order in that order and commit. Taking the locks in one fixed order is
what keeps two captures of different shapes from deadlocking. Serialisation failures
(REPEATABLE READ / SERIALIZABLE) and deadlocks are retried, then answered with a retryable
409; a lost database connection (a killed backend, a restarting server) is retried on a fresh
connection, then answered with a retryable 503 — never a 500 and never a lost capture.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, TypeVar

from sqlalchemy import ColumnElement, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from payrace.service import probes, timing
from payrace.service.errors import (
    GatewayFailed,
    NotFound,
    Rejected,
    RetryLater,
    connection_lost,
    unavailable,
)
from payrace.service.gateway_client import GatewayClient, GatewayError
from payrace.service.models import Invoice, Order, Payment, WebhookEvent
from payrace.service.probes import pause

RETRYABLE_SQLSTATES = {"40001": "serialization_failure", "40P01": "deadlock_detected"}
# A transaction on a lost connection wrote nothing, so it is retried on a fresh one (the pool
# discards the dead one); more than twice in one request means the database is going away.
CONNECTION_RETRIES = 2


_Row = TypeVar("_Row", Payment, Invoice, Order)


@dataclass(frozen=True)
class Strategy:
    """How the capture path reads the rows it is about to change.

    `lock_rows` False is the incident's flow: a plain read, so two requests both see
    `pending`. True is the fix: SELECT ... FOR UPDATE, so the second waits for the first to
    commit and then sees `captured`.
    """

    name: str
    lock_rows: bool
    summary: str
    # Serialise on a transaction-scoped advisory lock keyed by the payment instead of the
    # row lock: the same guarantee for code paths that all take it, none for those that don't.
    advisory: bool = False

    async def _one(
        self, session: AsyncSession, model: type[_Row], where: ColumnElement[bool]
    ) -> _Row | None:
        stmt = select(model).where(where)
        if self.lock_rows:
            stmt = stmt.with_for_update()
        # populate_existing: a row already in the session is refreshed from what the
        # statement read, so a status checked after the lock is the committed one.
        result = await session.execute(stmt.execution_options(populate_existing=True))
        return result.scalar_one_or_none()

    async def load_payment(self, session: AsyncSession, payment_id: int) -> Payment | None:
        if self.advisory:
            # Two-int form in a namespace of its own, so no other advisory user collides;
            # ids beyond int4 wrap, which can only over-serialise, never under.
            await session.execute(
                text("SELECT pg_advisory_xact_lock(:ns, (:id % 2147483647)::int)"),
                {"ns": ADVISORY_NAMESPACE, "id": payment_id},
            )
        return await self._one(session, Payment, Payment.id == payment_id)

    async def load_invoice(self, session: AsyncSession, payment_id: int) -> Invoice | None:
        return await self._one(session, Invoice, Invoice.payment_id == payment_id)

    async def load_order(self, session: AsyncSession, order_id: int) -> Order | None:
        return await self._one(session, Order, Order.id == order_id)


ADVISORY_NAMESPACE = 720_132
NAIVE = Strategy("naive", False, "plain read, status checked without a lock (the incident)")
FOR_UPDATE = Strategy("for_update", True, "SELECT ... FOR UPDATE, status checked after the lock")
ADVISORY = Strategy(
    "advisory", False, "pg_advisory_xact_lock on the payment id, then plain reads", advisory=True
)
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (NAIVE, FOR_UPDATE, ADVISORY)}


@dataclass(frozen=True)
class CaptureCommand:
    source: Literal["client", "webhook"]
    payment_id: int
    gateway_order_id: str
    gateway_payment_id: str
    capture_at_gateway: bool
    amount: int | None = None
    currency: str | None = None
    event: str | None = None
    event_id: str | None = None
    method: str | None = None


@dataclass(frozen=True)
class CaptureResult:
    payment_id: int
    status: str
    gateway_payment_id: str | None
    idempotent: bool
    duplicate_event: bool
    invoice_status: str | None
    order_status: str | None

    def as_json(self) -> dict[str, object]:
        return {
            "payment_id": self.payment_id,
            "status": self.status,
            "gateway_payment_id": self.gateway_payment_id,
            "idempotent": self.idempotent,
            "duplicate_event": self.duplicate_event,
            "invoice_status": self.invoice_status,
            "order_status": self.order_status,
        }


@dataclass(frozen=True)
class Runner:
    """What a capture needs from the running service."""

    maker: async_sessionmaker[AsyncSession]
    strategy: Strategy
    gateway: GatewayClient
    isolation_level: str
    retries: int


def _sqlstate(exc: DBAPIError) -> str | None:
    orig = exc.orig
    state = getattr(orig, "sqlstate", None) or getattr(
        getattr(orig, "__cause__", None), "sqlstate", None
    )
    return state if isinstance(state, str) else None


async def _retrying(
    runner: Runner, attempt_once: Callable[[Runner], Awaitable[CaptureResult]]
) -> CaptureResult:
    t = timing.current()
    conflicts = lost = 0
    try:
        while True:
            t.attempts = conflicts + lost + 1
            try:
                return await attempt_once(runner)
            except DBAPIError as exc:
                if connection_lost(exc):
                    # A gateway capture made in the lost attempt is in the request's
                    # _GatewayMemo: the retry records it without calling the gateway again.
                    if lost == CONNECTION_RETRIES:
                        raise unavailable(t.attempts) from exc
                    lost += 1
                    continue
                state = _sqlstate(exc)
                if state == "23505":
                    # The only unique key a capture can hit is payments.gateway_payment_id:
                    # this pay_ id already belongs to another payment here.
                    raise Rejected(
                        "this gateway payment id is already bound to another payment",
                        code="payment_mismatch",
                    ) from exc
                if state not in RETRYABLE_SQLSTATES:
                    raise
                if conflicts == runner.retries:
                    raise RetryLater(
                        f"concurrent update of this payment ({RETRYABLE_SQLSTATES[state]}) "
                        f"persisted after {conflicts + 1} attempts; retry the request",
                        sqlstate=state,
                    ) from exc
                conflicts += 1
                # A short, growing pause lets the winning transaction commit first.
                await asyncio.sleep(0.002 * conflicts)
    finally:
        probes.finish()


async def _begin(session: AsyncSession, runner: Runner) -> None:
    conn = await session.connection(execution_options={"isolation_level": runner.isolation_level})
    if probes.active():
        # Controllers tell "waiting for a lock" from pg_blocking_pids of this backend. The
        # driver knows the pid already: asking the server would run a statement, and at
        # REPEATABLE READ the first statement takes the snapshot earlier than production.
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None  # a checked-out connection always has one
        probes.set_backend_pid(int(driver.get_server_pid()))
    await pause("txn_begun")


async def _record_event(session: AsyncSession, cmd: CaptureCommand) -> bool:
    """Insert the event id; False when it was already delivered (a duplicate)."""
    if cmd.event_id is None:
        return True
    stmt = (
        insert(WebhookEvent)
        .values(event_id=cmd.event_id, event=cmd.event or "", payment_id=cmd.payment_id)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(WebhookEvent.event_id)
    )
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def _states(session: AsyncSession, payment: Payment) -> tuple[str | None, str | None]:
    row = (
        await session.execute(
            select(Invoice.status, Order.status)
            .select_from(Payment)
            .join(Order, Order.id == Payment.order_id)
            .outerjoin(Invoice, Invoice.payment_id == Payment.id)
            .where(Payment.id == payment.id)
        )
    ).one()
    return row[0], row[1]


def _result(
    payment: Payment, states: tuple[str | None, str | None], **flags: bool
) -> CaptureResult:
    return CaptureResult(
        payment_id=payment.id,
        status=payment.status,
        gateway_payment_id=payment.gateway_payment_id,
        idempotent=flags.get("idempotent", False),
        duplicate_event=flags.get("duplicate_event", False),
        invoice_status=states[0],
        order_status=states[1],
    )


@dataclass
class _GatewayMemo:
    """Survives the retries of one request: a capture the gateway accepted stays accepted
    when PostgreSQL aborts the transaction (40001 at commit under SERIALIZABLE, a killed
    backend), so the retry must record it, not capture again. A capture the gateway failed
    stays failed too: when the connection dies under the rollback of that attempt, the retry
    answers the same failure instead of calling the gateway a second time."""

    captured: bool = False
    failed: GatewayFailed | None = None


async def capture(runner: Runner, cmd: CaptureCommand) -> CaptureResult:
    memo = _GatewayMemo()
    return await _retrying(runner, lambda r: _capture_once(r, cmd, memo))


async def _open(
    session: AsyncSession, runner: Runner, cmd: CaptureCommand
) -> tuple[Payment, Order, bool, float]:
    """Begin, read the payment the strategy's way, dedupe the event, validate.

    Returns (payment, order, fresh_event, time the lock was granted)."""
    t = timing.current()
    await _begin(session, runner)
    lock_started = time.perf_counter()
    payment = await runner.strategy.load_payment(session, cmd.payment_id)
    locked = time.perf_counter()
    t.lock_ms = (locked - lock_started) * 1000
    await pause("payment_read", payment.status if payment else "missing")
    if payment is None:
        raise NotFound(f"payment {cmd.payment_id} does not exist")
    # Only now: the event row's foreign key takes FOR KEY SHARE on the payment row. Taken
    # before FOR UPDATE, two webhooks would each hold it and wait for the other's: a deadlock.
    fresh_event = await _record_event(session, cmd)
    order = await session.get(Order, payment.order_id)
    assert order is not None  # foreign key
    _validate(cmd, payment, order)
    return payment, order, fresh_event, locked


async def _capture_once(runner: Runner, cmd: CaptureCommand, memo: _GatewayMemo) -> CaptureResult:
    t = timing.current()
    probe = probes.current_probe()
    started = time.perf_counter()
    paused0, gateway0 = (probe.paused_s if probe else 0.0), t.gateway_ms
    async with runner.maker() as session:
        async with session.begin():
            payment, order, fresh_event, locked = await _open(session, runner, cmd)
            repeat = not fresh_event or payment.status == "captured"
            await pause("status_checked", "repeat" if repeat else payment.status)
            if repeat:
                result = _result(
                    payment,
                    await _states(session, payment),
                    idempotent=True,
                    duplicate_event=not fresh_event,
                )
            else:
                result = await _write_capture(session, runner, cmd, payment, order, memo)
            await pause("before_commit")
        committed = time.perf_counter()
    t.hold_ms = (committed - locked) * 1000
    paused = (probe.paused_s if probe else 0.0) - paused0
    t.db_ms = max(0.0, (committed - started) * 1000 - (t.gateway_ms - gateway0) - paused * 1000)
    return result


def _validate(cmd: CaptureCommand, payment: Payment, order: Order) -> None:
    if order.gateway_order_id != cmd.gateway_order_id:
        raise Rejected(
            f"razorpay_order_id {cmd.gateway_order_id} is not the order of payment {payment.id}",
            code="order_mismatch",
        )
    if cmd.amount is not None and cmd.amount != order.amount:
        raise Rejected(
            f"amount {cmd.amount} does not match the order's amount {order.amount}",
            code="amount_mismatch",
        )
    if cmd.currency is not None and cmd.currency != order.currency:
        raise Rejected(
            f"currency {cmd.currency} does not match the order's currency {order.currency}",
            code="currency_mismatch",
        )
    # A failed attempt does not own the order: the customer may retry with a new payment id,
    # and a late payment.failed of another attempt changes nothing (Razorpay documents both).
    if (
        payment.gateway_payment_id not in (None, cmd.gateway_payment_id)
        and payment.status != "failed"
        and cmd.event != "payment.failed"
    ):
        raise Rejected(
            f"payment {payment.id} is already bound to {payment.gateway_payment_id}, "
            f"not {cmd.gateway_payment_id}",
            code="payment_mismatch",
        )


async def _write_capture(
    session: AsyncSession,
    runner: Runner,
    cmd: CaptureCommand,
    payment: Payment,
    order: Order,
    memo: _GatewayMemo,
) -> CaptureResult:
    strategy = runner.strategy
    if cmd.capture_at_gateway and not memo.captured:
        if memo.failed is not None:
            raise memo.failed
        await pause("gateway_called")
        try:
            await runner.gateway.capture(cmd.gateway_payment_id, order.amount, order.currency)
        except GatewayError as exc:
            code = "gateway_refused" if exc.refused else "gateway_error"
            memo.failed = GatewayFailed(str(exc), code=code)
            raise memo.failed from exc
        memo.captured = True
    now = datetime.now(UTC)
    payment.status = "captured"
    payment.gateway_payment_id = cmd.gateway_payment_id
    payment.captured_at = now
    payment.error_code = None
    if cmd.method:
        payment.method = cmd.method
    await session.flush()
    await pause("payment_written")
    invoice = await strategy.load_invoice(session, payment.id)
    if invoice is not None:
        invoice.status = "paid"
        invoice.amount_paid = invoice.amount
        invoice.paid_at = now
        await session.flush()
    await pause("invoice_written")
    locked_order = await strategy.load_order(session, order.id)
    assert locked_order is not None
    locked_order.status = "paid"
    locked_order.paid_at = now
    await session.flush()
    await pause("order_written")
    return CaptureResult(
        payment_id=payment.id,
        status="captured",
        gateway_payment_id=payment.gateway_payment_id,
        idempotent=False,
        duplicate_event=False,
        invoice_status=invoice.status if invoice is not None else None,
        order_status=locked_order.status,
    )


async def mark_failed(runner: Runner, cmd: CaptureCommand, error_code: str | None) -> CaptureResult:
    return await _retrying(runner, lambda r: _fail_once(r, cmd, error_code))


async def _fail_once(runner: Runner, cmd: CaptureCommand, error_code: str | None) -> CaptureResult:
    t = timing.current()
    async with runner.maker() as session:
        async with session.begin():
            payment, _, fresh_event, locked = await _open(session, runner, cmd)
            # Razorpay documents payment.failed followed by payment.captured as normal, so
            # a failure never undoes a capture, and a later capture may follow a failure.
            repeat = not fresh_event or payment.status in ("captured", "failed")
            await pause("status_checked", "repeat" if repeat else payment.status)
            if not repeat:
                payment.status = "failed"
                payment.gateway_payment_id = cmd.gateway_payment_id
                payment.error_code = error_code
                await session.flush()
                await pause("payment_written")
            states = await _states(session, payment)
            await pause("before_commit")
        t.hold_ms = (time.perf_counter() - locked) * 1000
    return _result(payment, states, idempotent=repeat, duplicate_event=not fresh_event)
