"""service/gateway_client.py: the real razorpay SDK against the fake gateway, off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.signing import GatewayKeys
from payrace.service.gateway_client import CaptureOutcome, GatewayClient, GatewayError
from payrace.service.instrument import timing

KEYS = GatewayKeys()


@pytest.fixture
async def gateway(gateway_url: str) -> AsyncIterator[GatewayClient]:
    client = GatewayClient(KEYS.key_id, KEYS.key_secret, gateway_url + "/", threads=4)
    try:
        yield client
    finally:
        client.close()


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


async def test_an_unreachable_gateway_raises_an_unavailable_gateway_error() -> None:
    client = GatewayClient(KEYS.key_id, KEYS.key_secret, "http://127.0.0.1:1", threads=1)
    try:
        with pytest.raises(GatewayError, match="gateway unavailable: ConnectionError") as raised:
            await client.create_order(50000, "INR", "rcpt_nowhere")
    finally:
        client.close()

    assert raised.value.refused is False


async def test_an_unavailable_gateway_error_does_not_say_where_the_gateway_lives() -> None:
    """The message becomes a 502 body: it names what failed, not the internal host:port."""
    client = GatewayClient(KEYS.key_id, KEYS.key_secret, "http://127.0.0.1:9", threads=1)
    try:
        with pytest.raises(GatewayError) as raised:
            await client.capture("pay_nowhere12345678", 50000, "INR")
    finally:
        client.close()
    said = str(raised.value)
    assert said.startswith("gateway unavailable: ConnectionError")
    assert "127.0.0.1" not in said and "port=9" not in said and ":9/" not in said


async def test_wrong_keys_are_refused(gateway_url: str) -> None:
    client = GatewayClient(KEYS.key_id, "not-the-secret", gateway_url, threads=1)
    try:
        with pytest.raises(GatewayError, match="Authentication failed"):
            await client.create_order(50000, "INR", "rcpt_bad_keys")
    finally:
        client.close()


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

    from payrace.service.gateway_client import GatewayClient

    gateway = GatewayClient("rzp_test_x", "secret", "http://127.0.0.1:9")
    try:
        headers = gateway._client()._update_user_agent_header({})["headers"]
    finally:
        gateway.close()
    assert headers["User-Agent"].startswith(f"Razorpay-Python/{version('razorpay')} ")
