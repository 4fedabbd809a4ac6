"""The shop: Starlette routes over one capture routine, asyncpg, its own `store` schema.

Settings    from the environment (the variables `payrace explore --app` sets)
SCHEMA      store.sales (orders) -> store.charges (payments) -> store.invoices
build()     the app: POST /sales, POST /checkout/verify, POST /hooks/razorpay; its
            lifespan opens the pool and the gateway client and creates the tables
capture()   both paths: read the charge (locked or not: the whole difference between
            buggy.py and fixed.py), pause, capture at the gateway, write charge ->
            invoice -> sale, commit
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from payrace import pause

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS store;
CREATE TABLE IF NOT EXISTS store.sales (
    id bigserial PRIMARY KEY, amount integer NOT NULL CHECK (amount > 0),
    currency text NOT NULL, razorpay_order_id text NOT NULL UNIQUE,
    state text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'paid')), paid_at timestamptz);
CREATE TABLE IF NOT EXISTS store.charges (
    id bigserial PRIMARY KEY, sale_id bigint NOT NULL REFERENCES store.sales (id),
    razorpay_payment_id text,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'captured')),
    captured_at timestamptz);
CREATE TABLE IF NOT EXISTS store.invoices (
    id bigserial PRIMARY KEY, charge_id bigint NOT NULL UNIQUE REFERENCES store.charges (id),
    state text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'paid')), paid_at timestamptz);
"""
READ = """SELECT c.state, c.sale_id, s.amount, s.currency FROM store.charges c
          JOIN store.sales s ON s.id = c.sale_id WHERE c.id = $1"""
_ENV = {
    "dsn": "PAYRACE_TARGET_DSN",
    "gateway_url": "PAYRACE_GATEWAY_URL",
    "key_id": "PAYRACE_RAZORPAY_KEY_ID",
    "key_secret": "PAYRACE_RAZORPAY_KEY_SECRET",
    "webhook_secret": "PAYRACE_RAZORPAY_WEBHOOK_SECRET",
}


@dataclass(frozen=True)
class Settings:
    dsn: str
    gateway_url: str
    key_id: str
    key_secret: str
    webhook_secret: str

    @classmethod
    def from_env(cls) -> Settings:
        missing = [name for name in _ENV.values() if not os.environ.get(name)]
        if missing:
            raise RuntimeError(f"set {', '.join(missing)} (examples/starlette_shop/README.md)")
        return cls(**{field: os.environ[name] for field, name in _ENV.items()})


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _signed(secret: str, payload: bytes, signature: str) -> bool:
    expected = hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), signature.encode())


def build(*, locked: bool) -> Starlette:
    settings = Settings.from_env()
    state: dict[str, Any] = {}
    read = READ + (" FOR UPDATE OF c" if locked else "")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(settings.dsn, min_size=1, max_size=10)
        try:
            await pool.execute(SCHEMA)
            async with httpx.AsyncClient(
                base_url=settings.gateway_url, auth=(settings.key_id, settings.key_secret)
            ) as gateway:
                state.update(pool=pool, gateway=gateway)
                yield
        finally:
            await pool.close()

    async def capture(charge_id: int, payment_id: str, *, at_gateway: bool) -> JSONResponse:
        pool: asyncpg.Pool = state["pool"]
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(read, charge_id)
            await pause("charge_read", row["state"] if row else "missing")
            if row is None:
                return _error(404, "not_found", f"no charge {charge_id}")
            if row["state"] == "captured":
                return JSONResponse(
                    {"charge_id": charge_id, "status": "captured", "idempotent": True}
                )
            if at_gateway:
                answer = await state["gateway"].post(
                    f"/v1/payments/{payment_id}/capture",
                    json={"amount": row["amount"], "currency": row["currency"]},
                )
                if answer.status_code != 200:
                    return _error(502, "gateway_error", answer.text[:200])
            await conn.execute(
                "UPDATE store.charges SET state = 'captured', razorpay_payment_id = $2, "
                "captured_at = now() WHERE id = $1",
                charge_id,
                payment_id,
            )
            await pause("charge_written")
            await conn.execute(
                "UPDATE store.invoices SET state = 'paid', paid_at = now() WHERE charge_id = $1",
                charge_id,
            )
            await conn.execute(
                "UPDATE store.sales SET state = 'paid', paid_at = now() WHERE id = $1",
                row["sale_id"],
            )
        return JSONResponse({"charge_id": charge_id, "status": "captured", "idempotent": False})

    async def create_sale(request: Request) -> JSONResponse:
        body = await request.json()
        amount, currency = body.get("amount"), body.get("currency", "INR")
        if not isinstance(amount, int) or amount < 100 or not isinstance(currency, str):
            return _error(422, "invalid", "amount (integer, >= 100) and currency required")
        answer = await state["gateway"].post(
            "/v1/orders", json={"amount": amount, "currency": currency}
        )
        if answer.status_code != 200:
            return _error(502, "gateway_error", answer.text[:200])
        order_id = answer.json()["id"]
        async with state["pool"].acquire() as conn, conn.transaction():
            sale_id = await conn.fetchval(
                "INSERT INTO store.sales (amount, currency, razorpay_order_id) "
                "VALUES ($1, $2, $3) RETURNING id",
                amount,
                currency,
                order_id,
            )
            charge_id = await conn.fetchval(
                "INSERT INTO store.charges (sale_id) VALUES ($1) RETURNING id", sale_id
            )
            await conn.execute("INSERT INTO store.invoices (charge_id) VALUES ($1)", charge_id)
        body = {"sale_id": sale_id, "charge_id": charge_id, "razorpay_order_id": order_id}
        return JSONResponse(body, status_code=201)

    async def verify(request: Request) -> JSONResponse:
        body = await request.json()
        order_id, payment_id = body.get("razorpay_order_id"), body.get("razorpay_payment_id")
        charge_id, signature = body.get("charge_id"), body.get("razorpay_signature")
        if not all(isinstance(v, str) for v in (order_id, payment_id, signature)):
            return _error(400, "invalid", "razorpay_order_id, _payment_id, _signature required")
        if not isinstance(charge_id, int):
            return _error(400, "invalid", "charge_id must be an integer")
        if not _signed(settings.key_secret, f"{order_id}|{payment_id}".encode(), signature):
            return _error(400, "bad_signature", "the checkout signature does not match")
        return await capture(charge_id, payment_id, at_gateway=True)

    async def webhook(request: Request) -> JSONResponse:
        raw = await request.body()
        signature = request.headers.get("x-razorpay-signature", "")
        if not _signed(settings.webhook_secret, raw, signature):
            return _error(400, "bad_signature", "the webhook signature does not match")
        event = json.loads(raw)
        if event.get("event") not in ("payment.captured", "order.paid"):
            return JSONResponse({"status": "ignored"})
        payment = event["payload"]["payment"]["entity"]
        charge_id = await state["pool"].fetchval(
            "SELECT c.id FROM store.charges c JOIN store.sales s ON s.id = c.sale_id "
            "WHERE s.razorpay_order_id = $1",
            payment["order_id"],
        )
        if charge_id is None:
            return _error(404, "not_found", f"no sale for {payment['order_id']}")
        return await capture(charge_id, payment["id"], at_gateway=False)

    routes = [
        Route("/sales", create_sale, methods=["POST"]),
        Route("/checkout/verify", verify, methods=["POST"]),
        Route("/hooks/razorpay", webhook, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
