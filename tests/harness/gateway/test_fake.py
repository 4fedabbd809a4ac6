"""The fake Razorpay, driven the way the service drives it: the real SDK over real HTTP."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import razorpay
from razorpay.errors import BadRequestError, GatewayError, ServerError

from payrace.harness.gateway.fake import (
    FakeRazorpay,
    GatewayKeys,
    GatewayServer,
)

KEYS = GatewayKeys()
ORDER_ID = re.compile(r"^order_[A-Za-z0-9]{14}$")
PAY_ID = re.compile(r"^pay_[A-Za-z0-9]{14}$")


@pytest.fixture
def fake() -> FakeRazorpay:
    return FakeRazorpay(KEYS, seed=7)


@pytest.fixture
def server(fake: FakeRazorpay) -> Iterator[GatewayServer]:
    with GatewayServer(fake) as running:
        yield running


@pytest.fixture
def client(server: GatewayServer) -> Any:
    return razorpay.Client(auth=(KEYS.key_id, KEYS.key_secret), base_url=server.url)


def _paid_order(client: Any, fake: FakeRazorpay, amount: int = 50000) -> tuple[dict[str, Any], str]:
    order = client.order.create({"amount": amount, "currency": "INR", "receipt": "r-1"})
    return order, fake.authorize_payment(order["id"])["id"]


def test_order_is_created_and_fetched_in_razorpays_shape(client: Any) -> None:
    order = client.order.create({"amount": 50000, "currency": "INR", "receipt": "rcpt-1"})

    assert ORDER_ID.match(order["id"])
    assert order["entity"] == "order"
    assert (order["amount"], order["amount_paid"], order["amount_due"]) == (50000, 0, 50000)
    assert (order["status"], order["attempts"], order["receipt"]) == ("created", 0, "rcpt-1")
    assert client.order.fetch(order["id"]) == order


def test_payment_is_captured_once_and_a_second_capture_is_rejected_and_counted(
    client: Any, fake: FakeRazorpay
) -> None:
    order, payment_id = _paid_order(client, fake)
    assert PAY_ID.match(payment_id)
    assert client.order.fetch(order["id"])["status"] == "attempted"
    assert client.payment.fetch(payment_id)["status"] == "authorized"

    captured = client.payment.capture(payment_id, 50000, {"currency": "INR"})
    assert (captured["status"], captured["captured"]) == ("captured", True)
    assert fake.capture_calls(payment_id) == 1

    with pytest.raises(BadRequestError, match=r"^This payment has already been captured$"):
        client.payment.capture(payment_id, 50000, {"currency": "INR"})
    assert fake.capture_calls(payment_id) == 2
    assert fake.counters()["accepted"] == {payment_id: 1}
    assert fake.counters()["rejected"] == {payment_id: 1}
    paid = client.order.fetch(order["id"])
    assert (paid["status"], paid["amount_paid"], paid["amount_due"]) == ("paid", 50000, 0)


def test_capture_with_another_amount_is_rejected(client: Any, fake: FakeRazorpay) -> None:
    _, payment_id = _paid_order(client, fake)

    with pytest.raises(BadRequestError, match="Capture amount must be equal to the amount"):
        client.payment.capture(payment_id, 49999, {"currency": "INR"})
    assert fake.payment(payment_id)["status"] == "authorized"  # type: ignore[index]


def test_concurrent_captures_of_one_payment_accept_exactly_one(
    server: GatewayServer, fake: FakeRazorpay, client: Any
) -> None:
    # The slow capture keeps all calls in flight together, as the racing service paths would.
    _, payment_id = _paid_order(client, fake)
    fake.set_knobs(capture_latency_s=0.2)
    outcomes: list[str] = []

    def capture() -> None:
        own = razorpay.Client(auth=(KEYS.key_id, KEYS.key_secret), base_url=server.url)
        try:
            own.payment.capture(payment_id, 50000, {"currency": "INR"})
            outcomes.append("ok")
        except BadRequestError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=capture) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes) == ["This payment has already been captured"] * 3 + ["ok"]
    assert fake.counters()["captures"] == {payment_id: 4}
    assert fake.counters()["accepted"] == {payment_id: 1}


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


def test_unknown_ids_are_bad_requests_and_unknown_captures_are_counted(
    client: Any, fake: FakeRazorpay
) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: client.order.fetch("order_00000000000000"),
        lambda: client.payment.fetch("pay_00000000000000"),
        lambda: client.payment.capture("pay_00000000000000", 100, {"currency": "INR"}),
    ]
    for call in calls:
        with pytest.raises(BadRequestError, match=r"^The id provided does not exist$"):
            call()
    assert fake.capture_calls("pay_00000000000000") == 1


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


def test_injected_failures_raise_server_errors_and_are_counted(
    client: Any, fake: FakeRazorpay
) -> None:
    _, payment_id = _paid_order(client, fake)
    fake.set_knobs(fail_rate=1.0)

    for _ in range(3):
        with pytest.raises((ServerError, GatewayError)):
            client.payment.capture(payment_id, 50000, {"currency": "INR"})
    counters = fake.counters()
    assert counters["captures"] == counters["rejected"] == counters["injected"] == {payment_id: 3}
    assert fake.payment(payment_id)["status"] == "authorized"  # type: ignore[index]

    fake.set_knobs(fail_rate=0.0)
    assert client.payment.capture(payment_id, 50000, {"currency": "INR"})["captured"] is True
    assert fake.capture_calls(payment_id) == 4


def test_injected_failures_follow_the_seed(client: Any, fake: FakeRazorpay) -> None:
    def pattern() -> list[bool]:
        fake.set_knobs(fail_rate=0.5)
        failed = []
        for _ in range(24):
            try:
                client.payment.capture("pay_00000000000000", 100, {"currency": "INR"})
            except ServerError:
                failed.append(True)
            except BadRequestError:
                failed.append(False)
        return failed

    first = pattern()
    fake.reset()
    assert pattern() == first
    assert 0 < sum(first) < len(first)


def test_capture_latency_slows_capture_only_and_latency_slows_every_call(
    client: Any, fake: FakeRazorpay
) -> None:
    order, payment_id = _paid_order(client, fake)
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
    assert knobs == fake.knobs() == {"latency_s": 0.0, "capture_latency_s": 0.0, "fail_rate": 0.25}
    assert httpx.post(f"{server.url}/_fake/knobs", json={"fail_rate": 2}).status_code == 400
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
