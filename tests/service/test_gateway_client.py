"""service/gateway_client.py: both clients (the lean one and the real razorpay SDK off the event
loop) against the fake gateway, through the same tests; the lean one's bytes against the SDK's."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gzip
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.signing import GatewayKeys
from payrace.service.gateway_client import (
    CaptureOutcome,
    GatewayClient,
    GatewayError,
    LeanGatewayClient,
    SdkGatewayClient,
    make_gateway_client,
)
from payrace.service.instrument import timing
from payrace.service.settings import Settings

KEYS = GatewayKeys()
CLIENTS = {"lean": LeanGatewayClient, "sdk": SdkGatewayClient}


@pytest.fixture(params=sorted(CLIENTS))
def kind(request: pytest.FixtureRequest) -> type[GatewayClient]:
    return CLIENTS[request.param]


@contextlib.asynccontextmanager
async def client_of(
    kind: type[GatewayClient], url: str, secret: str = KEYS.key_secret
) -> AsyncIterator[GatewayClient]:
    client = kind(KEYS.key_id, secret, url, 4)  # type: ignore[call-arg]
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def gateway(gateway_url: str, kind: type[GatewayClient]) -> AsyncIterator[GatewayClient]:
    async with client_of(kind, gateway_url + "/") as client:
        yield client


async def authorized(gateway: GatewayClient, fake: FakeRazorpay, amount: int = 50000) -> str:
    order = await gateway.create_order(amount, "INR", "rcpt_gateway_client")
    return str(fake.authorize_payment(order["id"])["id"])


async def test_create_order_returns_the_gateways_order(
    gateway: GatewayClient, fake_gateway: FakeRazorpay
) -> None:
    order = await gateway.create_order(25000, "INR", "rcpt_123")

    assert order["id"].startswith("order_")
    assert (order["amount"], order["currency"], order["receipt"]) == (25000, "INR", "rcpt_123")
    assert fake_gateway.order(order["id"]) == order


async def test_capture_of_an_authorized_payment_returns_it_captured(
    gateway: GatewayClient, fake_gateway: FakeRazorpay
) -> None:
    payment_id = await authorized(gateway, fake_gateway)

    outcome = await gateway.capture(payment_id, 50000, "INR")

    assert outcome.already_captured is False
    assert outcome.payment is not None
    assert (outcome.payment["id"], outcome.payment["status"]) == (payment_id, "captured")
    assert fake_gateway.counters()["accepted"][payment_id] == 1


async def test_a_second_capture_is_reported_as_already_captured_not_as_an_error(
    gateway: GatewayClient, fake_gateway: FakeRazorpay
) -> None:
    payment_id = await authorized(gateway, fake_gateway)
    await gateway.capture(payment_id, 50000, "INR")

    again = await gateway.capture(payment_id, 50000, "INR")

    assert again == CaptureOutcome(payment=None, already_captured=True)
    assert fake_gateway.capture_calls(payment_id) == 2


@pytest.mark.parametrize(
    ("payment", "amount", "currency", "says"),
    [
        ("unknown", 50000, "INR", "does not exist"),
        ("authorized", 40000, "INR", "amount authorized"),
        ("authorized", 50000, "USD", "same as payment currency"),
    ],
)
async def test_captures_the_gateway_refuses_raise_a_refused_gateway_error(
    gateway: GatewayClient,
    fake_gateway: FakeRazorpay,
    payment: str,
    amount: int,
    currency: str,
    says: str,
) -> None:
    payment_id = (
        "pay_DoesNotExist00" if payment == "unknown" else await authorized(gateway, fake_gateway)
    )

    with pytest.raises(GatewayError, match=says) as raised:
        await gateway.capture(payment_id, amount, currency)

    assert raised.value.refused is True
    assert str(raised.value).startswith("gateway refused the call")


async def test_an_order_the_gateway_refuses_raises_a_refused_gateway_error(
    gateway: GatewayClient,
) -> None:
    with pytest.raises(GatewayError, match=r"atleast INR 1\.00") as raised:
        await gateway.create_order(99, "INR", "rcpt_too_small")

    assert raised.value.refused is True


async def test_a_failing_gateway_raises_an_unavailable_gateway_error(
    gateway: GatewayClient, knobs: FakeRazorpay
) -> None:
    payment_id = await authorized(gateway, knobs)
    knobs.set_knobs(fail_rate=1.0)

    with pytest.raises(GatewayError, match="gateway unavailable: ServerError") as raised:
        await gateway.capture(payment_id, 50000, "INR")

    assert raised.value.refused is False
    assert knobs.counters()["injected"][payment_id] == 1
    assert knobs.payment(payment_id)["status"] == "authorized"  # type: ignore[index]


async def test_an_unreachable_gateway_raises_an_unavailable_gateway_error(
    kind: type[GatewayClient],
) -> None:
    async with client_of(kind, "http://127.0.0.1:1") as client:
        with pytest.raises(GatewayError, match="gateway unavailable: ConnectionError") as raised:
            await client.create_order(50000, "INR", "rcpt_nowhere")

    assert raised.value.refused is False


async def test_an_unavailable_gateway_error_does_not_say_where_the_gateway_lives(
    kind: type[GatewayClient],
) -> None:
    """The message becomes a 502 body: it names what failed, not the internal host:port."""
    async with client_of(kind, "http://127.0.0.1:9") as client:
        with pytest.raises(GatewayError) as raised:
            await client.capture("pay_nowhere12345678", 50000, "INR")
    said = str(raised.value)
    assert said.startswith("gateway unavailable: ConnectionError")
    assert "127.0.0.1" not in said and "port=9" not in said and ":9/" not in said


async def test_wrong_keys_are_refused(gateway_url: str, kind: type[GatewayClient]) -> None:
    async with client_of(kind, gateway_url, "not-the-secret") as client:
        with pytest.raises(GatewayError, match="Authentication failed") as raised:
            await client.create_order(50000, "INR", "rcpt_bad_keys")

    assert raised.value.refused is True  # Razorpay's code is BAD_REQUEST_ERROR, as for a 400


async def test_time_in_the_sdk_is_added_to_the_requests_gateway_timing(
    gateway: GatewayClient, knobs: FakeRazorpay
) -> None:
    payment_id = await authorized(gateway, knobs)
    knobs.set_knobs(capture_latency_s=0.05)

    async def request() -> timing.Timings:
        t = timing.begin()
        await gateway.capture(payment_id, 50000, "INR")
        with pytest.raises(GatewayError):
            await gateway.capture("pay_DoesNotExist00", 50000, "INR")  # failures count too
        return t

    t = await asyncio.create_task(request(), context=contextvars.Context())

    assert t.gateway_ms >= 100


async def test_slow_captures_run_in_parallel_off_the_event_loop(
    gateway: GatewayClient, knobs: FakeRazorpay
) -> None:
    payment_ids = [await authorized(gateway, knobs) for _ in range(3)]
    knobs.set_knobs(capture_latency_s=0.2)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    tick_task = asyncio.create_task(ticker())
    started = time.perf_counter()
    try:
        outcomes: list[Any] = await asyncio.gather(
            *(gateway.capture(p, 50000, "INR") for p in payment_ids)
        )
    finally:
        tick_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick_task
    elapsed = time.perf_counter() - started

    assert all(not o.already_captured for o in outcomes)
    assert elapsed < 0.45  # three 0.2 s calls side by side, not one after another
    assert ticks >= 10  # the loop kept running while the SDK waited


def test_the_sdk_user_agent_keeps_its_version_read_once() -> None:
    from importlib.metadata import version

    gateway = SdkGatewayClient("rzp_test_x", "secret", "http://127.0.0.1:9")
    try:
        headers = gateway._client()._update_user_agent_header({})["headers"]
    finally:
        gateway.close()
    assert headers["User-Agent"].startswith(f"Razorpay-Python/{version('razorpay')} ")


# -- the lean client's bytes and readings against the SDK's --------------------------------


class Recorder:
    """A one-route HTTP server that records each request and answers the next canned bytes."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *fields = head.decode("latin-1").rstrip("\r\n").split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((line, headers, body))
                answer = self.answers.pop(0)
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def recorder(answers: list[bytes]) -> AsyncIterator[tuple[Recorder, str]]:
    rec = Recorder(list(answers))
    server = await asyncio.start_server(rec.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield rec, f"http://127.0.0.1:{port}"
    finally:
        server.close()


def answer(status: int, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", *headers]
    if not any(h.lower().startswith(("transfer-encoding", "connection: close")) for h in headers):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


PAYMENT = b'{"id": "pay_A", "status": "captured"}'


def error(status: int, code: str, description: str) -> bytes:
    return answer(
        status, json.dumps({"error": {"code": code, "description": description}}).encode()
    )


CANNED = {
    "captured": answer(200, PAYMENT),
    "chunked": answer(
        200,
        b"10\r\n" + PAYMENT[:16] + b"\r\n15\r\n" + PAYMENT[16:] + b"\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked",
    ),
    "gzip": answer(200, gzip.compress(PAYMENT), "Content-Encoding: gzip"),
    "until close": answer(200, PAYMENT, "Connection: close"),
    "already captured": error(400, "BAD_REQUEST_ERROR", "This payment has already been captured"),
    "refused": error(400, "BAD_REQUEST_ERROR", "Capture amount must be equal to the amount"),
    "unauthorised": error(401, "BAD_REQUEST_ERROR", "Authentication failed"),
    "refusal on a 5xx": error(503, "bad_request_error", "the code decides, not the status"),
    "server error": error(500, "SERVER_ERROR", "The server encountered an error."),
    "gateway error": error(504, "GATEWAY_ERROR", "Gateway Timeout at 10.0.0.7:8443"),
    "other code": error(502, "SOMETHING_ELSE", "who knows"),
    "no error object": answer(500, b'{"oops": 1}'),
    "not json": answer(502, b"<html>Bad Gateway</html>"),
    "2xx not json": answer(200, b"nope"),
    "bad gzip": answer(200, b"not gzip at all", "Content-Encoding: gzip"),
}


async def outcome(client: GatewayClient, call: str) -> object:
    try:
        if call == "capture":
            return await client.capture("pay_A", 50000, "INR")
        if call == "create_order":
            return await client.create_order(50000, "INR", "rcpt_1")
        return await client.fetch_payment("pay_A")
    except GatewayError as exc:
        # JSON's, zlib's and requests' decode errors word their detail differently: the kind
        # counts.
        said = str(exc).split(": Expecting value")[0]
        if "ContentDecodingError" in said:
            said = said.split("Error: ")[0] + "Error"
        return ("GatewayError", exc.refused, said)


@pytest.mark.parametrize("call", ["capture", "create_order", "fetch_payment"])
@pytest.mark.parametrize("canned", sorted(CANNED))
async def test_the_lean_client_sends_the_sdks_bytes_and_reads_answers_as_the_sdk_does(
    call: str, canned: str
) -> None:
    seen: dict[str, tuple[object, tuple[str, dict[str, str], bytes]]] = {}
    async with recorder([CANNED[canned]] * len(CLIENTS)) as (rec, url):
        for name, kind in CLIENTS.items():
            async with client_of(kind, url) as client:
                t = timing.begin()
                result = await outcome(client, call)
            assert t.gateway_ms > 0
            seen[name] = (result, rec.requests[-1])

    (lean, (lean_line, lean_headers, lean_body)) = seen["lean"]
    (sdk, (sdk_line, sdk_headers, sdk_body)) = seen["sdk"]
    assert lean == sdk
    assert lean_line == sdk_line
    assert lean_body == sdk_body
    # What the client decodes: urllib3 adds br / zstd when their packages are installed; the
    # lean client asks for what zlib decodes.
    assert lean_headers.pop("accept-encoding") == "gzip, deflate"
    assert sdk_headers.pop("accept-encoding").startswith("gzip, deflate")
    assert lean_headers == sdk_headers
    assert sdk_headers["authorization"].startswith("Basic ")


def test_the_canned_answers_cover_every_reading() -> None:
    """The parametrised test above compares like with like; this pins what 'like' is."""
    assert set(CANNED) >= {"already captured", "refused", "server error", "not json"}


async def test_the_lean_client_maps_answers_as_documented() -> None:
    async with (
        recorder(
            [CANNED["already captured"], CANNED["refusal on a 5xx"], CANNED["gateway error"]]
        ) as (rec, url),
        client_of(LeanGatewayClient, url) as client,
    ):
        assert await client.capture("pay_A", 1, "INR") == CaptureOutcome(None, True)
        with pytest.raises(GatewayError, match="the code decides") as refused:
            await client.capture("pay_A", 1, "INR")
        with pytest.raises(GatewayError, match="unavailable: GatewayError") as unavailable:
            await client.capture("pay_A", 1, "INR")
    assert refused.value.refused is True
    assert unavailable.value.refused is False
    assert "10.0.0.7" not in str(unavailable.value)
    assert rec.connections == 1  # one keep-alive connection for the three calls


async def test_the_lean_client_never_writes_to_a_connection_the_server_closed() -> None:
    async with (
        recorder([CANNED["until close"], CANNED["captured"]]) as (rec, url),
        client_of(LeanGatewayClient, url) as client,
    ):
        await client.capture("pay_A", 50000, "INR")
        await asyncio.sleep(0.05)
        second = await client.capture("pay_A", 50000, "INR")
    assert second.payment is not None
    assert rec.connections == 2 and len(rec.requests) == 2


async def test_a_cancelled_call_does_not_leave_its_connection_for_the_next(
    knobs: FakeRazorpay, gateway_url: str
) -> None:
    """An answer still on its way would be read as the next call's answer."""
    async with client_of(LeanGatewayClient, gateway_url) as client:
        payment_ids = [await authorized(client, knobs) for _ in range(2)]
        knobs.set_knobs(capture_latency_s=0.2)
        call = asyncio.create_task(client.capture(payment_ids[0], 50000, "INR"))
        await asyncio.sleep(0.05)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        knobs.set_knobs(capture_latency_s=0.0)
        outcome = await client.capture(payment_ids[1], 50000, "INR")
    assert outcome.payment is not None and outcome.payment["id"] == payment_ids[1]


@pytest.mark.parametrize(
    ("setting", "kind"), [("lean", LeanGatewayClient), ("SDK", SdkGatewayClient)]
)
def test_gateway_client_setting_picks_the_client(setting: str, kind: type[GatewayClient]) -> None:
    client = make_gateway_client(Settings(gateway_client=setting))
    try:
        assert type(client) is kind
    finally:
        client.close()


def test_the_lean_client_refuses_a_base_url_it_cannot_speak_to() -> None:
    with pytest.raises(ValueError, match="RAZORPAY_BASE_URL"):
        LeanGatewayClient("rzp_test_x", "secret", "ftp://example.invalid")


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no CA signed, and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_both_clients_refuse_a_certificate_outside_the_sdks_ca_bundle(
    self_signed: tuple[Path, Path],
) -> None:
    """https: the lean client trusts what the SDK's own CA bundle trusts, nothing else."""
    cert, key = self_signed
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    rec = Recorder([CANNED["captured"]] * 2)
    server = await asyncio.start_server(rec.serve, "127.0.0.1", 0, ssl=context)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    said = {}
    try:
        for name, kind in CLIENTS.items():
            async with client_of(kind, url) as client:
                with pytest.raises(GatewayError) as raised:
                    await client.capture("pay_A", 50000, "INR")
            said[name] = str(raised.value)
    finally:
        server.close()

    assert rec.requests == []  # nothing was sent to an untrusted server
    for message in said.values():
        assert message.startswith("gateway unavailable: SSLError: ")
        assert "CERTIFICATE_VERIFY_FAILED" in message
        assert "127.0.0.1" not in message
