"""A fake Razorpay that the real `razorpay` SDK cannot tell from the real one (for what we use).

    FakeRazorpay       orders, payments and capture counters behind one lock, plus its ASGI `app`:
        POST /v1/orders                  GET /v1/orders/{id}
        GET  /v1/payments/{id}           POST /v1/payments/{id}/capture
        /_fake/counters  /_fake/payments  /_fake/knobs  /_fake/reset    (test control, no auth)
    GatewayServer      context manager: a FakeRazorpay under uvicorn, free port, own thread

The signing helpers live in payrace.harness.gateway.signing and are re-exported here (`__all__`).

The capture counters are part of the oracle: they count every call that reached the capture
route (accepted, rejected, or failed on purpose), so a double capture is visible here even when
the target's own tables say otherwise. A call is counted when it is answered (after any injected
latency), so read the counters once the target's requests have returned. Errors carry Razorpay's
JSON shape and status codes because the SDK picks its exception class from `error.code`, not from
the HTTP status.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hmac
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from payrace.harness.gateway.signing import (
    EVENTS,
    GatewayKeys,
    client_callback,
    new_event_id,
    razorpay_id,
    signed_webhook,
    webhook_event,
)
from payrace.harness.infra.processes import wait_until_answers

_NULL_PAYMENT_FIELDS = (
    *("invoice_id", "refund_status", "description", "card_id", "bank", "wallet", "fee", "tax"),
    *("error_code", "error_description", "error_source", "error_step", "error_reason"),
)
_SERVER_ERROR = "The server encountered an error. The incident has been reported to admins."


class _RazorpayError(Exception):
    def __init__(
        self,
        status: int,
        description: str,
        *,
        code: str = "BAD_REQUEST_ERROR",
        field: str | None = None,
        where: tuple[str, str, str] = ("NA", "NA", "NA"),  # Razorpay's source, step, reason
    ) -> None:
        super().__init__(description)
        self.status = status
        source, step, reason = where
        error: dict[str, Any] = {"code": code, "description": description}
        error |= {"source": source, "step": step, "reason": reason, "metadata": {}, "field": field}
        self.body = {"error": error}


def _not_found(field: str = "id") -> _RazorpayError:
    where = ("business", "payment_initiation", "input_validation_failed")
    return _RazorpayError(400, "The id provided does not exist", field=field, where=where)


def _require_int(body: dict[str, Any], field: str) -> int:
    if field not in body:
        raise _RazorpayError(400, f"The {field} field is required.", field=field)
    value = body[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _RazorpayError(400, f"The {field} must be an integer.", field=field)
    return value


def _require_currency(body: dict[str, Any]) -> str:
    currency = body.get("currency")
    if currency is None:
        raise _RazorpayError(400, "The currency field is required.", field="currency")
    if not (isinstance(currency, str) and len(currency) == 3 and currency.isupper()):
        raise _RazorpayError(400, "The selected currency is invalid.", field="currency")
    return currency


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body: object = json.loads(await request.body() or b"{}")
    except ValueError:
        raise _RazorpayError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise _RazorpayError(400, "The request body must be a JSON object.")
    return body


@dataclass(frozen=True)
class _Knobs:
    latency_s: float = 0.0  # added to every /v1 call
    capture_latency_s: float = 0.0  # added to captures only
    fail_rate: float = 0.0  # fraction of captures answered 502/503, seeded

    def __post_init__(self) -> None:
        if not (self.latency_s >= 0 and self.capture_latency_s >= 0):
            raise ValueError(f"latencies must be >= 0, got {self}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be within [0, 1], got {self.fail_rate!r}")


_Handler = Callable[[Request], Awaitable[dict[str, Any]]]


class FakeRazorpay:
    """State + ASGI app. Thread-safe (the app runs in a server thread while the harness reads)."""

    def __init__(
        self,
        keys: GatewayKeys = GatewayKeys(),
        *,
        latency_s: float = 0.0,
        capture_latency_s: float = 0.0,
        fail_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.keys = keys
        self._initial_knobs = _Knobs(latency_s, capture_latency_s, fail_rate)
        self._seed = seed
        self._lock = threading.Lock()
        self._reset_locked()
        self.app = self._build_app()

    # -- state, read and written from any thread -------------------------------------------

    def _reset_locked(self) -> None:
        self._orders: dict[str, dict[str, Any]] = {}
        self._payments: dict[str, dict[str, Any]] = {}
        self._captures: Counter[str] = Counter()
        self._accepted: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._injected: Counter[str] = Counter()
        self._rng = random.Random(self._seed)
        self._knobs = self._initial_knobs

    def reset(self) -> None:
        """Forget every order, payment and count; knobs and the failure rng restart as built."""
        with self._lock:
            self._reset_locked()

    def set_knobs(
        self,
        *,
        latency_s: float | None = None,
        capture_latency_s: float | None = None,
        fail_rate: float | None = None,
    ) -> dict[str, float]:
        """Change latency / failure injection at runtime; None leaves a knob as it is."""
        changes = {"latency_s": latency_s, "capture_latency_s": capture_latency_s}
        changes["fail_rate"] = fail_rate
        with self._lock:
            set_to = {name: float(v) for name, v in changes.items() if v is not None}
            self._knobs = replace(self._knobs, **set_to)
            return asdict(self._knobs)

    def knobs(self) -> dict[str, float]:
        with self._lock:
            return asdict(self._knobs)

    def order(self, order_id: str) -> dict[str, Any] | None:
        with self._lock:
            return copy.deepcopy(self._orders.get(order_id))

    def payment(self, payment_id: str) -> dict[str, Any] | None:
        with self._lock:
            return copy.deepcopy(self._payments.get(payment_id))

    def capture_calls(self, payment_id: str) -> int:
        with self._lock:
            return self._captures[payment_id]

    def counters(self) -> dict[str, dict[str, int]]:
        """Per payment: captures = accepted + rejected; injected = the rejections we caused."""
        with self._lock:
            return {
                "captures": dict(self._captures),
                "accepted": dict(self._accepted),
                "rejected": dict(self._rejected),
                "injected": dict(self._injected),
            }

    def create_order(self, body: dict[str, Any]) -> dict[str, Any]:
        amount = _require_int(body, "amount")
        if amount < 100:
            raise _RazorpayError(400, "The amount must be atleast INR 1.00", field="amount")
        currency = _require_currency(body)
        receipt = body.get("receipt")
        if receipt is not None and (not isinstance(receipt, str) or len(receipt) > 40):
            raise _RazorpayError(
                400, "The receipt may not be greater than 40 characters.", field="receipt"
            )
        order: dict[str, Any] = {
            "id": razorpay_id("order_"),
            "entity": "order",
            "amount": amount,
            "amount_paid": 0,
            "amount_due": amount,
            "currency": currency,
            "receipt": receipt,
            "offer_id": None,
            "status": "created",
            "attempts": 0,
            # Razorpay's PHP backend serialises empty notes as [] rather than {}; clients meet it.
            "notes": body.get("notes") or [],
            "created_at": int(time.time()),
        }
        with self._lock:
            self._orders[order["id"]] = order
            return copy.deepcopy(order)

    def authorize_payment(self, order_id: str, *, method: str = "upi") -> dict[str, Any]:
        """The customer pays at Checkout: a payment authorized for the order's full amount."""
        with self._lock:
            order = self._orders.get(order_id)
            if order is None:
                raise KeyError(f"no order {order_id!r} at the fake gateway")
            if order["status"] == "paid":
                raise ValueError(f"order {order_id} is already paid")
            payment: dict[str, Any] = {
                "id": razorpay_id("pay_"),
                "entity": "payment",
                "amount": order["amount"],
                "currency": order["currency"],
                "status": "authorized",
                "order_id": order_id,
                "method": method,
                "captured": False,
                "international": False,
                "amount_refunded": 0,
                "vpa": "success@razorpay" if method == "upi" else None,
                "email": "void@razorpay.com",
                "contact": "+919000090000",
                "notes": [],
                "acquirer_data": {},
                "created_at": int(time.time()),
            }
            # The rest of Razorpay's payment entity is null until something happens to it.
            for field in _NULL_PAYMENT_FIELDS:
                payment[field] = None
            self._payments[payment["id"]] = payment
            order["status"] = "attempted"
            order["attempts"] += 1
            return copy.deepcopy(payment)

    def capture(self, payment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        # One critical section from count to state change: two racing captures of one payment
        # must see each other, or the fake would hide exactly the bug payrace hunts.
        with self._lock:
            self._captures[payment_id] += 1
            # Drawn on every call, so call n fails iff u_n < fail_rate: a higher rate only adds
            # failures to the same seeded sequence.
            draw = self._rng.random()
            status = self._rng.choice((502, 503))
            try:
                if draw < self._knobs.fail_rate:
                    self._injected[payment_id] += 1
                    raise _RazorpayError(status, _SERVER_ERROR, code="SERVER_ERROR")
                captured = self._capture_locked(payment_id, body)
            except _RazorpayError:
                self._rejected[payment_id] += 1
                raise
            self._accepted[payment_id] += 1
            return captured

    def _capture_locked(self, payment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        payment = self._payments.get(payment_id)
        if payment is None:
            raise _not_found()
        amount = _require_int(body, "amount")
        currency = _require_currency(body)
        if payment["status"] == "captured":
            raise _RazorpayError(400, "This payment has already been captured")
        if payment["status"] != "authorized":
            raise _RazorpayError(
                400,
                "Only payments which have been authorized and not yet captured can be captured",
            )
        if amount != payment["amount"]:
            raise _RazorpayError(
                400, "Capture amount must be equal to the amount authorized", field="amount"
            )
        if currency != payment["currency"]:
            raise _RazorpayError(
                400, "Currency should be same as payment currency", field="currency"
            )
        fee = payment["amount"] * 2 // 100  # Razorpay's fee includes its 18% GST
        payment.update(status="captured", captured=True, fee=fee, tax=fee * 18 // 118)
        order = self._orders[payment["order_id"]]
        order.update(status="paid", amount_paid=order["amount"], amount_due=0)
        return copy.deepcopy(payment)

    # -- HTTP -------------------------------------------------------------------------------

    def _authenticate(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            raise _RazorpayError(401, "Please provide your api key for authentication purposes.")
        credentials = f"{self.keys.key_id}:{self.keys.key_secret}".encode()
        expected = b"Basic " + base64.b64encode(credentials)
        if not hmac.compare_digest(header.encode(), expected):
            raise _RazorpayError(401, "Authentication failed")

    def _v1(
        self, handler: _Handler, *, capture: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            self._authenticate(request)
            with self._lock:
                knobs = self._knobs
            delay = knobs.latency_s + (knobs.capture_latency_s if capture else 0.0)
            if delay:
                # The server loop serves every other request meanwhile; that is what lets a
                # slow gateway stretch the window in which two captures overlap.
                await asyncio.sleep(delay)
            return JSONResponse(await handler(request))

        return endpoint

    async def _http_create_order(self, request: Request) -> dict[str, Any]:
        return self.create_order(await _json_object(request))

    async def _http_order(self, request: Request) -> dict[str, Any]:
        order = self.order(request.path_params["order_id"])
        if order is None:
            raise _not_found()
        return order

    async def _http_payment(self, request: Request) -> dict[str, Any]:
        payment = self.payment(request.path_params["payment_id"])
        if payment is None:
            raise _not_found()
        return payment

    async def _http_capture(self, request: Request) -> dict[str, Any]:
        return self.capture(request.path_params["payment_id"], await _json_object(request))

    async def _fake_counters(self, request: Request) -> Response:
        return JSONResponse(self.counters())

    async def _fake_payments(self, request: Request) -> Response:
        body = await _json_object(request)
        try:
            payment = self.authorize_payment(
                str(body.get("order_id")), method=str(body.get("method", "upi"))
            )
        except KeyError:
            raise _not_found("order_id") from None
        except ValueError as exc:
            raise _RazorpayError(400, str(exc), field="order_id") from None
        return JSONResponse(payment)

    async def _fake_knobs(self, request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(self.knobs())
        body = await _json_object(request)
        try:
            knobs = self.set_knobs(
                latency_s=body.get("latency_s"),
                capture_latency_s=body.get("capture_latency_s"),
                fail_rate=body.get("fail_rate"),
            )
        except (TypeError, ValueError) as exc:
            raise _RazorpayError(400, str(exc)) from None
        return JSONResponse(knobs)

    async def _fake_reset(self, request: Request) -> Response:
        self.reset()
        return JSONResponse(self.counters())

    def _build_app(self) -> Starlette:
        async def razorpay_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, _RazorpayError)
            return JSONResponse(exc.body, status_code=exc.status)

        async def http_error(request: Request, exc: Exception) -> Response:
            # The SDK calls response.json() on every error; a plain-text 404 would surface as
            # a JSONDecodeError instead of BadRequestError.
            assert isinstance(exc, HTTPException)
            if exc.status_code == 404:  # Razorpay answers an unknown URL with a 400
                error = _RazorpayError(400, "The requested URL was not found on the server.")
            else:
                error = _RazorpayError(exc.status_code, exc.detail)
            return JSONResponse(error.body, status_code=error.status)

        return Starlette(
            routes=[
                Route("/v1/orders", self._v1(self._http_create_order), methods=["POST"]),
                Route("/v1/orders/{order_id}", self._v1(self._http_order), methods=["GET"]),
                Route("/v1/payments/{payment_id}", self._v1(self._http_payment), methods=["GET"]),
                Route(
                    "/v1/payments/{payment_id}/capture",
                    self._v1(self._http_capture, capture=True),
                    methods=["POST"],
                ),
                Route("/_fake/counters", self._fake_counters, methods=["GET"]),
                Route("/_fake/payments", self._fake_payments, methods=["POST"]),
                Route("/_fake/knobs", self._fake_knobs, methods=["GET", "POST"]),
                Route("/_fake/reset", self._fake_reset, methods=["POST"]),
            ],
            exception_handlers={_RazorpayError: razorpay_error, HTTPException: http_error},
        )


class GatewayServer:
    """Runs `fake.app` under uvicorn in a thread on `host`, on a free port unless one is given."""

    def __init__(
        self,
        fake: FakeRazorpay,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.fake = fake
        self.host = host
        self.port = port
        self.url = ""
        self.start_timeout_s = start_timeout_s
        self.thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self._crash: BaseException | None = None

    def __enter__(self) -> GatewayServer:
        # Binding here, not in uvicorn, makes port 0 resolve before the thread starts, so the
        # URL is known and a busy port fails loudly in the caller's thread.
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says
        # TCP, and without it Nagle + delayed ACK add ~40 ms to every response.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(
            self.fake.app,
            lifespan="off",
            ws="none",  # nothing here speaks websockets; importing them only brings warnings
            http="h11",
            log_config=None,  # leave the process's logging as the caller configured it
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self._run, args=(sock,), name=f"payrace-gateway-{self.port}", daemon=True
        )
        try:
            self.thread.start()
            self._wait_until_answering()
        except BaseException:
            self._stop()
            raise
        return self

    def _run(self, sock: socket.socket) -> None:
        assert self._server is not None
        try:
            self._server.run(sockets=[sock])
        except BaseException as exc:  # kept for the start-up error message
            self._crash = exc
        finally:
            sock.close()

    def _wait_until_answering(self) -> None:
        thread = self.thread
        assert thread is not None
        wait_until_answers(
            self.url,
            "/_fake/counters",
            timeout_s=self.start_timeout_s,
            stopped=lambda: (
                None
                if thread.is_alive()
                else f"fake gateway at {self.url} stopped before answering: {self._crash!r}"
            ),
            what="fake gateway",
            hint="is the host loaded or the address firewalled? Try a larger start_timeout_s.",
            poll_s=0.02,
            request_timeout_s=1.0,
        )

    def _stop(self) -> None:
        if self._server is None or self.thread is None:
            return
        self._server.should_exit = True
        self.thread.join(timeout=5)
        if self.thread.is_alive():
            # Requests stuck in injected latency outlived the graceful shutdown.
            self._server.force_exit = True
            self.thread.join(timeout=5)
        if self.thread.is_alive():
            raise RuntimeError(f"fake gateway thread {self.thread.name} did not stop")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()


__all__ = [
    "EVENTS",
    "FakeRazorpay",
    "GatewayKeys",
    "GatewayServer",
    "client_callback",
    "new_event_id",
    "signed_webhook",
    "webhook_event",
]
