"""payrace/harness/gateway/server.py: the fake's routes (auth, latency, Razorpay-shaped errors, the
/_fake controls) and the threaded server's start and stop."""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httptools
import httpx
import pytest
import razorpay
import uvloop
from razorpay.errors import BadRequestError

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer, _sleep_at_least
from payrace.harness.gateway.signing import GatewayKeys

KEYS = GatewayKeys()
PAY_ID = re.compile(r"^pay_[A-Za-z0-9]{14}$")
AuthorizedOrder = Callable[[], tuple[dict[str, Any], str]]


def test_wrong_basic_auth_gets_401_in_razorpays_error_shape(server: GatewayServer) -> None:
    response = httpx.get(f"{server.url}/v1/orders/order_x", auth=(KEYS.key_id, "wrong"))

    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "BAD_REQUEST_ERROR"
    assert error["description"] == "Authentication failed"
    assert set(error) == {"code", "description", "source", "step", "reason", "metadata", "field"}
    assert httpx.get(f"{server.url}/v1/orders/order_x").status_code == 401

    sdk = razorpay.Client(auth=(KEYS.key_id, "wrong"), base_url=server.url)
    with pytest.raises(BadRequestError, match="Authentication failed"):
        sdk.order.create({"amount": 100, "currency": "INR"})


def test_invalid_order_requests_are_bad_requests_naming_the_field(server: GatewayServer) -> None:
    auth = (KEYS.key_id, KEYS.key_secret)
    for body, field in (
        ({"currency": "INR"}, "amount"),
        ({"amount": "500", "currency": "INR"}, "amount"),
        ({"amount": 500}, "currency"),
    ):
        response = httpx.post(f"{server.url}/v1/orders", json=body, auth=auth)
        assert response.status_code == 400
        assert response.json()["error"]["field"] == field
    response = httpx.get(f"{server.url}/v1/refunds", auth=auth)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "BAD_REQUEST_ERROR"


def test_capture_latency_slows_capture_only_and_latency_slows_every_call(
    client: Any, fake: FakeRazorpay, authorized_order: AuthorizedOrder
) -> None:
    order, payment_id = authorized_order()
    fake.set_knobs(capture_latency_s=0.3)

    started = time.monotonic()
    client.order.fetch(order["id"])
    assert time.monotonic() - started < 0.3
    started = time.monotonic()
    client.payment.capture(payment_id, 50000, {"currency": "INR"})
    assert time.monotonic() - started >= 0.3

    fake.set_knobs(capture_latency_s=0.0, latency_s=0.3)
    started = time.monotonic()
    client.order.fetch(order["id"])
    assert time.monotonic() - started >= 0.3


def test_injected_latency_is_a_floor_even_where_uvloop_rounds_its_timers() -> None:
    # uvloop counts timers in whole milliseconds from the loop's cached time: a plain
    # asyncio.sleep(0.0104) wakes after ~10.1 ms, and a target timing its gateway call
    # would see less latency than was injected.
    async def elapsed() -> list[float]:
        times = []
        for _ in range(20):
            started = time.perf_counter()
            await _sleep_at_least(0.0104)
            times.append(time.perf_counter() - started)
        return times

    times = uvloop.run(elapsed())

    assert min(times) >= 0.0104
    assert max(times) < 0.1


def test_control_endpoints_over_http_match_the_objects_counters(
    server: GatewayServer, client: Any, fake: FakeRazorpay
) -> None:
    order = client.order.create({"amount": 20000, "currency": "INR"})
    payment = httpx.post(f"{server.url}/_fake/payments", json={"order_id": order["id"]}).json()
    assert PAY_ID.match(payment["id"])
    assert payment["status"] == "authorized"
    client.payment.capture(payment["id"], 20000, {"currency": "INR"})
    with pytest.raises(BadRequestError):
        client.payment.capture(payment["id"], 20000, {"currency": "INR"})

    counters = httpx.get(f"{server.url}/_fake/counters").json()
    assert counters == fake.counters()
    assert counters["captures"][payment["id"]] == fake.capture_calls(payment["id"]) == 2

    knobs = httpx.post(f"{server.url}/_fake/knobs", json={"fail_rate": 0.25}).json()
    assert knobs == fake.knobs() == {
        "latency_s": 0.0, "capture_latency_s": 0.0, "fail_rate": 0.25, "timeout_rate": 0.0,
    }  # fmt: skip
    assert httpx.post(f"{server.url}/_fake/knobs", json={"fail_rate": 2}).status_code == 400
    unknown = httpx.post(f"{server.url}/_fake/knobs", json={"failrate": 0.5})
    assert unknown.status_code == 400 and "unknown knob" in unknown.json()["error"]["description"]
    httpx.post(f"{server.url}/_fake/reset")
    assert fake.counters()["captures"] == {}
    assert fake.order(order["id"]) is None
    assert fake.knobs()["fail_rate"] == 0.0


def test_server_thread_is_gone_after_exit_also_after_a_failure() -> None:
    server = GatewayServer(FakeRazorpay(KEYS))
    with pytest.raises(RuntimeError, match="boom"), server:
        assert server.thread is not None
        assert server.thread.is_alive()
        assert httpx.get(f"{server.url}/_fake/counters").status_code == 200
        raise RuntimeError("boom")

    assert server.thread is not None
    assert not server.thread.is_alive()
    assert server.thread not in threading.enumerate()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/_fake/counters")


def test_a_busy_port_fails_to_start_without_leaving_a_thread() -> None:
    with GatewayServer(FakeRazorpay(KEYS)) as first:
        second = GatewayServer(FakeRazorpay(KEYS), port=first.port)
        with pytest.raises(OSError), second:
            pass
        assert second.thread is None


def _wait_for_holds(fake: FakeRazorpay, payment_id: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while fake.holds().get(payment_id) != count:
        assert time.monotonic() < deadline, fake.holds()
        time.sleep(0.005)


def test_held_captures_are_answered_only_once_released_and_then_as_razorpay_would(
    server: GatewayServer, fake: FakeRazorpay, authorized_order: AuthorizedOrder
) -> None:
    _, payment_id = authorized_order()
    fake.arm_holds(payment_id, timeout_s=30.0)
    outcomes: list[str] = []

    def capture() -> None:
        own = razorpay.Client(auth=(KEYS.key_id, KEYS.key_secret), base_url=server.url)
        try:
            own.payment.capture(payment_id, 50000, {"currency": "INR"})
            outcomes.append("ok")
        except BadRequestError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=capture) for _ in range(2)]
    for thread in threads:
        thread.start()
    _wait_for_holds(fake, payment_id, 2)
    # Held: not answered, not counted, and the server still answers everything else.
    assert outcomes == [] and fake.capture_calls(payment_id) == 0
    assert httpx.get(f"{server.url}/_fake/holds").json() == {payment_id: 2}

    released = httpx.post(f"{server.url}/_fake/holds/{payment_id}/release").json()
    assert released == {"released": 2}
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(outcomes) == ["This payment has already been captured", "ok"]
    assert fake.counters()["captures"] == {payment_id: 2}
    assert fake.counters()["accepted"] == {payment_id: 1}
    assert httpx.delete(f"{server.url}/_fake/holds/{payment_id}").json() == {"released": 0}
    assert fake.holds() == {} and fake.hold_timeouts == 0


def test_a_held_capture_goes_on_by_itself_after_its_timeout(
    client: Any, fake: FakeRazorpay, authorized_order: AuthorizedOrder
) -> None:
    _, payment_id = authorized_order()
    fake.arm_holds(payment_id, timeout_s=0.3)
    started = time.monotonic()
    assert client.payment.capture(payment_id, 50000, {"currency": "INR"})["captured"] is True
    assert time.monotonic() - started >= 0.3
    assert fake.hold_timeouts == 1 and fake.holds() == {payment_id: 0}


def test_arming_over_http_checks_its_fields(server: GatewayServer, fake: FakeRazorpay) -> None:
    for body in ({"timeout_s": 1}, {"payment_id": "pay_x", "timeout_s": "1"},
                 {"payment_id": "pay_x", "timeout_s": 0}, {"payment_id": "pay_x"}):  # fmt: skip
        response = httpx.post(f"{server.url}/_fake/holds", json=body)
        assert response.status_code == 400, body
        assert response.json()["error"]["code"] == "BAD_REQUEST_ERROR"
    assert fake.holds() == {}


def test_stopping_the_server_lets_a_held_capture_go() -> None:
    fake = FakeRazorpay(KEYS)
    order = fake.create_order({"amount": 50000, "currency": "INR"})
    payment_id = fake.authorize_payment(order["id"])["id"]
    fake.arm_holds(payment_id, timeout_s=60.0)
    errors: list[BaseException] = []
    with GatewayServer(fake) as running:

        def capture() -> None:
            try:
                httpx.post(
                    f"{running.url}/v1/payments/{payment_id}/capture",
                    json={"amount": 50000, "currency": "INR"},
                    auth=(KEYS.key_id, KEYS.key_secret),
                    timeout=30,
                )
            except httpx.HTTPError as exc:
                errors.append(exc)

        thread = threading.Thread(target=capture)
        thread.start()
        _wait_for_holds(fake, payment_id, 1)
        started = time.monotonic()
    assert time.monotonic() - started < 5  # not the hold's 60 s
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert fake.holds() == {}


class _Answers:
    """Reads HTTP answers off a raw socket with httptools, as the service's lean client does."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[tuple[int, dict[bytes, bytes], bytes]] = []
        self.headers: dict[bytes, bytes] = {}
        self.body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self.headers, self.body))
        self.headers, self.body = {}, b""

    def read(self, count: int) -> list[tuple[int, dict[bytes, bytes], bytes]]:
        while len(self.done) < count:
            data = self.sock.recv(65536)
            assert data, f"connection closed after {len(self.done)} of {count} answers"
            self.parser.feed_data(data)
        answers, self.done = self.done[:count], self.done[count:]
        return answers


def _request(method: str, path: str, body: bytes = b"", *extra: str) -> bytes:
    token = base64.b64encode(f"{KEYS.key_id}:{KEYS.key_secret}".encode()).decode()
    head = [f"{method} {path} HTTP/1.1", "Host: gateway", f"Authorization: Basic {token}", *extra]
    if body:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _capture_body() -> bytes:
    return json.dumps({"currency": "INR", "amount": 50000}).encode()


@pytest.fixture
def raw(server: GatewayServer) -> Iterator[tuple[socket.socket, _Answers]]:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    try:
        yield sock, _Answers(sock)
    finally:
        sock.close()


def test_v1_answers_are_compact_json_with_length_type_and_date_on_a_kept_connection(
    raw: tuple[socket.socket, _Answers], fake: FakeRazorpay, authorized_order: AuthorizedOrder
) -> None:
    sock, answers = raw
    order, payment_id = authorized_order()
    for _ in range(2):  # the same connection serves call after call
        sock.sendall(_request("GET", f"/v1/orders/{order['id']}"))
        ((status, headers, body),) = answers.read(1)
        assert status == 200
        assert headers[b"content-type"] == b"application/json"
        assert int(headers[b"content-length"]) == len(body)
        assert headers[b"date"].endswith(b" GMT") and b"connection" not in headers
        assert body == json.dumps(fake.order(order["id"]), separators=(",", ":")).encode()

    sock.sendall(_request("POST", f"/v1/payments/{payment_id}/capture", _capture_body()))
    ((status, _, body),) = answers.read(1)
    assert status == 200 and json.loads(body) == fake.payment(payment_id)
    assert json.loads(body)["status"] == "captured"


def test_pipelined_calls_are_answered_in_order_also_behind_one_that_waits(
    raw: tuple[socket.socket, _Answers], fake: FakeRazorpay, authorized_order: AuthorizedOrder
) -> None:
    sock, answers = raw
    _, payment_id = authorized_order()
    fake.set_knobs(capture_latency_s=0.2)
    sock.sendall(
        _request("POST", f"/v1/payments/{payment_id}/capture", _capture_body())
        + _request("GET", f"/v1/payments/{payment_id}")
        + _request("GET", "/_fake/counters")
    )
    (capture, payment, counters) = answers.read(3)
    assert capture[0] == 200 and json.loads(capture[2])["status"] == "captured"
    # Answered after the capture it queued behind, so it sees the payment captured.
    assert payment[0] == 200 and json.loads(payment[2])["status"] == "captured"
    assert json.loads(counters[2])["captures"] == {payment_id: 1}


def test_other_methods_head_and_unknown_urls_are_answered_like_the_app(
    server: GatewayServer, authorized_order: AuthorizedOrder
) -> None:
    order, payment_id = authorized_order()
    auth = (KEYS.key_id, KEYS.key_secret)
    for method, path in (
        ("GET", "/v1/orders"),
        ("POST", f"/v1/payments/{payment_id}"),
        ("GET", f"/v1/payments/{payment_id}/capture"),
    ):
        response = httpx.request(method, f"{server.url}{path}", auth=auth)
        assert response.status_code == 405, (method, path)
        assert response.json()["error"]["code"] == "BAD_REQUEST_ERROR"
    head = httpx.head(f"{server.url}/v1/orders/{order['id']}", auth=auth)
    got = httpx.get(f"{server.url}/v1/orders/{order['id']}", auth=auth)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content))
    # An escaped slash is a slash: not a payment id.
    escaped = httpx.get(f"{server.url}/v1/payments/pay%2Fx", auth=auth)
    assert escaped.status_code == 400
    assert (
        escaped.json()["error"]["description"] == "The requested URL was not found on the server."
    )
    assert httpx.post(f"{server.url}/v1/payments/{payment_id}/capture").status_code == 401


def test_a_closing_request_gets_its_answer_then_the_connection_closes(
    raw: tuple[socket.socket, _Answers], authorized_order: AuthorizedOrder
) -> None:
    sock, answers = raw
    _, payment_id = authorized_order()
    sock.sendall(_request("GET", f"/v1/payments/{payment_id}", b"", "Connection: close"))
    ((status, headers, _),) = answers.read(1)
    assert status == 200 and headers[b"connection"] == b"close"
    assert sock.recv(1) == b""


def test_a_malformed_request_gets_a_400_and_the_connection_closes(
    raw: tuple[socket.socket, _Answers],
) -> None:
    sock, answers = raw
    sock.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
    ((status, headers, body),) = answers.read(1)
    assert (status, body) == (400, b"Invalid HTTP request received.")
    assert headers[b"connection"] == b"close"
    assert sock.recv(1) == b""


def test_a_failing_after_capture_hook_is_a_500_and_the_server_goes_on(
    server: GatewayServer, client: Any, fake: FakeRazorpay, authorized_order: AuthorizedOrder
) -> None:
    _, payment_id = authorized_order()

    def broken(captured: str) -> None:
        raise RuntimeError(f"hook failed after capturing {captured}")

    fake.add_after_capture(broken)
    response = httpx.post(
        f"{server.url}/v1/payments/{payment_id}/capture",
        json={"amount": 50000, "currency": "INR"},
        auth=(KEYS.key_id, KEYS.key_secret),
    )
    assert (response.status_code, response.text) == (500, "Internal Server Error")
    fake.remove_after_capture(broken)
    assert fake.counters()["accepted"] == {payment_id: 1}
    assert client.payment.fetch(payment_id)["status"] == "captured"
