"""Fixtures of the fake gateway's tests: a seeded fake, served, and the real SDK pointed at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import razorpay

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys

KEYS = GatewayKeys()


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


@pytest.fixture
def authorized_order(client: Any, fake: FakeRazorpay) -> Callable[[], tuple[dict[str, Any], str]]:
    """An order created through the SDK and a payment authorized for it: (order, payment id)."""

    def create() -> tuple[dict[str, Any], str]:
        order = client.order.create({"amount": 50000, "currency": "INR", "receipt": "r-1"})
        return order, fake.authorize_payment(order["id"])["id"]

    return create
