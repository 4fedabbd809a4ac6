"""The shop's tables, in a schema of their own, created on start.

create_schema(pool)   CREATE ... IF NOT EXISTS, serialised across shops starting at once

shop.purchases   what the customer buys: amount, currency, Razorpay's order id; open | paid
shop.charges     one payment attempt of a purchase: Razorpay's payment id once known;
                 created | captured
shop.bills       the invoice, linked to the purchase (not to the charge); due | settled
"""

from __future__ import annotations

from psycopg_pool import ConnectionPool

DDL = """
CREATE SCHEMA IF NOT EXISTS shop;
CREATE TABLE IF NOT EXISTS shop.purchases (
    id bigserial PRIMARY KEY,
    amount bigint NOT NULL CHECK (amount > 0),  -- smallest currency unit (paise)
    currency text NOT NULL,
    razorpay_order_id text NOT NULL UNIQUE,
    state text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'paid'))
);
CREATE TABLE IF NOT EXISTS shop.charges (
    id bigserial PRIMARY KEY,
    purchase_id bigint NOT NULL REFERENCES shop.purchases,
    razorpay_payment_id text UNIQUE,
    state text NOT NULL DEFAULT 'created' CHECK (state IN ('created', 'captured')),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS charges_purchase_id ON shop.charges (purchase_id);
CREATE TABLE IF NOT EXISTS shop.bills (
    id bigserial PRIMARY KEY,
    purchase_id bigint NOT NULL REFERENCES shop.purchases,
    state text NOT NULL DEFAULT 'due' CHECK (state IN ('due', 'settled')),
    settled_at timestamptz
);
CREATE INDEX IF NOT EXISTS bills_purchase_id ON shop.bills (purchase_id);
"""

# IF NOT EXISTS is not safe against a concurrent CREATE (both pass the check, one fails on
# the catalog's unique index): two shops starting on one database take turns on this key.
_DDL_LOCK = 7_405_001  # any key no other code on this database takes


def create_schema(pool: ConnectionPool) -> None:
    with pool.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
        conn.execute(DDL)
