"""payrace/service/direct.py: the capture routes answered ahead of FastAPI's router, and the
callback body read as FastAPI would read it (app._json_body)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from payrace.service.app import OrderIn, VerifyIn, _json_body
from payrace.service.direct import DirectRoutes
from payrace.service.errors import NotFound


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
