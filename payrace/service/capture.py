"""The capture routine the client callback and every webhook call: in one transaction, read
the payment (the lock), check its status only once the lock is held, capture at the gateway,
write payment -> invoice -> order (one fixed order: no deadlock), commit.

    read_naive / read_for_update / read_advisory   the incident's read and the fixes
    read_with_order()   the payment and its order in one round trip (locked or not)
    capture() / mark_failed()   the routine / payment.failed, which never undoes a capture
    Strategy, STRATEGIES, Runner   the strategies by name; what a capture needs (app.py)

More strategies (nowait, skip_locked, optimistic, serializable, atomic) and strategies chosen
by import path: payrace.service.strategies, through the optional hooks of `Strategy`.

Round trips while the payment lock is held, for a fresh capture: the joined read, then one
UPDATE each for payment, invoice and order (4 statements); a repeat: the read and the
status read (2). Webhook event-id dedupe (Runner.dedupe) adds its INSERT. At SERIALIZABLE the
gateway's acceptance is committed beside the transaction (_GatewayMemo).

Retries: payrace.service.retry; the command's checks: payrace.service.command; `pause()` and
the clock: test-only instrumentation (payrace.service.instrument), no-ops unless enabled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Select, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import contains_eager

from payrace.service import command
from payrace.service.command import CaptureCommand, CaptureResult
from payrace.service.errors import GatewayFailed, NotFound
from payrace.service.gateway_client import GatewayClient, GatewayError
from payrace.service.instrument.probes import finish, pause, record_backend
from payrace.service.instrument.timing import AttemptClock
from payrace.service.models import Invoice, Order, Payment
from payrace.service.retry import retrying


async def read_naive(session: AsyncSession, payment_id: int) -> Payment | None:
    """The incident: a plain read, so two concurrent requests both see `pending`."""
    return await read_with_order(session, payment_id)


async def read_for_update(session: AsyncSession, payment_id: int) -> Payment | None:
    """The fix: a second request waits here until the first commits, then sees `captured`."""
    return await read_with_order(session, payment_id, lock=True)


async def read_with_order(
    session: AsyncSession, payment_id: int, *, lock: bool = False, **lock_options: bool
) -> Payment | None:
    """The payment and its order in one round trip, FOR UPDATE OF the payment alone when
    `lock` (nowait / skip_locked as `lock_options`). The order lands in the session, so the
    capture's `session.get(Order, ...)` needs no statement of its own; only its columns that
    never change are used (the order's status is read after the lock: stored_result)."""
    stmt = _READ_WITH_ORDER.where(Payment.id == payment_id)
    if lock:
        stmt = stmt.with_for_update(of=Payment, **lock_options)
    return (await session.execute(stmt)).scalar_one_or_none()


async def read_advisory(session: AsyncSession, payment_id: int) -> Payment | None:
    """An advisory lock keyed by the payment, then a plain read: the same guarantee for code
    paths that all take it, none for those that don't."""
    await session.execute(ADVISORY_LOCK, {"ns": ADVISORY_NAMESPACE, "id": payment_id})
    return await read_naive(session, payment_id)


_READ_WITH_ORDER = (
    select(Payment)
    .join(Payment.order)
    .options(contains_eager(Payment.order))
    .execution_options(populate_existing=True)
)


async def capture(runner: Runner, cmd: CaptureCommand) -> CaptureResult:
    memo = _GatewayMemo()  # the gateway's answer, kept across the retried attempts
    if cmd.capture_at_gateway:
        # Committed before the gateway is asked: a capture it accepts can then never be lost,
        # even when every attempt below dies before COMMIT (payrace.service.reconcile).
        intents = runner.intents or runner.maker
        await retrying(lambda: command.record_intent(intents, cmd), conflicts=runner.retries)

    async def attempt() -> CaptureResult:
        clock = AttemptClock()
        async with runner.maker() as session:
            async with session.begin():
                payment, order, fresh_event = await _lock_payment(session, runner, cmd, clock)
                # Checked only now, with the lock held: a waiter sees what the winner committed.
                repeat = not fresh_event or payment.status == "captured"
                await pause("status_checked", "repeat" if repeat else payment.status)
                if repeat:
                    result = await command.stored_result(
                        session, payment, idempotent=True, duplicate_event=not fresh_event
                    )
                elif runner.strategy.claim is not None:
                    result = await _claimed_capture(session, runner, cmd, payment, order, memo)
                else:
                    await _capture_at_gateway(runner, cmd, order, memo)
                    result = await _write_capture(session, runner, cmd, payment, order)
                await pause("before_commit")
            clock.committed()
        return result

    return await _retried(runner, attempt)


async def _lock_payment(
    session: AsyncSession, runner: Runner, cmd: CaptureCommand, clock: AttemptClock
) -> tuple[Payment, Order, bool]:
    """Begin, read the payment the strategy's way, dedupe the event, check the command.

    Returns (payment, its order, whether the event id is new)."""
    conn = await session.connection(execution_options={"isolation_level": runner.isolation})
    await record_backend(conn)
    await pause("txn_begun")
    read = runner.strategy.read_payment
    if cmd.source == "webhook" and runner.strategy.read_webhook is not None:
        read = runner.strategy.read_webhook
    with clock.waiting_for_lock():
        payment = await read(session, cmd.payment_id)
    await pause("payment_read", payment.status if payment else "missing")
    if payment is None:
        raise NotFound(f"payment {cmd.payment_id} does not exist")
    # Only now: the event row's foreign key takes FOR KEY SHARE on the payment row. Taken
    # before FOR UPDATE, two webhooks would each hold it and wait for the other's: a deadlock.
    # A strategy that takes no lock first (late_event) records the event once it has written
    # the payment: its UPDATE of the unique gateway_payment_id wants FOR UPDATE, which two
    # webhooks' FOR KEY SHARE would make wait for each other.
    fresh_event = runner.strategy.late_event or await _new_event(session, runner, cmd)
    order = await session.get(Order, payment.order_id)
    assert order is not None  # foreign key
    command.validate(cmd, payment, order)
    return payment, order, fresh_event


@dataclass
class _GatewayMemo:
    """Survives the retries of one request: a capture the gateway accepted stays accepted
    when PostgreSQL aborts the transaction (40001 at commit under SERIALIZABLE, a killed
    backend), so the retry must record it, not capture again. A capture the gateway failed
    stays failed too: when the connection dies under the rollback of that attempt, the retry
    answers the same failure instead of calling the gateway a second time.

    At SERIALIZABLE the accepted capture is also committed beside the transaction
    (command.record_accepted): SSI may roll back the request that holds the payment after
    the gateway answered, and the next request to win the payment must not ask again."""

    captured: bool = False
    failed: GatewayFailed | None = None
    recorded: bool = False  # the acceptance is committed (at SERIALIZABLE only)


async def _claimed_capture(
    session: AsyncSession,
    runner: Runner,
    cmd: CaptureCommand,
    payment: Payment,
    order: Order,
    memo: _GatewayMemo,
) -> CaptureResult:
    """A strategy whose conditional write decides the winner (Strategy.claim): claimed before
    the gateway is asked, so only the winner calls it; the loser writes nothing more."""
    assert runner.strategy.claim is not None
    if cmd.capture_at_gateway:
        # The claim runs in the gateway step, as the gateway call does in the other flows: the
        # explorer's step table (harness.explore.steps) then holds for every strategy.
        await pause("gateway_called")
    claimed = await runner.strategy.claim(session, cmd, payment, order)
    fresh_event = not runner.strategy.late_event or await _new_event(session, runner, cmd)
    if claimed is False:
        await session.refresh(payment)  # what the winner committed
        return await command.stored_result(
            session, payment, idempotent=True, duplicate_event=not fresh_event
        )
    await _capture_at_gateway(runner, cmd, order, memo, paused=True)
    if isinstance(claimed, CaptureResult):  # the claim wrote payment, invoice and order
        return claimed
    return await _write_capture(session, runner, cmd, payment, order)


async def _capture_at_gateway(
    runner: Runner,
    cmd: CaptureCommand,
    order: Order,
    memo: _GatewayMemo,
    *,
    paused: bool = False,
) -> None:
    if not cmd.capture_at_gateway:
        return
    # Any statement or the COMMIT of a SERIALIZABLE transaction may fail with 40001, also
    # after the gateway answered, and the payment's lock or claim goes with it. SSI tracks
    # reads per index page, so even captures of other payments can cause it.
    durable = runner.isolation == "SERIALIZABLE"
    intents = runner.intents or runner.maker
    if memo.captured:
        if durable and not memo.recorded:  # the last attempt died before it was committed
            await command.record_accepted(intents, cmd)
            memo.recorded = True
        return
    if memo.failed is not None:
        raise memo.failed
    if not paused:
        await pause("gateway_called")
    # Read with the payment won (its lock or claim held): a request rolled back after the
    # gateway answered committed that answer first, so it is seen here.
    if durable and await command.gateway_accepted(intents, cmd):
        memo.captured = memo.recorded = True
        return
    try:
        await runner.gateway.capture(cmd.gateway_payment_id, order.amount, order.currency)
    except GatewayError as exc:
        code = "gateway_refused" if exc.refused else "gateway_error"
        memo.failed = GatewayFailed(str(exc), code=code)
        raise memo.failed from exc
    memo.captured = True
    if durable:
        await command.record_accepted(intents, cmd)
        memo.recorded = True


async def _write_capture(
    session: AsyncSession, runner: Runner, cmd: CaptureCommand, payment: Payment, order: Order
) -> CaptureResult:
    """Payment, then invoice, then order: the one lock order every capture takes. One UPDATE
    each: it takes the row lock a SELECT ... FOR UPDATE would have taken, in the same order,
    and RETURNING answers what was written (no read before, no flush of a loaded object)."""
    params = {"payment_id": payment.id, "order_id": order.id, **_capture_params(cmd)}
    # The transaction's connection itself: plain SQL needs nothing of the ORM's execute.
    conn = await session.connection()
    await conn.execute(_WRITE_PAYMENT, params)
    if runner.strategy.late_event:
        await _new_event(session, runner, cmd)
    await pause("payment_written")
    invoice_status = (await conn.execute(_WRITE_INVOICE, params)).scalar_one_or_none()
    await pause("invoice_written")
    order_status = (await conn.execute(_WRITE_ORDER, params)).scalar_one()
    await pause("order_written")
    return CaptureResult(
        payment_id=payment.id,
        status="captured",
        gateway_payment_id=cmd.gateway_payment_id,
        idempotent=False,
        duplicate_event=False,
        invoice_status=invoice_status,
        order_status=order_status,
    )


# No condition on the status: the strategy's read decided, and naive must stay able to write
# twice (the incident). The ORM objects loaded by the read are not touched, so the session
# has nothing to flush at COMMIT.
_WRITE_PAYMENT = text(
    "UPDATE payments SET status = 'captured', gateway_payment_id = :gateway_payment_id, "
    "captured_at = now(), error_code = NULL, "
    "method = COALESCE(CAST(:method AS varchar(32)), method) WHERE id = :payment_id"
)
_WRITE_INVOICE = text(
    "UPDATE invoices SET status = 'paid', amount_paid = amount, paid_at = now() "
    "WHERE payment_id = :payment_id RETURNING status"
)
_WRITE_ORDER = text(
    "UPDATE orders SET status = 'paid', paid_at = now() WHERE id = :order_id RETURNING status"
)


def _capture_params(cmd: CaptureCommand) -> dict[str, object]:
    return {"gateway_payment_id": cmd.gateway_payment_id, "method": cmd.method or None}


async def _new_event(session: AsyncSession, runner: Runner, cmd: CaptureCommand) -> bool:
    """Whether the webhook's event id is new: inserted under its unique key, or, with dedupe
    off (WEBHOOK_DEDUPE), taken as new every time; the status check after the lock then
    answers a redelivery of a capture idempotently."""
    return not runner.dedupe or await command.record_event(session, cmd)


async def mark_failed(runner: Runner, cmd: CaptureCommand, error_code: str | None) -> CaptureResult:
    async def attempt() -> CaptureResult:
        clock = AttemptClock()
        async with runner.maker() as session:
            async with session.begin():
                payment, _, fresh_event = await _lock_payment(session, runner, cmd, clock)
                # Razorpay documents payment.failed followed by payment.captured as normal, so
                # a failure never undoes a capture, and a later capture may follow a failure.
                repeat = not fresh_event or payment.status in ("captured", "failed")
                await pause("status_checked", "repeat" if repeat else payment.status)
                if not repeat and runner.strategy.claim is not None:
                    # Read without a lock: a capture may have committed since. A failure is
                    # written only over a payment that is still not captured, read locked.
                    locked = select(Payment).where(Payment.id == payment.id).with_for_update()
                    payment = await _fresh(session, locked) or payment
                    repeat = payment.status in ("captured", "failed")
                if not repeat and runner.strategy.late_event:
                    repeat = not await _new_event(session, runner, cmd)
                if not repeat:
                    payment.status = "failed"
                    payment.gateway_payment_id = cmd.gateway_payment_id
                    payment.error_code = error_code
                    await session.flush()
                    await pause("payment_written")
                result = await command.stored_result(
                    session, payment, idempotent=repeat, duplicate_event=not fresh_event
                )
                await pause("before_commit")
            clock.lock_released()
        return result

    return await _retried(runner, attempt)


async def _retried(
    runner: Runner, attempt: Callable[[], Awaitable[CaptureResult]]
) -> CaptureResult:
    try:
        return await retrying(attempt, conflicts=runner.retries)
    finally:
        finish()  # the request has left the capture path, whatever the outcome


_Row = TypeVar("_Row", Payment, Invoice, Order)


async def _fresh(session: AsyncSession, stmt: Select[_Row]) -> _Row | None:
    # populate_existing: a row already in the session is refreshed from what the statement
    # read, so a status checked after the lock is the committed one.
    result = await session.execute(stmt.execution_options(populate_existing=True))
    return result.scalar_one_or_none()


Claim = Callable[[AsyncSession, CaptureCommand, Payment, Order], Awaitable[bool | CaptureResult]]


@dataclass(frozen=True)
class Strategy:
    """How the capture path serialises: how it reads the payment, and whether that read takes
    a row lock (`lock_rows`: the explorer's step table reads it). The invoice and order are
    written by one UPDATE each, which locks them whatever the strategy.

    Optional hooks (docs/strategies.md): `read_webhook` reads the payment for a webhook
    instead of `read_payment`; `claim` is a conditional write after the status check and
    before the gateway call that decides the single winner (False: another request won, the
    answer is a repeat; True: go on writing; a CaptureResult: it wrote everything);
    `isolation_level` is the level this strategy always runs at, whatever the service's;
    `late_event`: the webhook's event id is recorded after the payment is written, not
    before (a strategy that reads the payment without a lock needs it: _lock_payment)."""

    name: str
    summary: str
    read_payment: Callable[[AsyncSession, int], Awaitable[Payment | None]]
    lock_rows: bool
    read_webhook: Callable[[AsyncSession, int], Awaitable[Payment | None]] | None = None
    claim: Claim | None = None
    isolation_level: str | None = None
    late_event: bool = False

    @property
    def advisory(self) -> bool:
        return self.read_payment is read_advisory


NAIVE = Strategy(
    "naive", "plain read, status checked without a lock (the incident)", read_naive, False
)
FOR_UPDATE = Strategy(
    "for_update", "SELECT ... FOR UPDATE, status checked after the lock", read_for_update, True
)
ADVISORY = Strategy(
    "advisory", "pg_advisory_xact_lock on the payment id, then plain reads", read_advisory, False
)
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (NAIVE, FOR_UPDATE, ADVISORY)}

# Two-int form in a namespace of its own, so no other advisory user collides; ids beyond int4
# wrap, which can only over-serialise, never under.
ADVISORY_NAMESPACE = 720_132
ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:ns, (:id % 2147483647)::int)")


@dataclass(frozen=True)
class Runner:
    """What a capture needs from the running service."""

    maker: async_sessionmaker[AsyncSession]
    strategy: Strategy
    gateway: GatewayClient
    isolation_level: str
    retries: int  # serialisation failures retried before a 409
    # Where capture intents are committed (payrace.service.reconcile): a pool of its own, as
    # an outbox writer would have. The intent touches only capture_intents, which the capture
    # path reads only for its accepted_at (at SERIALIZABLE, where every non-LOCAL step is a
    # schedule choice anyway) and an intent is inserted without it, so it commutes with every
    # step of every other request and is no schedule choice for `payrace explore`; on the
    # capture pool it would count as one. The gateway's acceptance is committed here too.
    intents: async_sessionmaker[AsyncSession] | None = None
    # Webhook event-id dedupe (webhook_events' unique key), beside whichever strategy runs.
    dedupe: bool = True

    @property
    def isolation(self) -> str:
        """The level the capture's transaction runs at: the strategy's own, else the service's."""
        return self.strategy.isolation_level or self.isolation_level
