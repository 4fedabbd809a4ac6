"""Tables of the reference service: orders, payments, invoices, webhook_events, capture_intents.

Amounts are integers in the smallest currency unit (paise). Every status column is guarded
by a CHECK so a stray value cannot land; gateway ids are unique so one Razorpay object maps
to one row. `webhook_events` is what dedupe by `X-Razorpay-Event-Id` needs; `capture_intents`
is what the reconciler (payrace.service.reconcile) needs to find a capture whose answer was lost.

PaymentRow / OrderRow are what the capture path reads of a payment and its order: plain
values from one asyncpg row (payrace.service.sql), no session behind them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    String,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ORDER_STATUSES = ("created", "attempted", "paid")
PAYMENT_STATUSES = ("pending", "authorized", "captured", "failed")
INVOICE_STATUSES = ("issued", "paid", "void")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (
        CheckConstraint("amount > 0", name="orders_amount_positive"),
        CheckConstraint(_in("status", ORDER_STATUSES), name="orders_status_valid"),
        CheckConstraint("currency ~ '^[A-Z]{3}$'", name="orders_currency_iso"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    gateway_order_id: Mapped[str] = mapped_column(String(64), unique=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), default="created")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Payment(Base):
    __tablename__ = "payments"
    __table_args__ = (
        CheckConstraint("amount > 0", name="payments_amount_positive"),
        CheckConstraint(_in("status", PAYMENT_STATUSES), name="payments_status_valid"),
        CheckConstraint(
            "(status = 'captured') = (captured_at IS NOT NULL)", name="payments_captured_at"
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    gateway_payment_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    method: Mapped[str | None] = mapped_column(String(32))
    error_code: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    captured_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Filled only by a read that joins the order in (capture.read_with_order), never loaded
    # lazily (a lazy load would be a hidden round trip under the payment lock); it keeps the
    # order in the session, where the capture's session.get() finds it without a statement.
    order: Mapped[Order] = relationship(lazy="raise", viewonly=True)


class Invoice(Base):
    __tablename__ = "invoices"
    __table_args__ = (
        CheckConstraint("amount > 0", name="invoices_amount_positive"),
        CheckConstraint(_in("status", INVOICE_STATUSES), name="invoices_status_valid"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), unique=True)
    payment_id: Mapped[int] = mapped_column(ForeignKey("payments.id"), unique=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    amount_paid: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(16), default="issued")
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookEvent(Base):
    __tablename__ = "webhook_events"

    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    event: Mapped[str] = mapped_column(String(64))
    payment_id: Mapped[int] = mapped_column(ForeignKey("payments.id"), index=True)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class CaptureIntent(Base):
    """Committed before the service asks the gateway to capture: if the gateway accepts and
    the answer is then lost (the connection dies before COMMIT, the process is killed), this
    row is what tells the reconciler to ask the gateway what happened."""

    __tablename__ = "capture_intents"
    __table_args__ = (UniqueConstraint("payment_id", "gateway_payment_id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # No foreign key on purpose: its check would take FOR KEY SHARE on the payment row, so
    # the intent would wait behind a capture holding FOR UPDATE, outside the capture path's
    # lock order. record_intent() inserts only for a payment that exists.
    payment_id: Mapped[int] = mapped_column(BigInteger, index=True)
    gateway_payment_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # When the gateway said the capture is done, committed at once on the intents pool: at
    # SERIALIZABLE a capture's transaction may be rolled back after that answer, and the next
    # request to win the payment reads it here instead of asking the gateway again.
    accepted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True, slots=True)
class OrderRow:
    """The order columns a capture checks and writes by; none of them ever changes."""

    id: int
    gateway_order_id: str
    amount: int
    currency: str

    @classmethod
    def of(cls, row: Mapping[str, Any] | None) -> OrderRow:
        assert row is not None  # a payment's order: its foreign key
        return cls(row["id"], row["gateway_order_id"], row["amount"], row["currency"])


@dataclass(frozen=True, slots=True)
class PaymentRow:
    """A payment as the strategy's read saw it (with its order when the read joined it in:
    capture.read_with_order)."""

    id: int
    order_id: int
    status: str
    gateway_payment_id: str | None
    order: OrderRow | None = None

    @classmethod
    def of(cls, row: Mapping[str, Any] | None) -> PaymentRow | None:
        """A row with the payment's columns (PAYMENT_COLUMNS), and the order's
        (ORDER_COLUMNS) when it has them; None for no row."""
        if row is None:
            return None
        order = None
        if "gateway_order_id" in row:
            order = OrderRow(
                row["order_id"], row["gateway_order_id"], row["amount"], row["currency"]
            )
        return cls(row["id"], row["order_id"], row["status"], row["gateway_payment_id"], order)


# What PaymentRow.of reads, to be selected under these names.
PAYMENT_COLUMNS = "payments.id, payments.order_id, payments.status, payments.gateway_payment_id"
ORDER_COLUMNS = "orders.gateway_order_id, orders.amount, orders.currency"
