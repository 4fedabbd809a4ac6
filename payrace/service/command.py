"""What a capture is asked, how the ask is checked against the stored rows, what it answers.

    CaptureCommand   what the client callback or a webhook asks for (built by the routes)
    CaptureResult    the payment's state after the call, and whether it was a repeat
    validate()       the command against the locked payment and its order: order, amount,
                     currency and gateway payment id must match, else Rejected (400)
    record_event()   insert the webhook's event id; False when it was already delivered
    record_intent()  commit a capture intent before the gateway is asked to capture
    record_accepted() / gateway_accepted()   commit / read that the gateway accepted it
    stored_result()  the answer for a call that wrote nothing (a repeat, a failure kept)

Used by payrace.service.capture inside its transaction, after the payment lock is held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from payrace.service.errors import Rejected
from payrace.service.models import OrderRow, PaymentRow
from payrace.service.sql import Database, Tx


@dataclass(frozen=True)
class CaptureCommand:
    source: Literal["client", "webhook", "reconcile"]
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


def validate(cmd: CaptureCommand, payment: PaymentRow, order: OrderRow) -> None:
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


async def record_event(tx: Tx, cmd: CaptureCommand) -> bool:
    """Insert the event id; False when it was already delivered (a duplicate)."""
    if cmd.event_id is None:
        return True
    inserted = await tx.fetchval(_RECORD_EVENT, cmd.event_id, cmd.event or "", cmd.payment_id)
    return inserted is not None


_RECORD_EVENT = (
    "INSERT INTO webhook_events (event_id, event, payment_id) VALUES ($1, $2, $3) "
    "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
)


async def record_intent(intents: Database, cmd: CaptureCommand) -> None:
    """Commit "this payment is about to be captured at the gateway as this gateway payment"
    on its own (one statement in autocommit), before any gateway call. A payment that does
    not exist records nothing (the capture then answers 404); a repeat of the same pair,
    nothing new."""
    await intents.execute(_RECORD_INTENT, cmd.payment_id, cmd.gateway_payment_id)


_RECORD_INTENT = (
    "INSERT INTO capture_intents (payment_id, gateway_payment_id) "
    "SELECT id, $2::varchar(64) FROM payments WHERE id = $1 "
    "ON CONFLICT (payment_id, gateway_payment_id) DO NOTHING"
)


async def record_accepted(intents: Database, cmd: CaptureCommand) -> None:
    """Commit, on its own, that the gateway has this capture: it outlives the transaction of
    the request that asked, which SERIALIZABLE may still roll back."""
    await intents.execute(_RECORD_ACCEPTED, cmd.payment_id, cmd.gateway_payment_id)


_RECORD_ACCEPTED = (
    "UPDATE capture_intents SET accepted_at = now() "
    "WHERE payment_id = $1 AND gateway_payment_id = $2 AND accepted_at IS NULL"
)


async def gateway_accepted(intents: Database, cmd: CaptureCommand) -> bool:
    """Whether an earlier request's capture of this gateway payment was accepted (committed
    by record_accepted, read outside the capture's own snapshot)."""
    found = await intents.fetchval(_GATEWAY_ACCEPTED, cmd.payment_id, cmd.gateway_payment_id)
    return bool(found)


_GATEWAY_ACCEPTED = (
    "SELECT EXISTS (SELECT 1 FROM capture_intents WHERE payment_id = $1 "
    "AND gateway_payment_id = $2 AND accepted_at IS NOT NULL)"
)


async def stored_result(
    tx: Tx,
    payment: PaymentRow,
    *,
    idempotent: bool,
    duplicate_event: bool,
    reread: bool = False,
) -> CaptureResult:
    """The statuses as stored; the payment's own as `payment` says, unless `reread` (what
    another transaction committed since `payment` was read)."""
    row = await tx.fetchrow(_STORED, payment.id)
    assert row is not None  # the payment was read in this transaction
    status, gateway_payment_id = payment.status, payment.gateway_payment_id
    if reread:
        status, gateway_payment_id = row["status"], row["gateway_payment_id"]
    return CaptureResult(
        payment_id=payment.id,
        status=status,
        gateway_payment_id=gateway_payment_id,
        idempotent=idempotent,
        duplicate_event=duplicate_event,
        invoice_status=row["invoice_status"],
        order_status=row["order_status"],
    )


_STORED = (
    "SELECT payments.status, payments.gateway_payment_id, invoices.status AS invoice_status, "
    "orders.status AS order_status FROM payments JOIN orders ON orders.id = payments.order_id "
    "LEFT JOIN invoices ON invoices.payment_id = payments.id WHERE payments.id = $1"
)
