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

from sqlalchemy import ColumnElement, exists, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from payrace.service.errors import Rejected
from payrace.service.models import CaptureIntent, Invoice, Order, Payment, WebhookEvent


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


def validate(cmd: CaptureCommand, payment: Payment, order: Order) -> None:
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


async def record_event(session: AsyncSession, cmd: CaptureCommand) -> bool:
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


async def record_intent(maker: async_sessionmaker[AsyncSession], cmd: CaptureCommand) -> None:
    """Commit "this payment is about to be captured at the gateway as this gateway payment"
    in a transaction of its own, before any gateway call. A payment that does not exist
    records nothing (the capture then answers 404); a repeat of the same pair, nothing new."""
    async with maker() as session, session.begin():
        conn = await session.connection()
        await conn.execute(
            _RECORD_INTENT,
            {"payment_id": cmd.payment_id, "gateway_payment_id": cmd.gateway_payment_id},
        )


# Written once: built per call, the INSERT ... SELECT construct cost more CPU than its round
# trip (py-spy, docs/benchmarks.md).
_RECORD_INTENT = text(
    "INSERT INTO capture_intents (payment_id, gateway_payment_id) "
    "SELECT id, CAST(:gateway_payment_id AS varchar(64)) FROM payments WHERE id = :payment_id "
    "ON CONFLICT (payment_id, gateway_payment_id) DO NOTHING"
)


def _intent_of(cmd: CaptureCommand) -> list[ColumnElement[bool]]:
    return [
        CaptureIntent.payment_id == cmd.payment_id,
        CaptureIntent.gateway_payment_id == cmd.gateway_payment_id,
    ]


async def record_accepted(maker: async_sessionmaker[AsyncSession], cmd: CaptureCommand) -> None:
    """Commit, on its own, that the gateway has this capture: it outlives the transaction of
    the request that asked, which SERIALIZABLE may still roll back."""
    async with maker() as session, session.begin():
        await session.execute(
            update(CaptureIntent)
            .where(*_intent_of(cmd), CaptureIntent.accepted_at.is_(None))
            .values(accepted_at=func.now())
        )


async def gateway_accepted(maker: async_sessionmaker[AsyncSession], cmd: CaptureCommand) -> bool:
    """Whether an earlier request's capture of this gateway payment was accepted (committed
    by record_accepted, read outside the capture's own snapshot)."""
    async with maker() as session:
        found = await session.scalar(
            select(exists().where(*_intent_of(cmd), CaptureIntent.accepted_at.is_not(None)))
        )
        return bool(found)


async def stored_result(
    session: AsyncSession, payment: Payment, *, idempotent: bool, duplicate_event: bool
) -> CaptureResult:
    invoice_status, order_status = (
        await session.execute(
            select(Invoice.status, Order.status)
            .select_from(Payment)
            .join(Order, Order.id == Payment.order_id)
            .outerjoin(Invoice, Invoice.payment_id == Payment.id)
            .where(Payment.id == payment.id)
        )
    ).one()
    return CaptureResult(
        payment_id=payment.id,
        status=payment.status,
        gateway_payment_id=payment.gateway_payment_id,
        idempotent=idempotent,
        duplicate_event=duplicate_event,
        invoice_status=invoice_status,
        order_status=order_status,
    )
