"""HTTP calls to an in-process reference service, shared by the tests of service/app.py and
service/instrument/middleware.py: create an order, let the customer pay at the fake gateway,
send Checkout's callback or a signed webhook, and read an error answer."""

from __future__ import annotations

from typing import Any

import httpx
from conftest import Service

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.signing import (
    GatewayKeys,
    client_callback,
    signed_webhook,
    webhook_event,
)

KEYS = GatewayKeys()


async def create_order(svc: Service, amount: int = 50000) -> dict[str, Any]:
    response = await svc.client.post("/orders", json={"amount": amount, "currency": "INR"})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def customer_pays(
    svc: Service, fake: FakeRazorpay, amount: int = 50000
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An order here and at the gateway, and the customer's authorized payment."""
    order = await create_order(svc, amount)
    return order, fake.authorize_payment(order["gateway_order_id"])


async def verify(
    svc: Service,
    order: dict[str, Any],
    payment: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    **overrides: Any,
) -> httpx.Response:
    body: dict[str, Any] = client_callback(
        order["gateway_order_id"], payment["id"], KEYS.key_secret
    )
    body["internal_payment_id"] = order["payment_id"]
    body.update(overrides)
    return await svc.client.post("/payments/verify", json=body, headers=headers)


async def deliver(
    svc: Service,
    event: str,
    payment: dict[str, Any],
    *,
    event_id: str | None = None,
    **entity_overrides: Any,
) -> httpx.Response:
    envelope = webhook_event(event, payment)
    envelope["payload"]["payment"]["entity"].update(entity_overrides)
    body, headers = signed_webhook(envelope, KEYS.webhook_secret, event_id=event_id)
    return await svc.client.post("/webhooks/razorpay", content=body, headers=headers)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    return error
