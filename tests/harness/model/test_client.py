"""payrace/harness/model/client.py: signed requests, the in-process and HTTP clients.

The HTTP tests run against a real uvicorn ServiceProcess on the session's PostgreSQL and the
fake gateway; every assertion is about the test's own orders and payments.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import pytest
import razorpay
from conftest import Service
from razorpay.errors import SignatureVerificationError

from payrace.harness.errors import UsageError
from payrace.harness.gateway.controls import LocalGateway
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.processes import ServiceProcess, free_port, service_env
from payrace.harness.infra.provider import Database
from payrace.harness.model.client import (
    AsgiClient,
    HttpClient,
    PaymentContext,
    Prepared,
    Reply,
    prepare,
)
from payrace.harness.model.generator import Step
from payrace.harness.model.profile import Profile

# What a service reads from its caller's context (as the probes do).
LABEL: ContextVar[str | None] = ContextVar("LABEL", default=None)

KEYS = GatewayKeys()
PROFILE = Profile.reference()
AMOUNT = 50000
VERIFY = Step("client", "verify")
CAPTURED = Step("webhook-1", "webhook", "payment.captured")


def razorpay_utility() -> Any:
    return razorpay.Client(auth=(KEYS.key_id, KEYS.key_secret)).utility


def gateway_payment(fake: FakeRazorpay) -> tuple[str, dict[str, Any]]:
    order = fake.create_order({"amount": AMOUNT, "currency": "INR"})
    return order["id"], fake.authorize_payment(order["id"])


def context(fake: FakeRazorpay, payment_id: int = 1) -> PaymentContext:
    order_id, payment = gateway_payment(fake)
    return PaymentContext(payment_id, order_id, payment)


def spread_ms(replies: list[Reply]) -> float:
    stamps = [int(r.server()["received_at_ns"]) for r in replies]
    return (max(stamps) - min(stamps)) / 1e6


# -- prepare() --------------------------------------------------------------------------------


def test_verify_body_carries_a_signature_the_razorpay_sdk_accepts(
    fake_gateway: FakeRazorpay,
) -> None:
    ctx = context(fake_gateway, payment_id=17)
    req = prepare(VERIFY, 0, ctx, PROFILE)
    assert (req.method, req.path, req.f) == ("POST", "/payments/verify", "verify")
    assert req.headers == {"content-type": "application/json"}
    body = json.loads(req.body)
    assert body["internal_payment_id"] == 17
    assert body["razorpay_order_id"] == ctx.gateway_order_id
    assert body["razorpay_payment_id"] == ctx.gateway_payment["id"]
    assert req.value == {"gateway_payment_id": ctx.gateway_payment["id"]}
    assert razorpay_utility().verify_payment_signature(body) is True
    with pytest.raises(SignatureVerificationError):
        razorpay_utility().verify_payment_signature({**body, "razorpay_payment_id": "pay_other"})


def test_webhook_signature_verifies_over_the_exact_raw_bytes(fake_gateway: FakeRazorpay) -> None:
    ctx = context(fake_gateway)
    req = prepare(CAPTURED, 1, ctx, PROFILE)
    assert (req.method, req.path, req.f) == ("POST", "/webhooks/razorpay", "webhook")
    signature = req.headers["x-razorpay-signature"]
    assert razorpay_utility().verify_webhook_signature(
        req.body.decode(), signature, KEYS.webhook_secret
    )
    # The same document encoded another way is not what was signed.
    reencoded = json.dumps(json.loads(req.body))
    assert reencoded.encode() != req.body
    with pytest.raises(SignatureVerificationError):
        razorpay_utility().verify_webhook_signature(reencoded, signature, KEYS.webhook_secret)

    envelope = json.loads(req.body)
    assert envelope["event"] == "payment.captured"
    assert envelope["account_id"] == KEYS.account_id
    assert envelope["payload"]["payment"]["entity"]["id"] == ctx.gateway_payment["id"]
    assert req.value == {
        "event": "payment.captured",
        "event_id": req.headers["x-razorpay-event-id"],
        "gateway_payment_id": ctx.gateway_payment["id"],
    }
    assert ctx.event_ids == {1: req.headers["x-razorpay-event-id"]}


def test_a_duplicate_step_reuses_the_event_id_and_a_redelivery_does_not(
    fake_gateway: FakeRazorpay,
) -> None:
    ctx = context(fake_gateway)
    first = prepare(CAPTURED, 1, ctx, PROFILE)
    duplicate = prepare(
        Step("webhook-2", "webhook", "payment.captured", same_event_as=1), 2, ctx, PROFILE
    )
    redelivery = prepare(Step("webhook-3", "webhook", "payment.captured"), 3, ctx, PROFILE)
    event_id = first.headers["x-razorpay-event-id"]
    assert duplicate.headers["x-razorpay-event-id"] == event_id
    assert duplicate.value["event_id"] == event_id
    assert redelivery.headers["x-razorpay-event-id"] != event_id
    assert ctx.event_ids == {1: event_id, 2: event_id, 3: redelivery.value["event_id"]}


def test_order_paid_webhook_carries_the_order(fake_gateway: FakeRazorpay) -> None:
    ctx = context(fake_gateway)
    req = prepare(Step("webhook-2", "webhook", "order.paid"), 2, ctx, PROFILE)
    envelope = json.loads(req.body)
    assert envelope["payload"]["order"]["entity"]["id"] == ctx.gateway_order_id
    assert envelope["payload"]["order"]["entity"]["status"] == "paid"


def test_reply_server_reads_server_timing_and_received_at() -> None:
    reply = Reply(
        200,
        {},
        {"server-timing": "lock;dur=1.5, hold;dur=3, db;dur=0.2", "x-payrace-received-at": "42"},
    )
    assert reply.server() == {"lock": 1.5, "hold": 3.0, "db": 0.2, "received_at_ns": 42}
    assert Reply(200, {}, {"x-payrace-received-at": "soon"}).server() == {}
    assert Reply(None, {}, {}, "refused").server() == {}


# -- AsgiClient ---------------------------------------------------------------------------------


async def test_asgi_client_creates_an_order_and_captures_through_the_service(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    client = AsgiClient(service.app)
    try:
        order = await client.create_order(AMOUNT, "INR")
        assert order["gateway_order_id"].startswith("order_")
        payment = LocalGateway(fake_gateway).authorize(order["gateway_order_id"])
        ctx = PaymentContext(order["payment_id"], order["gateway_order_id"], payment)
        reply = await client.send(prepare(VERIFY, 0, ctx, PROFILE))
    finally:
        await client.aclose()
    assert reply.status == 200, reply
    assert reply.error is None
    assert reply.body["payment_id"] == order["payment_id"]
    assert reply.body["status"] == "captured"
    server = reply.server()
    assert {"lock", "hold", "received_at_ns"} <= server.keys()
    assert server["lock"] >= 0 and server["hold"] >= 0


async def test_asgi_send_together_answers_every_request(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    client = AsgiClient(service.app)
    try:
        order = await client.create_order(AMOUNT, "INR")
        payment = fake_gateway.authorize_payment(order["gateway_order_id"])
        ctx = PaymentContext(order["payment_id"], order["gateway_order_id"], payment)
        replies = await client.send_together(
            [prepare(VERIFY, 0, ctx, PROFILE), prepare(CAPTURED, 1, ctx, PROFILE)]
        )
    finally:
        await client.aclose()
    assert [r.status for r in replies] == [200, 200], replies
    assert replies[1].body["event"] == "payment.captured"
    assert sorted(r.body["idempotent"] for r in replies) == [False, True]


async def test_create_order_refused_by_the_target_is_a_usage_error(service: Service) -> None:
    """A 4xx on the order is the target not speaking the contract: no trial can fix that."""
    client = AsgiClient(service.app)
    try:
        with pytest.raises(
            UsageError, match=r"answered POST /orders with HTTP 422 .*check \[create_order\]"
        ):
            await client.create_order(0, "INR")
    finally:
        await client.aclose()


# -- HttpClient against a real uvicorn --------------------------------------------------------


@pytest.fixture(scope="module")
def service_url(
    pg: Database, gateway_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log = tmp_path_factory.mktemp("client") / "service.log"
    with ServiceProcess(service_env(pg, gateway_url, "for_update", keys=KEYS), log_path=log) as svc:
        yield svc.url


async def verifies(client: HttpClient, fake: FakeRazorpay, n: int) -> list[Prepared]:
    reqs = []
    for _ in range(n):
        order = await client.create_order(AMOUNT, "INR")
        payment = fake.authorize_payment(order["gateway_order_id"])
        ctx = PaymentContext(order["payment_id"], order["gateway_order_id"], payment)
        reqs.append(prepare(VERIFY, 0, ctx, PROFILE))
    return reqs


async def test_http_send_gets_an_answer_with_the_servers_timings(
    service_url: str, fake_gateway: FakeRazorpay
) -> None:
    client = HttpClient(service_url)
    try:
        (req,) = await verifies(client, fake_gateway, 1)
        reply = await client.send(req)
        again = await client.send(req)
    finally:
        await client.aclose()
    assert reply.status == 200, reply
    assert reply.body["status"] == "captured" and reply.body["idempotent"] is False
    assert again.status == 200 and again.body["idempotent"] is True
    assert {"lock", "hold", "received_at_ns"} <= reply.server().keys()


async def test_http_send_together_answers_a_verify_and_its_webhook(
    service_url: str, fake_gateway: FakeRazorpay
) -> None:
    client = HttpClient(service_url)
    try:
        order = await client.create_order(AMOUNT, "INR")
        payment = fake_gateway.authorize_payment(order["gateway_order_id"])
        ctx = PaymentContext(order["payment_id"], order["gateway_order_id"], payment)
        replies = await client.send_together(
            [prepare(VERIFY, 0, ctx, PROFILE), prepare(CAPTURED, 1, ctx, PROFILE)]
        )
    finally:
        await client.aclose()
    assert [r.status for r in replies] == [200, 200], replies
    assert all(r.error is None for r in replies)
    assert all(r.body["payment_id"] == order["payment_id"] for r in replies)
    assert replies[1].body["event"] == "payment.captured"
    assert sorted(r.body["idempotent"] for r in replies) == [False, True]
    assert "received_at_ns" in replies[0].server()


async def test_send_together_lines_up_arrivals_and_spaced_sends_do_not(
    service_url: str, fake_gateway: FakeRazorpay
) -> None:
    client = HttpClient(service_url)
    try:
        together = await client.send_together(await verifies(client, fake_gateway, 4))
        spaced = []
        for req in await verifies(client, fake_gateway, 4):
            spaced.append(await client.send(req))
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()
    assert [r.status for r in together + spaced] == [200] * 8
    # A sanity bound, not a benchmark: the measure separates the two by an order of magnitude.
    assert spread_ms(together) < 50
    assert spread_ms(spaced) > 250


async def test_send_together_stamps_mark_the_release_not_the_connection_setup(
    service_url: str, fake_gateway: FakeRazorpay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slow connection set-up (40 ms each) must not show in the arrival spread: the server
    stamps a request when its head is complete, so the head's last byte is what is held."""
    open_connection = asyncio.open_connection

    async def slow_open(*args: Any, **kwargs: Any) -> Any:
        streams = await open_connection(*args, **kwargs)
        await asyncio.sleep(0.04)
        return streams

    client = HttpClient(service_url)
    try:
        reqs = await verifies(client, fake_gateway, 4)
        monkeypatch.setattr(asyncio, "open_connection", slow_open)
        replies = await client.send_together(reqs)
    finally:
        monkeypatch.undo()
        await client.aclose()
    assert [r.status for r in replies] == [200] * 4, replies
    assert spread_ms(replies) < 50


async def test_http_client_on_a_closed_port_replies_with_no_status_and_an_error() -> None:
    client = HttpClient(f"http://127.0.0.1:{free_port()}")
    req = Prepared(
        "POST", "/payments/verify", b"{}", {"content-type": "application/json"}, "verify"
    )
    try:
        reply = await client.send(req)
        together = await client.send_together([req, req])
    finally:
        await client.aclose()
    assert reply.status is None and reply.body == {}
    assert reply.error is not None and "ConnectError" in reply.error
    assert [r.status for r in together] == [None, None]
    assert all(r.error for r in together)


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "http://", "ftp://host/", ""])
def test_http_client_rejects_a_url_it_cannot_reach(url: str) -> None:
    with pytest.raises(ValueError, match="target URL must look like http://"):
        HttpClient(url)


@pytest.fixture
def self_signed(tmp_path: Path) -> ssl.SSLContext:
    """A server-side TLS context with a throwaway self-signed certificate for 127.0.0.1."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
         "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def test_https_target_answers_plain_and_aligned_sends(self_signed: ssl.SSLContext) -> None:
    """https targets: httpx for single sends, and the last-byte aligned sends over TLS too;
    a self-signed test certificate is refused unless the profile says verify_tls = false."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        body = await reader.readexactly(length)
        doc = json.dumps({"path": head.split(b" ")[1].decode(), "echo": body.decode()}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
            + f"content-length: {len(doc)}\r\n\r\n".encode()
            + doc
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=self_signed)
    port = server.sockets[0].getsockname()[1]
    req = Prepared("POST", "/verify", b'{"a":1}', {"content-type": "application/json"}, "verify")
    async with server:
        insecure = HttpClient(f"https://127.0.0.1:{port}/shop", verify_tls=False)
        strict = HttpClient(f"https://127.0.0.1:{port}/shop")
        try:
            one = await insecure.send(req)
            together = await insecure.send_together([req, req])
            refused = await strict.send(req)
            refused_together = await strict.send_together([req])
        finally:
            await insecure.aclose()
            await strict.aclose()
    assert one.status == 200 and one.body == {"path": "/shop/verify", "echo": '{"a":1}'}
    assert [r.status for r in together] == [200, 200]
    assert all(r.body["path"] == "/shop/verify" for r in together)
    assert refused.status is None and "CERTIFICATE_VERIFY_FAILED" in str(refused.error)
    assert refused_together[0].status is None
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused_together[0].error)


async def test_aligned_sends_keep_the_path_prefix_of_the_target_url() -> None:
    """A service mounted under /api gets /api/payments/verify, in the raw last-byte sends too."""
    seen: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append((await reader.readline()).decode().strip())
        body = b"{}"
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = HttpClient(f"http://127.0.0.1:{port}/api/")
    req = Prepared("POST", "/payments/verify", b"{}", {}, "verify")
    try:
        replies = await client.send_together([req, req])
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert [r.status for r in replies] == [200, 200]
    assert seen == ["POST /api/payments/verify HTTP/1.1"] * 2


async def test_an_order_payrace_created_at_the_gateway_is_handed_to_the_target(
    tmp_path: Path,
) -> None:
    """`by = "payrace"`: the target is told Razorpay's order id and answers only its own id."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    seen: list[Any] = []

    async def checkout(request: Request) -> JSONResponse:
        seen.append(await request.json())
        return JSONResponse({"data": {"charge": 77}}, status_code=201)

    app = Starlette(routes=[Route("/checkouts/{order}", checkout, methods=["POST"])])
    text = (Path(__file__).parents[3] / "payrace/harness/profiles/reference.toml").read_text()
    text = text.replace(
        'path = "/orders"\nbody = { amount = "{amount}", currency = "{currency}" }',
        'by = "payrace"\npath = "/checkouts/{gateway_order_id}"\n'
        'body = { rzp = "{gateway_order_id}", paise = "{amount}" }',
    ).replace('payment_id = "payment_id"', 'payment_id = "data.charge"')
    (tmp_path / "p.toml").write_text(text)
    profile = Profile.load(tmp_path / "p.toml")
    fake = FakeRazorpay(KEYS)
    order = LocalGateway(fake).create_order(AMOUNT, "INR")
    client = AsgiClient(app)
    try:
        got = await client.create_order(AMOUNT, "INR", profile, order["id"])
    finally:
        await client.aclose()
    assert got == {"payment_id": 77, "gateway_order_id": order["id"]}
    assert seen == [{"rzp": order["id"], "paise": AMOUNT}]


async def test_asgi_client_speaks_plain_asgi_as_an_http_client_would() -> None:
    """The ASGI app is called directly (no httpx): what it sees is what an HTTP client sends
    (method, path and query, headers, the body and its length), and what it answers comes
    back as Reply does it over HTTP (lower-cased headers, repeats joined, a non-JSON body)."""
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        seen.update(
            method=scope["method"],
            path=scope["path"],
            query=scope["query_string"],
            headers=dict(scope["headers"]),
            body=message["body"],
            contextvar=LABEL.get(),
        )
        await send({"type": "http.response.start", "status": 418,
                    "headers": [(b"X-Twice", b"a"), (b"x-twice", b"b")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"not ", "more_body": True})
        await send({"type": "http.response.body", "body": b"json"})
        seen["after"] = await receive()  # a client that has its answer: disconnected

    client = AsgiClient(app)
    token = LABEL.set("the caller's context")
    try:
        req = Prepared("post", "/hooks/x?y=1", b'{"a":1}', {"X-Sig": "s"}, "webhook")
        reply = await client.send(req, {"x-extra": "e"})
    finally:
        LABEL.reset(token)
    assert (seen["method"], seen["path"], seen["query"]) == ("POST", "/hooks/x", b"y=1")
    assert seen["headers"][b"x-sig"] == b"s" and seen["headers"][b"x-extra"] == b"e"
    assert seen["headers"][b"content-length"] == b"7" and seen["body"] == b'{"a":1}'
    assert seen["contextvar"] == "the caller's context"  # run in the caller's task
    assert seen["after"] == {"type": "http.disconnect"}
    assert reply == Reply(418, {"raw": "not json"}, {"x-twice": "a, b"})


async def test_asgi_client_says_so_when_the_app_answers_nothing() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        return None

    with pytest.raises(RuntimeError, match="without a complete answer"):
        await AsgiClient(app).send(Prepared("GET", "/", b"", {}, "verify"))
