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
UPDATE each for payment, invoice and order (4 statements), then COMMIT; a repeat: the read
and the status read (2). Webhook event-id dedupe (Runner.dedupe) adds its INSERT. At
SERIALIZABLE the gateway's acceptance is committed beside the transaction (_GatewayMemo).
Each statement is SQL text sent by asyncpg on the transaction's connection
(payrace.service.sql), its rows read into PaymentRow / OrderRow (payrace.service.models).

Retries: payrace.service.retry; the command's checks: payrace.service.command; `pause()` and
the clock: test-only instrumentation (payrace.service.instrument), no-ops unless enabled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from payrace.service import command
from payrace.service.command import CaptureCommand, CaptureResult
from payrace.service.errors import GatewayFailed, NotFound
from payrace.service.gateway_client import GatewayClient, GatewayError
from payrace.service.instrument.probes import finish, pause, record_backend
from payrace.service.instrument.timing import AttemptClock
from payrace.service.models import ORDER_COLUMNS, PAYMENT_COLUMNS, OrderRow, PaymentRow
from payrace.service.retry import retrying
from payrace.service.sql import Database, Tx


async def read_naive(tx: Tx, payment_id: int) -> PaymentRow | None:
    """The incident: a plain read, so two concurrent requests both see `pending`."""
    return await read_with_order(tx, payment_id)


async def read_for_update(tx: Tx, payment_id: int) -> PaymentRow | None:
    """The fix: a second request waits here until the first commits, then sees `captured`."""
    return await read_with_order(tx, payment_id, lock=True)


async def read_with_order(
    tx: Tx, payment_id: int, *, lock: bool = False, nowait: bool = False, skip_locked: bool = False
) -> PaymentRow | None:
    """The payment and its order in one round trip, FOR UPDATE OF the payment alone when
    `lock` (NOWAIT / SKIP LOCKED on request). Only the order's columns that never change are
    read here (its status is read after the lock: stored_result)."""
    sql = _READ_WITH_ORDER
    if lock:
        sql = _LOCKED[nowait, skip_locked]
    return PaymentRow.of(await tx.fetchrow(sql, payment_id))


async def read_advisory(tx: Tx, payment_id: int) -> PaymentRow | None:
    """An advisory lock keyed by the payment, then a plain read: the same guarantee for code
    paths that all take it, none for those that don't."""
    await tx.execute(ADVISORY_LOCK, ADVISORY_NAMESPACE, payment_id)
    return await read_naive(tx, payment_id)


# The incident's read: a plain SELECT, which neither waits for nor blocks a concurrent capture.
_READ_WITH_ORDER = (
    f"SELECT {PAYMENT_COLUMNS}, {ORDER_COLUMNS} "
    "FROM payments JOIN orders ON orders.id = payments.order_id WHERE payments.id = $1"
)
# The fix: the same read, locking the payment row (not the order's) until COMMIT. By
# (nowait, skip_locked); PostgreSQL takes one of the two at most.
_LOCKED = {
    (False, False): _READ_WITH_ORDER + " FOR UPDATE OF payments",
    (True, False): _READ_WITH_ORDER + " FOR UPDATE OF payments NOWAIT",
    (False, True): _READ_WITH_ORDER + " FOR UPDATE OF payments SKIP LOCKED",
}
_READ_ORDER = "SELECT id, gateway_order_id, amount, currency FROM orders WHERE id = $1"


async def capture(runner: Runner, cmd: CaptureCommand) -> CaptureResult:
    memo = _GatewayMemo()  # the gateway's answer, kept across the retried attempts
    if cmd.capture_at_gateway:
        # Committed before the gateway is asked: a capture it accepts can then never be lost,
        # even when every attempt below dies before COMMIT (payrace.service.reconcile).
        intents = runner.intents or runner.db
        await retrying(lambda: command.record_intent(intents, cmd), conflicts=runner.retries)

    async def attempt() -> CaptureResult:
        clock = AttemptClock()
        async with runner.db.transaction(runner.isolation) as tx:
            payment, order, fresh_event = await _lock_payment(tx, runner, cmd, clock)
            # Checked only now, with the lock held: a waiter sees what the winner committed.
            repeat = not fresh_event or payment.status == "captured"
            await pause("status_checked", "repeat" if repeat else payment.status)
            if repeat:
                result = await command.stored_result(
                    tx, payment, idempotent=True, duplicate_event=not fresh_event
                )
            elif runner.strategy.claim is not None:
                result = await _claimed_capture(tx, runner, cmd, payment, order, memo)
            else:
                await _capture_at_gateway(runner, cmd, order, memo)
                result = await _write_capture(tx, runner, cmd, payment, order)
            await pause("before_commit")
        clock.committed()
        return result

    return await _retried(runner, attempt)


async def _lock_payment(
    tx: Tx, runner: Runner, cmd: CaptureCommand, clock: AttemptClock
) -> tuple[PaymentRow, OrderRow, bool]:
    """Read the payment the strategy's way, dedupe the event, check the command.

    Returns (payment, its order, whether the event id is new)."""
    record_backend(tx)
    await pause("txn_begun")
    read = runner.strategy.read_payment
    if cmd.source == "webhook" and runner.strategy.read_webhook is not None:
        read = runner.strategy.read_webhook
    with clock.waiting_for_lock():
        payment = await read(tx, cmd.payment_id)
    await pause("payment_read", payment.status if payment else "missing")
    if payment is None:
        raise NotFound(f"payment {cmd.payment_id} does not exist")
    # Only now: the event row's foreign key takes FOR KEY SHARE on the payment row. Taken
    # before FOR UPDATE, two webhooks would each hold it and wait for the other's: a deadlock.
    # A strategy that takes no lock first (late_event) records the event once it has written
    # the payment: its UPDATE of the unique gateway_payment_id wants FOR UPDATE, which two
    # webhooks' FOR KEY SHARE would make wait for each other.
    fresh_event = runner.strategy.late_event or await _new_event(tx, runner, cmd)
    # A read of the payment alone (a team's strategy) costs a plain read of the order's
    # columns that never change.
    order = payment.order or OrderRow.of(await tx.fetchrow(_READ_ORDER, payment.order_id))
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
    tx: Tx,
    runner: Runner,
    cmd: CaptureCommand,
    payment: PaymentRow,
    order: OrderRow,
    memo: _GatewayMemo,
) -> CaptureResult:
    """A strategy whose conditional write decides the winner (Strategy.claim): claimed before
    the gateway is asked, so only the winner calls it; the loser writes nothing more."""
    assert runner.strategy.claim is not None
    if cmd.capture_at_gateway:
        # The claim runs in the gateway step, as the gateway call does in the other flows: the
        # explorer's step table (harness.explore.steps) then holds for every strategy.
        await pause("gateway_called")
    claimed = await runner.strategy.claim(tx, cmd, payment, order)
    fresh_event = not runner.strategy.late_event or await _new_event(tx, runner, cmd)
    if claimed is False:
        # What the winner committed: the payment's columns are read again with the statuses.
        return await command.stored_result(
            tx, payment, idempotent=True, duplicate_event=not fresh_event, reread=True
        )
    await _capture_at_gateway(runner, cmd, order, memo, paused=True)
    if isinstance(claimed, CaptureResult):  # the claim wrote payment, invoice and order
        return claimed
    return await _write_capture(tx, runner, cmd, payment, order)


async def _capture_at_gateway(
    runner: Runner,
    cmd: CaptureCommand,
    order: OrderRow,
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
    intents = runner.intents or runner.db
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
    tx: Tx, runner: Runner, cmd: CaptureCommand, payment: PaymentRow, order: OrderRow
) -> CaptureResult:
    """Payment, then invoice, then order: the one lock order every capture takes. One UPDATE
    each: it takes the row lock a SELECT ... FOR UPDATE would have taken, in the same order,
    and RETURNING answers what was written (no read before)."""
    await tx.execute(_WRITE_PAYMENT, payment.id, cmd.gateway_payment_id, cmd.method or None)
    if runner.strategy.late_event:
        await _new_event(tx, runner, cmd)
    await pause("payment_written")
    invoice_status = await tx.fetchval(_WRITE_INVOICE, payment.id)
    await pause("invoice_written")
    order_status = await tx.fetchval(_WRITE_ORDER, order.id)
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
# twice (the incident).
_WRITE_PAYMENT = (
    "UPDATE payments SET status = 'captured', gateway_payment_id = $2, captured_at = now(), "
    "error_code = NULL, method = COALESCE($3::varchar(32), method) WHERE id = $1"
)
_WRITE_INVOICE = (
    "UPDATE invoices SET status = 'paid', amount_paid = amount, paid_at = now() "
    "WHERE payment_id = $1 RETURNING status"
)
_WRITE_ORDER = "UPDATE orders SET status = 'paid', paid_at = now() WHERE id = $1 RETURNING status"
_WRITE_FAILED = (
    "UPDATE payments SET status = 'failed', gateway_payment_id = $2, error_code = $3 WHERE id = $1"
)


async def _new_event(tx: Tx, runner: Runner, cmd: CaptureCommand) -> bool:
    """Whether the webhook's event id is new: inserted under its unique key, or, with dedupe
    off (WEBHOOK_DEDUPE), taken as new every time; the status check after the lock then
    answers a redelivery of a capture idempotently."""
    return not runner.dedupe or await command.record_event(tx, cmd)


async def mark_failed(runner: Runner, cmd: CaptureCommand, error_code: str | None) -> CaptureResult:
    async def attempt() -> CaptureResult:
        clock = AttemptClock()
        async with runner.db.transaction(runner.isolation) as tx:
            payment, _, fresh_event = await _lock_payment(tx, runner, cmd, clock)
            # Razorpay documents payment.failed followed by payment.captured as normal, so
            # a failure never undoes a capture, and a later capture may follow a failure.
            repeat = not fresh_event or payment.status in ("captured", "failed")
            await pause("status_checked", "repeat" if repeat else payment.status)
            if not repeat and runner.strategy.claim is not None:
                # Read without a lock: a capture may have committed since. A failure is
                # written only over a payment that is still not captured, read locked.
                payment = await read_for_update(tx, payment.id) or payment
                repeat = payment.status in ("captured", "failed")
            if not repeat and runner.strategy.late_event:
                repeat = not await _new_event(tx, runner, cmd)
            if not repeat:
                await tx.execute(_WRITE_FAILED, payment.id, cmd.gateway_payment_id, error_code)
                payment = replace(
                    payment, status="failed", gateway_payment_id=cmd.gateway_payment_id
                )
                await pause("payment_written")
            result = await command.stored_result(
                tx, payment, idempotent=repeat, duplicate_event=not fresh_event
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


Read = Callable[[Tx, int], Awaitable[PaymentRow | None]]
Claim = Callable[[Tx, CaptureCommand, PaymentRow, OrderRow], Awaitable[bool | CaptureResult]]


@dataclass(frozen=True)
class Strategy:
    """How the capture path serialises: how it reads the payment, and whether that read takes
    a row lock (`lock_rows`: the explorer's step table reads it). The invoice and order are
    written by one UPDATE each, which locks them whatever the strategy.

    A read runs its SQL on the capture's transaction (sql.Tx: fetchrow / fetchval / execute
    with $n parameters) and answers a PaymentRow (PaymentRow.of(row)), None for no payment.

    Optional hooks (docs/strategies.md): `read_webhook` reads the payment for a webhook
    instead of `read_payment`; `claim` is a conditional write after the status check and
    before the gateway call that decides the single winner (False: another request won, the
    answer is a repeat; True: go on writing; a CaptureResult: it wrote everything);
    `isolation_level` is the level this strategy always runs at, whatever the service's;
    `late_event`: the webhook's event id is recorded after the payment is written, not
    before (a strategy that reads the payment without a lock needs it: _lock_payment)."""

    name: str
    summary: str
    read_payment: Read
    lock_rows: bool
    read_webhook: Read | None = None
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
ADVISORY_LOCK = "SELECT pg_advisory_xact_lock($1, ($2::bigint % 2147483647)::int)"


@dataclass(frozen=True)
class Runner:
    """What a capture needs from the running service."""

    db: Database  # the capture transactions' pool
    strategy: Strategy
    gateway: GatewayClient
    isolation_level: str
    retries: int  # serialisation failures retried before a 409
    # Where capture intents are committed (payrace.service.reconcile): a pool of its own, as
    # an outbox writer would have. The intent touches only capture_intents, which the capture
    # path reads only for its accepted_at (at SERIALIZABLE, where every non-LOCAL step is a
    # schedule choice anyway) and an intent is inserted without it, so it commutes with every
    # step of every other request and is no schedule choice for `payrace explore`; on the
    # capture pool it would count as one. The gateway's acceptance is committed here too,
    # while the capture holds its own connection: one pool for both could run dry with every
    # connection held by a capture waiting for another.
    intents: Database | None = None
    # Webhook event-id dedupe (webhook_events' unique key), beside whichever strategy runs.
    dedupe: bool = True

    @property
    def isolation(self) -> str:
        """The level the capture's transaction runs at: the strategy's own, else the service's."""
        return self.strategy.isolation_level or self.isolation_level

    async def open(self) -> None:
        await self.db.open()
        if self.intents is not None:
            await self.intents.open()

    async def close(self) -> None:
        await self.db.close()
        if self.intents is not None:
            await self.intents.close()
