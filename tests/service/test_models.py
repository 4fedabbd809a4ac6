"""payrace/service/models.py: the tables' guarantees, checked by PostgreSQL itself.

Every write here runs inside one transaction that is rolled back, each rejected statement in
its own savepoint, so the shared database keeps nothing from this module.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import BigInteger, CheckConstraint, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from payrace.harness.infra.provider import Database
from payrace.service.db import create_schema
from payrace.service.models import (
    INVOICE_STATUSES,
    ORDER_STATUSES,
    PAYMENT_STATUSES,
    Base,
    Invoice,
    Order,
    Payment,
    WebhookEvent,
)


@pytest.fixture
async def conn(pg: Database) -> AsyncIterator[AsyncConnection]:
    engine = create_async_engine(pg.asyncpg_url())
    try:
        await create_schema(engine)
        async with engine.connect() as connection:
            transaction = await connection.begin()
            try:
                yield connection
            finally:
                await transaction.rollback()
    finally:
        await engine.dispose()


async def add_order(conn: AsyncConnection, **values: Any) -> int:
    row = {"gateway_order_id": "order_" + secrets.token_hex(7), "amount": 50000, "currency": "INR"}
    row.update(values)
    return int((await conn.execute(insert(Order).values(row).returning(Order.id))).scalar_one())


async def add_payment(conn: AsyncConnection, order_id: int, **values: Any) -> int:
    row: dict[str, Any] = {"order_id": order_id, "amount": 50000, "currency": "INR"}
    row.update(values)
    return int((await conn.execute(insert(Payment).values(row).returning(Payment.id))).scalar_one())


async def refused(conn: AsyncConnection, statement: Any, constraint: str) -> None:
    """The statement fails on `constraint`; the surrounding transaction lives on."""
    with pytest.raises(IntegrityError, match=constraint):
        async with conn.begin_nested():
            await conn.execute(statement)


def test_the_five_tables_are_declared() -> None:
    assert set(Base.metadata.tables) == {
        "orders",
        "payments",
        "invoices",
        "webhook_events",
        "capture_intents",
    }


def test_amounts_are_integers_in_the_smallest_unit() -> None:
    for table in ("orders", "payments", "invoices"):
        assert isinstance(Base.metadata.tables[table].c.amount.type, BigInteger)
    assert isinstance(Invoice.__table__.c.amount_paid.type, BigInteger)


def test_every_status_column_is_guarded_by_a_check_listing_its_values() -> None:
    for model, statuses in (
        (Order, ORDER_STATUSES),
        (Payment, PAYMENT_STATUSES),
        (Invoice, INVOICE_STATUSES),
    ):
        checks = {
            c.name: str(c.sqltext)
            for c in Base.metadata.tables[model.__tablename__].constraints
            if isinstance(c, CheckConstraint)
        }
        status_check = checks[f"{model.__tablename__}_status_valid"]
        assert all(repr(status) in status_check for status in statuses)


async def test_new_rows_start_created_pending_issued_with_nothing_paid(
    conn: AsyncConnection,
) -> None:
    order_id = await add_order(conn)
    payment_id = await add_payment(conn, order_id)
    await conn.execute(
        insert(Invoice).values(order_id=order_id, payment_id=payment_id, amount=50000)
    )

    row = (
        await conn.execute(
            select(
                Order.status, Payment.status, Invoice.status, Invoice.amount_paid, Order.created_at
            )
            .join(Payment, Payment.order_id == Order.id)
            .join(Invoice, Invoice.payment_id == Payment.id)
            .where(Order.id == order_id)
        )
    ).one()
    assert tuple(row[:4]) == ("created", "pending", "issued", 0)
    assert row[4] is not None


@pytest.mark.parametrize(
    ("values", "constraint"),
    [
        ({"amount": 0}, "orders_amount_positive"),
        ({"amount": -100}, "orders_amount_positive"),
        ({"currency": "inr"}, "orders_currency_iso"),
        ({"currency": "IN1"}, "orders_currency_iso"),
        ({"status": "refunded"}, "orders_status_valid"),
    ],
)
async def test_orders_refuse_bad_amounts_currencies_and_statuses(
    conn: AsyncConnection, values: dict[str, Any], constraint: str
) -> None:
    row = {"gateway_order_id": "order_" + secrets.token_hex(7), "amount": 50000, "currency": "INR"}
    await refused(conn, insert(Order).values({**row, **values}), constraint)


@pytest.mark.parametrize(
    ("values", "constraint"),
    [
        ({"amount": 0}, "payments_amount_positive"),
        ({"status": "settled"}, "payments_status_valid"),
        ({"status": "captured"}, "payments_captured_at"),  # captured needs captured_at
        ({"status": "pending", "captured_at": text("now()")}, "payments_captured_at"),
    ],
)
async def test_payments_refuse_bad_states(
    conn: AsyncConnection, values: dict[str, Any], constraint: str
) -> None:
    order_id = await add_order(conn)
    row = {"order_id": order_id, "amount": 50000, "currency": "INR", **values}
    await refused(conn, insert(Payment).values(row), constraint)


async def test_a_captured_payment_with_its_time_is_accepted(conn: AsyncConnection) -> None:
    payment_id = await add_payment(
        conn, await add_order(conn), status="captured", captured_at=text("now()")
    )
    assert payment_id > 0


async def test_gateway_ids_are_unique(conn: AsyncConnection) -> None:
    order_id = await add_order(conn, gateway_order_id="order_UniqueTest0001")
    await add_payment(conn, order_id, gateway_payment_id="pay_UniqueTest00001")

    await refused(
        conn,
        insert(Order).values(gateway_order_id="order_UniqueTest0001", amount=1, currency="INR"),
        "gateway_order_id",
    )
    await refused(
        conn,
        insert(Payment).values(
            order_id=order_id, amount=1, currency="INR", gateway_payment_id="pay_UniqueTest00001"
        ),
        "gateway_payment_id",
    )


async def test_invoices_need_a_real_payment_and_are_one_per_payment_and_per_order(
    conn: AsyncConnection,
) -> None:
    order_id = await add_order(conn)
    payment_id = await add_payment(conn, order_id)
    await conn.execute(
        insert(Invoice).values(order_id=order_id, payment_id=payment_id, amount=50000)
    )

    await refused(
        conn,
        insert(Invoice).values(order_id=await add_order(conn), payment_id=2**62, amount=50000),
        "invoices_payment_id_fkey",
    )
    await refused(
        conn,
        insert(Invoice).values(order_id=await add_order(conn), payment_id=payment_id, amount=1),
        "invoices_payment_id_key",
    )
    await refused(
        conn,
        insert(Invoice).values(
            order_id=order_id, payment_id=await add_payment(conn, order_id), amount=1
        ),
        "invoices_order_id_key",
    )
    await refused(
        conn,
        insert(Invoice).values(
            order_id=await add_order(conn),
            payment_id=await add_payment(conn, order_id),
            amount=50000,
            status="overdue",
        ),
        "invoices_status_valid",
    )


async def test_a_webhook_event_id_is_stored_once_and_points_at_a_payment(
    conn: AsyncConnection,
) -> None:
    payment_id = await add_payment(conn, await add_order(conn))
    event = {"event_id": "evt_" + secrets.token_hex(7), "event": "payment.captured"}
    await conn.execute(insert(WebhookEvent).values(payment_id=payment_id, **event))

    await refused(
        conn, insert(WebhookEvent).values(payment_id=payment_id, **event), "webhook_events_pkey"
    )
    await refused(
        conn,
        insert(WebhookEvent).values(
            payment_id=2**62, event_id="evt_" + secrets.token_hex(7), event="payment.failed"
        ),
        "webhook_events_payment_id_fkey",
    )
