"""payrace/service/direct.py: the capture routes answered ahead of FastAPI's router, and the
callback body read as FastAPI would read it (app._json_body)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from payrace.service.app import OrderIn, VerifyIn, _json_body
from payrace.service.direct import DirectRoutes, FrontDoor, LeanJSONResponse
from payrace.service.errors import NotFound, install_handlers
from payrace.service.instrument.middleware import InstrumentMiddleware


class Inner:
    """The app behind: answers 299 with the body it was handed."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await Request(scope, receive).body()
        self.bodies.append(body)
        await Response(body, status_code=299)(scope, receive, send)


async def echo(request: Request, raw: bytes) -> Response | None:
    doc = json.loads(raw)
    if doc.get("decline"):
        return None
    if doc.get("missing"):
        raise NotFound("no such thing")
    if doc.get("boom"):
        raise ZeroDivisionError("unhandled")
    return JSONResponse({"direct": doc})


async def not_found(_: Request, exc: Exception) -> Response:
    return JSONResponse({"handled": str(exc)}, status_code=404)


def client(inner: Inner, handlers: dict[Any, Any]) -> httpx.AsyncClient:
    app = DirectRoutes(inner, routes={"/direct": echo}, handlers=lambda: handlers)
    # An exception with no handler leaves the layer and reaches the test (in the service,
    # ServerErrorMiddleware answers it: a logged 500).
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_a_post_to_a_direct_path_is_answered_by_its_handler_not_the_app() -> None:
    inner = Inner()
    async with client(inner, {}) as c:
        reply = await c.post("/direct", json={"a": 1})
    assert reply.status_code == 200
    assert reply.json() == {"direct": {"a": 1}}
    assert inner.bodies == []


async def test_other_paths_methods_and_declined_requests_reach_the_app_with_their_body() -> None:
    inner = Inner()
    async with client(inner, {}) as c:
        other = await c.post("/elsewhere", content=b"x")
        get = await c.get("/direct")
        declined = await c.post("/direct", content=b'{"decline": true}')
    assert [other.status_code, get.status_code, declined.status_code] == [299, 299, 299]
    assert inner.bodies == [b"x", b"", b'{"decline": true}']
    assert declined.content == b'{"decline": true}'


async def test_a_handled_exception_is_answered_by_the_apps_handler_for_its_class() -> None:
    inner = Inner()
    # Looked up along the class's MRO, as Starlette's ExceptionMiddleware does (NotFound is an
    # ApiError); the catch-all Exception handler is not this layer's.
    async with client(inner, {Exception: not_found, NotFound.__mro__[1]: not_found}) as c:
        reply = await c.post("/direct", json={"missing": True})
        with pytest.raises(ZeroDivisionError):
            await c.post("/direct", json={"boom": True})
    assert reply.status_code == 404
    assert reply.json() == {"handled": "no such thing"}
    assert inner.bodies == []


BODY = {
    "razorpay_order_id": "order_1",
    "razorpay_payment_id": "pay_1",
    "razorpay_signature": "sig",
    "internal_payment_id": 7,
}


def test_json_body_reads_what_fastapi_would_accept() -> None:
    raw = json.dumps({**BODY, "extra": [1]}).encode()
    assert _json_body(VerifyIn, "application/json", raw) == VerifyIn.model_validate(BODY)
    order = _json_body(OrderIn, "application/json", b'{"amount": 50000}')
    assert order == OrderIn(amount=50000, currency="INR")


@pytest.mark.parametrize(
    ("content_type", "raw"),
    [
        (None, json.dumps(BODY).encode()),
        ("text/plain", json.dumps(BODY).encode()),
        ("application/json", b""),
        ("application/json", b"{not json"),
        ("application/json", b"[1]"),
        ("application/json", json.dumps({**BODY, "internal_payment_id": "7"}).encode()),
        ("application/json", json.dumps({**BODY, "razorpay_order_id": ""}).encode()),
    ],
)
def test_json_body_leaves_everything_else_to_fastapi(content_type: str | None, raw: bytes) -> None:
    assert _json_body(VerifyIn, content_type, raw) is None


@pytest.mark.parametrize(
    "raw", [b'{"amount": "50000"}', b'{"amount": true}', b'{"amount": 50000, "extra": 1}']
)
def test_an_order_body_fastapi_would_refuse_is_left_to_it(raw: bytes) -> None:
    assert _json_body(OrderIn, "application/json", raw) is None


# -- FrontDoor: the direct paths' POSTs skip FastAPI's outer layers --------------------------


async def _never_blocked(_: int) -> bool:
    return False


def front_app(**fastapi: Any) -> tuple[FastAPI, list[FrontDoor]]:
    """A FastAPI app shaped like the service's: its handlers, DirectRoutes inside the
    instrumentation, and the stack behind a FrontDoor."""
    app = FastAPI(**fastapi)
    install_handlers(app)

    @app.get("/direct")
    async def routed() -> dict[str, bool]:
        return {"routed": True}

    app.add_middleware(
        DirectRoutes, routes={"/direct": echo}, handlers=lambda: app.exception_handlers
    )
    app.add_middleware(
        InstrumentMiddleware, probes_enabled=False, is_blocked=_never_blocked, groups={}
    )
    built: list[FrontDoor] = []
    build_stack = app.build_middleware_stack

    def build() -> FrontDoor:
        built.append(FrontDoor(build_stack(), paths=("/direct",), inner=InstrumentMiddleware))
        return built[-1]

    app.build_middleware_stack = build  # type: ignore[method-assign]
    return app, built


class Refuse:
    """Stands in for a skipped layer: any request that reaches it fails."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the outer layers were not skipped")


async def test_a_direct_post_skips_the_outer_layers_and_nothing_else_does() -> None:
    app, built = front_app()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t"
    ) as c:
        first = await c.post("/direct", json={"a": 1})
        (front,) = built
        assert front.shortcut is not None
        telemetry_layer: Any = front.app.app  # type: ignore[attr-defined]
        telemetry_layer.app = Refuse()  # what comes after ServerErrorMiddleware
        again = await c.post("/direct", json={"a": 2})
        routed = await c.get("/direct")
    assert first.json() == {"direct": {"a": 1}}
    assert again.json() == {"direct": {"a": 2}}
    # The instrumentation is not skipped: it stamps every answer.
    assert "x-payrace-received-at" in again.headers
    # A GET of the same path takes the whole stack, here through the refusing layer: a 500.
    assert routed.status_code == 500


async def test_an_unexpected_exception_on_the_shortcut_is_the_apps_logged_500_and_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = front_app()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        reply = await c.post("/direct", json={"boom": True})
    assert reply.status_code == 500
    assert reply.json()["error"]["code"] == "internal_error"
    assert any(r.name == "service" and r.exc_info for r in caplog.records)
    # ...and it is raised on to the server, which logs it too, as ServerErrorMiddleware does.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        with pytest.raises(ZeroDivisionError):
            await c.post("/direct", json={"boom": True})


async def test_a_request_native_telemetry_observes_takes_the_whole_stack() -> None:
    app, built = front_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        await c.post("/direct", json={"a": 1})
    (front,) = built
    telemetry_layer: Any = front.app.app  # type: ignore[attr-defined]
    telemetry_layer.app = Refuse()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/direct",
        "headers": [],
        "query_string": b"",
        "fastapi.telemetry": None,
    }
    with pytest.raises(AssertionError, match="not skipped"):
        await front(scope, receive, send)


def test_a_stack_of_another_shape_has_no_shortcut() -> None:
    # With a body limit of its own, FastAPI's AppBodyLimitMiddleware has work to do.
    app, built = front_app(max_body_size=1000)
    app.build_middleware_stack()
    assert built[0].shortcut is None


@pytest.mark.parametrize(
    "content",
    [
        {"payment_id": 7, "status": "captured", "idempotent": False, "invoice_status": None},
        {"message": "caf\u00e9 \u20b9 \U0001f600", "nested": [1, 2.5, {"x": True}]},
        [],
        "text",
    ],
)
def test_the_lean_json_response_is_starlettes_byte_for_byte(content: Any) -> None:
    lean, stock = LeanJSONResponse(content, status_code=201), JSONResponse(content, 201)
    assert lean.body == stock.body
    assert lean.raw_headers == stock.raw_headers
    assert lean.status_code == 201


def test_the_lean_json_response_refuses_nan_as_starlettes_does() -> None:
    for kind in (LeanJSONResponse, JSONResponse):
        with pytest.raises(ValueError):
            kind({"x": float("nan")})
