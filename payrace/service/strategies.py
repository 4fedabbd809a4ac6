"""More ways to serialise a capture, beside naive / for_update / advisory (service.capture),
and strategies a team brings by import path. Each is a few lines of SQL in one place:

    nowait        SELECT ... FOR UPDATE NOWAIT: the loser does not wait, it answers a
                  retryable 409 with Retry-After (the browser or Razorpay sends it again)
    skip_locked   the callback waits (FOR UPDATE, a person is waiting); a webhook skips a
                  locked payment (SKIP LOCKED) and answers 409, so Razorpay redelivers it
    optimistic    no explicit lock: a plain read, then UPDATE ... WHERE status <> 'captured'
                  RETURNING decides the single winner before the gateway is asked; the
                  loser touches neither invoice nor order
    serializable  plain reads at SERIALIZABLE, then optimistic's conditional UPDATE claims
                  the capture before the gateway is asked: a concurrent claimer fails with
                  40001 and is re-run (SERIALIZATION_RETRIES), which then finds the payment
                  captured and answers idempotently; only the claimer calls the gateway
    atomic        the whole capture in one statement (a data-modifying CTE writing payment,
                  invoice and order), claimed before the gateway is asked

    STRATEGIES    every strategy by name (the same dict as service.capture.STRATEGIES)
    resolve()     a name, or `package.module:Name` naming a capture.Strategy; UnknownStrategy
                  (a ValueError) says what to give instead
    names()       the built-in names, for messages

The protocol a team's strategy implements is capture.Strategy (docs/strategies.md).
"""

from __future__ import annotations

import importlib
import os
import re
import sys

import asyncpg

from payrace.service.capture import (
    ADVISORY,
    FOR_UPDATE,
    NAIVE,
    STRATEGIES,
    Strategy,
    read_for_update,
    read_naive,
    read_with_order,
)
from payrace.service.command import CaptureCommand, CaptureResult
from payrace.service.errors import RetryLater
from payrace.service.models import OrderRow, PaymentRow
from payrace.service.sql import Tx


async def read_nowait(tx: Tx, payment_id: int) -> PaymentRow | None:
    try:
        return await read_with_order(tx, payment_id, lock=True, nowait=True)
    except asyncpg.LockNotAvailableError as exc:  # 55P03: another request holds it
        raise RetryLater(
            f"payment {payment_id} is being captured by another request; "
            "retry after Retry-After seconds"
        ) from exc


async def read_skip_locked(tx: Tx, payment_id: int) -> PaymentRow | None:
    payment = await read_with_order(tx, payment_id, lock=True, skip_locked=True)
    if payment is None and await tx.fetchval(_EXISTS, payment_id):
        # Locked by a capture in flight: any non-2xx makes Razorpay deliver the event again,
        # by which time the payment is captured and the redelivery is a repeat.
        raise RetryLater(
            f"payment {payment_id} is being captured by another request; "
            "the webhook will be redelivered"
        )
    return payment


_EXISTS = "SELECT EXISTS (SELECT 1 FROM payments WHERE id = $1)"

_CLAIM_PAYMENT = """
UPDATE payments
   SET status = 'captured', gateway_payment_id = $2, captured_at = now(),
       error_code = NULL, method = COALESCE($3::varchar(32), method)
 WHERE id = $1 AND status <> 'captured'
RETURNING id, order_id"""
_PAY_INVOICE = (
    "UPDATE invoices SET status = 'paid', amount_paid = amount, paid_at = now() "
    "WHERE payment_id = $1 RETURNING status"
)
_PAY_ORDER = "UPDATE orders SET status = 'paid', paid_at = now() WHERE id = $1 RETURNING status"


def _params(cmd: CaptureCommand) -> tuple[object, ...]:
    return (cmd.payment_id, cmd.gateway_payment_id, cmd.method or None)


def _result(cmd: CaptureCommand, invoice: str | None, order: str | None) -> CaptureResult:
    return CaptureResult(
        payment_id=cmd.payment_id,
        status="captured",
        gateway_payment_id=cmd.gateway_payment_id,
        idempotent=False,
        duplicate_event=False,
        invoice_status=invoice,
        order_status=order,
    )


async def claim_optimistic(
    tx: Tx, cmd: CaptureCommand, payment: PaymentRow, order: OrderRow
) -> bool | CaptureResult:
    """The conditional UPDATE is the only serialisation: a concurrent one waits for the
    winner's row lock, then re-checks `status <> 'captured'` on what it committed (READ
    COMMITTED) or fails with 40001 and is retried (REPEATABLE READ and up)."""
    won = await tx.fetchrow(_CLAIM_PAYMENT, *_params(cmd))
    if won is None:
        return False
    invoice = await tx.fetchval(_PAY_INVOICE, cmd.payment_id)
    paid = await tx.fetchval(_PAY_ORDER, won["order_id"])
    return _result(cmd, invoice, paid)


# Payment first: invoice and order are written only for the payment row the first UPDATE
# claimed, so the lock order stays payment -> invoice -> order and a loser writes nothing.
_ATOMIC = f"""
WITH p AS ({_CLAIM_PAYMENT}),
i AS (
    UPDATE invoices SET status = 'paid', amount_paid = amount, paid_at = now()
     WHERE payment_id IN (SELECT id FROM p) RETURNING status
),
o AS (
    UPDATE orders SET status = 'paid', paid_at = now()
     WHERE id IN (SELECT order_id FROM p) RETURNING status
)
SELECT (SELECT count(*) FROM p) AS won, (SELECT status FROM i) AS invoice_status,
       (SELECT status FROM o) AS order_status"""


async def claim_atomic(
    tx: Tx, cmd: CaptureCommand, payment: PaymentRow, order: OrderRow
) -> bool | CaptureResult:
    row = await tx.fetchrow(_ATOMIC, *_params(cmd))
    assert row is not None  # the SELECT answers one row, claimed or not
    if not row["won"]:
        return False
    return _result(cmd, row["invoice_status"], row["order_status"])


NOWAIT = Strategy(
    "nowait", "FOR UPDATE NOWAIT; the loser answers a retryable 409", read_nowait, True
)
SKIP_LOCKED = Strategy(
    "skip_locked",
    "callback FOR UPDATE; a webhook skips a locked payment (409, redelivered)",
    read_for_update,
    True,
    read_webhook=read_skip_locked,
)
OPTIMISTIC = Strategy(
    "optimistic",
    "no lock; UPDATE ... WHERE status <> 'captured' RETURNING picks the winner",
    read_naive,
    False,
    claim=claim_optimistic,
    late_event=True,
)
# Without the claim, two requests that both capture at the gateway (the callback and a
# payment.authorized webhook) both read `pending` and both call the gateway before PostgreSQL
# aborts either at its write: SERIALIZABLE decides which *transaction* survives, too late for
# a call that left the database. The claim moves that decision before the call: the second
# claimer's UPDATE waits for the first's row lock and, at SERIALIZABLE, fails with 40001
# instead of matching no row; its re-run reads what the winner committed.
SERIALIZABLE = Strategy(
    "serializable",
    "plain reads at SERIALIZABLE; a conditional UPDATE claims before the gateway; 40001 retried",
    read_naive,
    False,
    claim=claim_optimistic,
    isolation_level="SERIALIZABLE",
    late_event=True,
)
ATOMIC = Strategy(
    "atomic",
    "one data-modifying CTE writes payment, invoice and order",
    read_naive,
    False,
    claim=claim_atomic,
    late_event=True,
)
BUILT_IN = (NAIVE, FOR_UPDATE, ADVISORY, NOWAIT, SKIP_LOCKED, OPTIMISTIC, SERIALIZABLE, ATOMIC)
STRATEGIES.update({s.name: s for s in BUILT_IN})

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class UnknownStrategy(ValueError):
    pass


def names() -> list[str]:
    return [s.name for s in BUILT_IN]


def is_import_path(spec: str) -> bool:
    return ":" in spec


def resolve(spec: str) -> Strategy:
    """A built-in name, or `package.module:Name` naming a Strategy (registered under the
    path, so every later lookup by it finds the same object)."""
    if spec in STRATEGIES:
        return STRATEGIES[spec]
    choose = f"choose from {', '.join(names())}, or give package.module:Name"
    if not is_import_path(spec):
        raise UnknownStrategy(f"unknown strategy {spec}; {choose}")
    if not _IMPORT_PATH.match(spec):
        raise UnknownStrategy(
            f"strategy {spec!r} is not an import path like mypackage.capture:MY_STRATEGY"
        )
    module_name, _, attr = spec.partition(":")
    # As uvicorn does: the current directory is where a team's package is found.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownStrategy(
            f"strategy {spec!r}: cannot import {module_name} ({exc}); is it installed or on "
            "PYTHONPATH?"
        ) from None
    found = getattr(module, attr, None)
    if found is None:
        raise UnknownStrategy(f"strategy {spec!r}: {module_name} has no attribute {attr}")
    if not isinstance(found, Strategy):
        raise UnknownStrategy(
            f"strategy {spec!r} is a {type(found).__name__}, not a "
            "payrace.service.capture.Strategy (docs/strategies.md)"
        )
    STRATEGIES[spec] = found
    return found


__all__ = [
    "ATOMIC",
    "NOWAIT",
    "OPTIMISTIC",
    "SERIALIZABLE",
    "SKIP_LOCKED",
    "STRATEGIES",
    "UnknownStrategy",
    "is_import_path",
    "names",
    "resolve",
]
