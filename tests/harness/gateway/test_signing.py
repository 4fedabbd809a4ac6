"""Signing as Razorpay does it, checked with the real SDK's own verification."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from typing import Any

import pytest
import razorpay
from razorpay.errors import SignatureVerificationError

from payrace.harness.gateway.signing import (
    GatewayKeys,
    client_callback,
    new_event_id,
    razorpay_id,
    signed_webhook,
    webhook_event,
)

KEYS = GatewayKeys()
ORDER_ID = re.compile(r"^order_[A-Za-z0-9]{14}$")
PAY_ID = re.compile(r"^pay_[A-Za-z0-9]{14}$")


def sdk() -> Any:
    # Signature checks are local in the SDK: no gateway needed.
    return razorpay.Client(auth=(KEYS.key_id, KEYS.key_secret))


def paid_order(amount: int = 50000) -> tuple[dict[str, Any], dict[str, Any]]:
    """An order and its authorized payment, shaped like the fake gateway's."""
    order = {
        "id": razorpay_id("order_"),
        "entity": "order",
        "amount": amount,
        "amount_paid": 0,
        "amount_due": amount,
        "currency": "INR",
        "receipt": "r-1",
        "status": "attempted",
        "attempts": 1,
        "notes": [],
        "created_at": 1700000000,
    }
    payment: dict[str, Any] = {
        "id": razorpay_id("pay_"),
        "entity": "payment",
        "amount": amount,
        "currency": "INR",
        "status": "authorized",
        "order_id": order["id"],
        "captured": False,
        "method": "upi",
        "error_code": None,
        "error_description": None,
        "error_source": None,
        "error_step": None,
        "error_reason": None,
        "created_at": 1700000000,
    }
    return order, payment


def test_client_callback_signature_verifies_with_the_sdk_and_tampering_fails() -> None:
    client = sdk()
    order, payment = paid_order()
    callback = client_callback(order["id"], payment["id"], KEYS.key_secret)

    assert set(callback) == {"razorpay_order_id", "razorpay_payment_id", "razorpay_signature"}
    assert client.utility.verify_payment_signature(callback) is True
    forged = callback | {"razorpay_payment_id": "pay_00000000000000"}
    with pytest.raises(SignatureVerificationError):
        client.utility.verify_payment_signature(forged)


def test_signed_webhook_verifies_with_the_sdk_and_a_tampered_body_fails() -> None:
    client = sdk()
    _, payment = paid_order()
    event = webhook_event("payment.captured", payment)
    body, headers = signed_webhook(event, KEYS.webhook_secret, event_id="evt00000000001")

    assert headers["Content-Type"] == "application/json"
    assert headers["X-Razorpay-Event-Id"] == "evt00000000001"
    assert json.loads(body) == event
    signature = headers["X-Razorpay-Signature"]
    assert client.utility.verify_webhook_signature(body.decode(), signature, KEYS.webhook_secret)
    tampered = body.replace(b'"amount":50000', b'"amount":5000000')
    assert tampered != body
    with pytest.raises(SignatureVerificationError):
        client.utility.verify_webhook_signature(tampered.decode(), signature, KEYS.webhook_secret)


def test_event_ids_are_fresh_by_default() -> None:
    _, first = signed_webhook({"event": "x"}, "s")
    _, second = signed_webhook({"event": "x"}, "s")

    assert first["X-Razorpay-Event-Id"] != second["X-Razorpay-Event-Id"]
    assert re.fullmatch(r"[A-Za-z0-9]{14}", new_event_id())


@pytest.mark.parametrize(
    ("event", "status", "captured"),
    [
        ("payment.authorized", "authorized", False),
        ("payment.captured", "captured", True),
        ("payment.failed", "failed", False),
        ("order.paid", "captured", True),
    ],
)
def test_webhook_envelope_matches_razorpays(event: str, status: str, captured: bool) -> None:
    order, payment = paid_order()
    envelope = webhook_event(event, payment, order=order, created_at=1700000000)

    assert set(envelope) == {"entity", "account_id", "event", "contains", "payload", "created_at"}
    assert envelope["entity"] == "event"
    assert (envelope["account_id"], envelope["event"]) == (KEYS.account_id, event)
    assert envelope["created_at"] == 1700000000
    entity = envelope["payload"]["payment"]["entity"]
    assert PAY_ID.match(entity["id"])
    assert ORDER_ID.match(entity["order_id"])
    assert (entity["entity"], entity["amount"], entity["currency"]) == ("payment", 50000, "INR")
    assert (entity["status"], entity["captured"]) == (status, captured)
    failure = [entity[f"error_{k}"] for k in ("code", "description", "source", "step", "reason")]
    assert all(failure) if event == "payment.failed" else not any(failure)
    if event == "order.paid":
        assert envelope["contains"] == ["payment", "order"]
        paid = envelope["payload"]["order"]["entity"]
        assert (paid["id"], paid["status"]) == (order["id"], "paid")
        assert (paid["amount_paid"], paid["amount_due"], paid["attempts"]) == (50000, 0, 1)
    else:
        assert envelope["contains"] == ["payment"]
        assert set(envelope["payload"]) == {"payment"}
    assert payment["status"] == "authorized", "the caller's payment must not be mutated"


def test_order_paid_without_an_order_is_derived_from_the_payment() -> None:
    order, payment = paid_order()
    envelope = webhook_event("order.paid", payment)

    paid = envelope["payload"]["order"]["entity"]
    assert (paid["id"], paid["amount_paid"], paid["amount_due"]) == (order["id"], 50000, 0)
    with pytest.raises(ValueError, match="unsupported event"):
        webhook_event("refund.created", payment)


def test_ids_are_razorpay_shaped_distinct_and_draw_every_character_evenly() -> None:
    ids = [razorpay_id("pay_") for _ in range(20_000)]
    assert all(re.fullmatch(r"pay_[A-Za-z0-9]{14}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    drawn = Counter("".join(i[4:] for i in ids))
    expected = 20_000 * 14 / 62  # about 4,500 each; a skewed mapping is off by a quarter
    assert set(drawn) == set(string.ascii_letters + string.digits)
    assert all(0.85 * expected < n < 1.15 * expected for n in drawn.values()), drawn
