"""The reference capture service: FastAPI routes over the one capture routine.

    POST /orders              create an order at the gateway (razorpay SDK) and here
    POST /payments/verify     Razorpay Checkout's callback -> capture
    POST /webhooks/razorpay   signed webhook -> capture / mark failed / ignore
    GET  /payments/{id}       a payment's state
    GET  /healthz             liveness plus a real query

Routes stay thin: they check signatures (payrace.service.signatures) and shapes, then call
payrace.service.capture. `Runtime` owns the engine, the gateway client, the signature verifier
and the strategy, each built once; `create_app()` builds one, so a harness can run several
services with different strategies in one process. The instrumentation middleware
(payrace.service.instrument.middleware) adds `Server-Timing` and `X-Payrace-Received-At` and,
only with PAYRACE_PROBES on, honours `X-Payrace-Pause`.
"""

from __future__ import annotations

import gc
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from payrace.service.body import BodyLimitMiddleware, lone_surrogate, may_escape_surrogate
from payrace.service.capture import Runner, capture, mark_failed
from payrace.service.command import CaptureCommand
from payrace.service.db import create_schema, make_engine, make_sessionmaker
from payrace.service.direct import DirectRoutes, FrontDoor, LeanJSONResponse
from payrace.service.errors import ApiError, GatewayFailed, NotFound, Rejected, install_handlers
from payrace.service.gateway_client import GatewayClient, GatewayError, make_gateway_client
from payrace.service.instrument.middleware import InstrumentMiddleware
from payrace.service.instrument.probes import Rendezvous
from payrace.service.models import Invoice, Order, Payment
from payrace.service.openapi import WEBHOOK_DOC, add_components, errors
from payrace.service.reconcile import Sweeper
from payrace.service.settings import Settings, get_settings
from payrace.service.signatures import SignatureVerifier
from payrace.service.sql import Database
from payrace.service.strategies import resolve

CAPTURE_EVENTS = {"payment.authorized", "payment.captured", "order.paid"}
ID_MAX = 64  # payments.gateway_payment_id, orders.gateway_order_id
EVENT_ID_MAX = 128  # webhook_events.event_id
METHOD_MAX = 32  # payments.method
ERROR_CODE_MAX = 64  # payments.error_code
KNOWN_EVENTS = CAPTURE_EVENTS | {"payment.failed"}
GC_GEN0_THRESHOLD = 20_000  # create_served_app()
INTENT_POOL_SIZE = 4  # one short INSERT per capture; DB_MAX_OVERFLOW more under load


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    maker: async_sessionmaker[AsyncSession]
    gateway: GatewayClient
    signatures: SignatureVerifier
    runner: Runner
    # Forced-mode groups requested over HTTP (probes on only); dropped when all finished.
    rendezvous: dict[str, Rendezvous]
    # The capture path's pools are the runner's (asyncpg: payrace.service.sql); the sweeper
    # keeps its bookkeeping's, a connection per sweep.
    sweeper: Sweeper

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        engine = make_engine(settings)
        maker = make_sessionmaker(engine)
        gateway = make_gateway_client(settings)
        runner = Runner(
            db=Database(
                settings.database_url, max_size=settings.db_pool_size + settings.db_max_overflow
            ),
            strategy=resolve(settings.capture_strategy),
            gateway=gateway,
            isolation_level=settings.isolation_level,
            retries=settings.serialization_retries,
            intents=Database(
                settings.database_url,
                max_size=INTENT_POOL_SIZE + settings.db_max_overflow,
                name="capture intents",
            ),
            dedupe=settings.webhook_dedupe,
        )
        signatures = SignatureVerifier(
            settings.razorpay_key_id,
            settings.razorpay_key_secret,
            settings.razorpay_webhook_secret,
        )
        # The sweeper connects per sweep and closes after it: a pooled connection used every
        # RECONCILE_INTERVAL_S would never stay idle long enough for PostgreSQL to flush its
        # statistics, which a harness waits for to read deadlock counts.
        sweeper = Sweeper(
            runner,
            interval_s=settings.reconcile_interval_s,
            older_than_s=settings.reconcile_after_s,
            bookkeeping=Database(settings.database_url, max_size=0, name="reconcile"),
        )
        return cls(
            settings,
            engine,
            maker,
            gateway,
            signatures,
            runner,
            {},
            sweeper,
        )

    async def startup(self) -> None:
        await create_schema(self.engine)
        await self.runner.open()
        self.sweeper.start()

    async def shutdown(self) -> None:
        await self.sweeper.stop()
        self.gateway.close()
        await self.runner.close()
        await self.engine.dispose()

    async def is_blocked(self, pid: int) -> bool:
        async with self.engine.connect() as conn:
            row = await conn.execute(
                text("SELECT cardinality(pg_blocking_pids(:pid)) > 0"), {"pid": pid}
            )
            return bool(row.scalar_one())


# One statement in autocommit, one round trip: the order, its payment and its invoice are
# written together or not at all, and no transaction stays open between statements for a
# killed backend (a failover, kill-backends) to take with it.
CREATE_ORDER = """
    WITH o AS (
        INSERT INTO orders (gateway_order_id, amount, currency, status)
        VALUES ($1, $2, $3, 'created') RETURNING id
    ), p AS (
        INSERT INTO payments (order_id, amount, currency, status)
        SELECT id, $2, $3, 'pending' FROM o RETURNING id, order_id
    )
    INSERT INTO invoices (order_id, payment_id, amount, amount_paid, status)
    SELECT order_id, id, $2, 0, 'issued' FROM p
    RETURNING order_id, payment_id
    """


# The order's payment, for a webhook: one statement in autocommit (no BEGIN / ROLLBACK round
# trips) on the capture pool, its connection given back before the capture takes one.
PAYMENT_OF_ORDER = (
    "SELECT p.id FROM payments p JOIN orders o ON o.id = p.order_id WHERE o.gateway_order_id = $1"
)


class OrderIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Razorpay's minimum order amount is 100 in the smallest unit (1 INR); below it the
    # gateway refuses, which is the caller's mistake, so it is a 422 here and not a 502.
    # Strict: "50000", 50000.0 and true are refused, not read as paise.
    amount: int = Field(
        ge=100, le=10**12, strict=True, description="integer, smallest currency unit (paise)"
    )
    currency: str = Field(default="INR", pattern=r"^[A-Z]{3}$")


class VerifyIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # No NUL: PostgreSQL text cannot hold it, and the write would fail with a 500.
    razorpay_order_id: str = Field(min_length=1, max_length=64, pattern=r"^[^\x00]+$")
    razorpay_payment_id: str = Field(min_length=1, max_length=64, pattern=r"^[^\x00]+$")
    # Optional here so that a missing signature is a 400 "invalid signature", like a wrong one.
    razorpay_signature: str | None = None
    # Strict: true is not payment 1, "7" is not payment 7.
    internal_payment_id: int = Field(gt=0, lt=2**63, strict=True)

    @field_validator("razorpay_order_id", "razorpay_payment_id", "razorpay_signature")
    @classmethod
    def _unicode(cls, value: str | None) -> str | None:
        if value is not None and lone_surrogate(value):
            raise ValueError("holds a lone UTF-16 surrogate escape; send valid Unicode text")
        return value


def _digits(value: object) -> object:
    # int() and pydantic's lax mode read "1_0" as 10 and " 7" as 7: a path id is digits only.
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a positive integer written in digits, e.g. /payments/42")
    return value


PaymentId = Annotated[int, BeforeValidator(_digits)]


def create_app(settings: Settings | None = None) -> FastAPI:
    runtime = Runtime.build(settings or get_settings())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.startup()
        try:
            yield
        finally:
            await runtime.shutdown()

    app = FastAPI(title="payrace reference capture service", lifespan=lifespan)
    app.state.runtime = runtime
    install_handlers(app)

    @app.get("/healthz", responses=errors(503))
    async def healthz() -> dict[str, str]:
        # The session is opened and closed inside the route, not by a `yield` dependency:
        # FastAPI closes a dependency's session after the response has started, so a
        # connection lost under its ROLLBACK (PostgreSQL restarting) could no longer become
        # a 503 and cut the response off instead.
        async with runtime.maker() as session:
            await session.execute(text("SELECT 1"))
        return {
            "status": "ok",
            "strategy": runtime.runner.strategy.name,
            "isolation_level": runtime.settings.isolation_level,
        }

    @app.post("/orders", status_code=201, responses=errors(400, 413, 422, 502, 503))
    async def create_order(body: OrderIn) -> dict[str, Any]:
        return await answer_create_order(body)

    async def create_order_direct(request: Request, raw: bytes) -> JSONResponse | None:
        body = _json_body(OrderIn, request.headers.get("content-type"), raw)
        if body is None:
            return None
        return LeanJSONResponse(await answer_create_order(body), status_code=201)

    async def answer_create_order(body: OrderIn) -> dict[str, Any]:
        rt = runtime
        try:
            gw = await rt.gateway.create_order(
                body.amount, body.currency, f"rcpt_{uuid.uuid4().hex[:16]}"
            )
        except GatewayError as exc:
            raise GatewayFailed(str(exc)) from exc
        # On the capture pool (asyncpg), not the engine: one checkout and one round trip.
        row = await rt.runner.db.fetchrow(CREATE_ORDER, gw["id"], body.amount, body.currency)
        assert row is not None  # INSERT ... RETURNING answers its one row
        return {
            "order_id": row["order_id"],
            "payment_id": row["payment_id"],
            "gateway_order_id": gw["id"],
            "amount": body.amount,
            "currency": body.currency,
        }

    @app.get("/payments/{payment_id}", responses=errors(404, 422, 503))
    async def get_payment(
        # Bounded like internal_payment_id: past int64, asyncpg fails the query (a 500).
        payment_id: Annotated[PaymentId, Path(gt=0, lt=2**63)],
    ) -> dict[str, Any]:
        async with runtime.maker() as session:  # closed before the answer: see healthz
            row = (
                await session.execute(
                    select(Payment, Order.gateway_order_id, Order.status, Invoice.status)
                    .join(Order, Order.id == Payment.order_id)
                    .outerjoin(Invoice, Invoice.payment_id == Payment.id)
                    .where(Payment.id == payment_id)
                )
            ).one_or_none()
        if row is None:
            raise NotFound(f"payment {payment_id} does not exist")
        payment, gateway_order_id, order_status, invoice_status = row
        return {
            "payment_id": payment.id,
            "status": payment.status,
            "amount": payment.amount,
            "currency": payment.currency,
            "gateway_order_id": gateway_order_id,
            "gateway_payment_id": payment.gateway_payment_id,
            "order_status": order_status,
            "invoice_status": invoice_status,
            "captured_at": payment.captured_at.isoformat() if payment.captured_at else None,
        }

    # The capture routes use `runtime` from here rather than a dependency (a sync dependency
    # is run in a thread, one hop per request), and answer a JSONResponse, which FastAPI sends
    # as it is instead of re-encoding the dict (response_model keeps the documented shape).
    # DirectRoutes answers both ahead of FastAPI's router with the same code (answer_verify,
    # answer_webhook); the routes below answer what it leaves to FastAPI (the 422s).
    async def answer_verify(body: VerifyIn) -> JSONResponse:
        rt = runtime
        rt.signatures.check_callback(
            body.razorpay_order_id, body.razorpay_payment_id, body.razorpay_signature
        )
        cmd = CaptureCommand(
            source="client",
            payment_id=body.internal_payment_id,
            gateway_order_id=body.razorpay_order_id,
            gateway_payment_id=body.razorpay_payment_id,
            capture_at_gateway=True,
        )
        return LeanJSONResponse((await capture(rt.runner, cmd)).as_json())

    @app.post(
        "/payments/verify",
        responses=errors(400, 404, 409, 413, 422, 502, 503),
        response_model=dict[str, Any],
    )
    async def verify(body: VerifyIn) -> JSONResponse:
        return await answer_verify(body)

    async def verify_direct(request: Request, raw: bytes) -> JSONResponse | None:
        body = _json_body(VerifyIn, request.headers.get("content-type"), raw)
        return None if body is None else await answer_verify(body)

    async def answer_webhook(request: Request, raw: bytes) -> JSONResponse:
        rt = runtime
        signature = request.headers.get("X-Razorpay-Signature")
        event_id = request.headers.get("X-Razorpay-Event-Id")
        try:
            body_text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Rejected("webhook body is not UTF-8", code="invalid_body") from exc
        rt.signatures.check_webhook(body_text, signature)
        # An empty id would make every later empty-id event a "duplicate"; a long one fails
        # the insert with a 500.
        if event_id is not None and (not 1 <= len(event_id) <= EVENT_ID_MAX or "\x00" in event_id):
            raise Rejected(
                f"X-Razorpay-Event-Id must be 1..{EVENT_ID_MAX} characters, without NUL",
                code="invalid_body",
            )
        envelope = _parse_envelope(body_text)
        event = envelope["event"]
        if event not in KNOWN_EVENTS:
            return LeanJSONResponse({"ignored": True, "event": event})
        entity = envelope["payment"]
        payment_id = await rt.runner.db.fetchval(PAYMENT_OF_ORDER, entity["order_id"])
        if payment_id is None:
            raise NotFound(f"no order {entity['order_id']} here", code="unknown_order")
        cmd = CaptureCommand(
            source="webhook",
            payment_id=payment_id,
            gateway_order_id=entity["order_id"],
            gateway_payment_id=entity["id"],
            # An authorized payment is captured by the service; the other events report
            # a capture that already happened at the gateway.
            capture_at_gateway=event == "payment.authorized",
            amount=entity["amount"],
            currency=entity["currency"],
            event=event,
            event_id=event_id,
            method=entity.get("method"),
        )
        if event == "payment.failed":
            result = await mark_failed(rt.runner, cmd, entity.get("error_code"))
        else:
            result = await capture(rt.runner, cmd)
        return LeanJSONResponse({"event": event, **result.as_json()})

    @app.post(
        "/webhooks/razorpay",
        responses=errors(400, 404, 409, 413, 502, 503),
        response_model=dict[str, Any],
        openapi_extra=WEBHOOK_DOC,  # the signed raw body and its headers, read below
    )
    async def webhook(request: Request) -> JSONResponse:
        return await answer_webhook(request, await request.body())

    # The middleware, innermost first (each add_middleware wraps the ones before it). The
    # direct routes run inside the body limit and the instrumentation, which see their
    # requests and answers as any route's.
    direct_routes = {
        "/orders": create_order_direct,
        "/payments/verify": verify_direct,
        "/webhooks/razorpay": answer_webhook,
    }
    app.add_middleware(DirectRoutes, routes=direct_routes, handlers=lambda: app.exception_handlers)
    # Inside the instrumentation: a 413 / 400 from here is timed and stamped like any answer.
    app.add_middleware(BodyLimitMiddleware, max_bytes=runtime.settings.max_body_bytes)
    app.add_middleware(
        InstrumentMiddleware,
        probes_enabled=runtime.settings.payrace_probes,
        is_blocked=runtime.is_blocked,
        groups=runtime.rendezvous,
    )
    # The capture routes' POSTs enter below FastAPI's outer layers (direct.FrontDoor).
    build_stack = app.build_middleware_stack

    def build_middleware_stack() -> FrontDoor:
        return FrontDoor(
            build_stack(),
            paths=direct_routes,
            inner=InstrumentMiddleware,
        )

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]

    document = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_components(document())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def create_served_app() -> FastAPI:
    """create_app() for a process of its own (`uvicorn payrace.service.app:create_served_app
    --factory`, as payrace starts it), with the garbage collector tuned for serving.

    Every request allocates hundreds of short-lived containers (coroutines, futures, dicts);
    at CPython's default gen-0 threshold (700) that is a collection every few requests, and
    each full one walks every object the imports made. Measured at saturation, the collector
    was about 4 % of the service's CPU (perf). Frozen: what exists once the app is built (the
    modules, the app) is never walked again; a larger gen-0 threshold: fewer, not longer,
    young collections (most of their objects are dead by then). Not in create_app(): an
    in-process harness (the explorer, the tests) keeps its own collector settings.

    No gc.collect() before the freeze: it walked every object the imports made (about 50 ms
    of each start) to find about ten unreachable ones, which frozen cost a few hundred bytes."""
    app = create_app()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    return app


M = TypeVar("M", bound=BaseModel)


def _json_body(model: type[M], content_type: str | None, raw: bytes) -> M | None:
    """The body as FastAPI reads it for a route's `body: <model>` parameter (json.loads, then
    the model, in Python mode), when FastAPI would accept it; None for anything else: a body
    of another content type, not JSON, not an object or not valid, which FastAPI answers."""
    if content_type != "application/json" or not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    try:
        return model.model_validate(doc)
    except ValidationError:
        return None


def _parse_envelope(body_text: str) -> dict[str, Any]:
    """Pull the fields the service needs out of Razorpay's envelope, or say what is missing."""
    try:
        doc = json.loads(body_text)
    except ValueError as exc:
        raise Rejected(f"webhook body is not JSON: {exc}", code="invalid_body") from exc
    # Valid JSON, but no Unicode text: the HMAC, the database and the answer would all fail.
    where = lone_surrogate(doc) if may_escape_surrogate(body_text) else None
    if where is not None:
        raise Rejected(
            f"webhook body holds a lone UTF-16 surrogate escape (such as \\ud800) at {where}; "
            "JSON strings must be valid Unicode",
            code="invalid_body",
        )
    if not isinstance(doc, dict) or not isinstance(doc.get("event"), str):
        raise Rejected("webhook body needs a string field 'event'", code="invalid_body")
    if doc["event"] not in KNOWN_EVENTS:
        return {"event": doc["event"]}
    entity: object = doc
    for key in ("payload", "payment", "entity"):
        # Any level may be missing or of another type (a list, a string): never a 500.
        entity = entity.get(key) if isinstance(entity, dict) else None
    if not isinstance(entity, dict):
        raise Rejected("webhook body needs payload.payment.entity", code="invalid_body")
    for key, kind in (("id", str), ("order_id", str), ("amount", int), ("currency", str)):
        if not isinstance(entity.get(key), kind) or isinstance(entity.get(key), bool):
            raise Rejected(
                f"payload.payment.entity.{key} must be a {kind.__name__}", code="invalid_body"
            )
    # Every string the service stores must fit its column and hold no NUL (PostgreSQL text
    # cannot): either would fail the write with a 500 instead of a 400 naming the field.
    for key, low, high in (
        ("id", 1, ID_MAX),
        ("order_id", 1, ID_MAX),
        ("currency", 3, 3),
        ("method", 0, METHOD_MAX),
        ("error_code", 0, ERROR_CODE_MAX),
    ):
        value = entity.get(key)
        if value is None and key in ("method", "error_code"):
            continue
        if not isinstance(value, str) or not low <= len(value) <= high or "\x00" in value:
            raise Rejected(
                f"payload.payment.entity.{key} must be a string of {low}..{high} characters "
                "without NUL",
                code="invalid_body",
            )
    return {"event": doc["event"], "payment": entity}


__all__ = ["ApiError", "Runtime", "create_app", "create_served_app"]
