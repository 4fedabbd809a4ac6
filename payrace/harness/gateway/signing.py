"""What Razorpay signs, and how: the customer's callback fields and webhook deliveries.

    GatewayKeys        key id + secret (HTTP basic auth), webhook secret, account id
    client_callback()  the fields Razorpay Checkout hands the browser after a payment
    webhook_event()    Razorpay's webhook envelope (payment.authorized|captured|failed, order.paid)
    signed_webhook()   raw body + headers exactly as Razorpay delivers a webhook
    new_event_id()     an X-Razorpay-Event-Id
    razorpay_id()      an id in Razorpay's shape (prefix + 14 characters)

Kept apart from the fake gateway's server so that the Locust workers (gevent, no asyncio)
can sign requests without importing uvicorn and Starlette.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any

_ALNUM = string.ascii_letters + string.digits
EVENTS = ("payment.authorized", "payment.captured", "payment.failed", "order.paid")


@dataclass(frozen=True)
class GatewayKeys:
    key_id: str = "rzp_test_payrace00000001"
    key_secret: str = "payrace_key_secret"
    webhook_secret: str = "payrace_webhook_secret"
    account_id: str = "acc_payrace0000001"


# Random bytes to id characters: 248 = 4 x 62 byte values map to each character 4 times, the
# 8 left over are dropped, so every character is as likely as with secrets.choice, at a
# twentieth of its cost (an order and a payment for every capture the bench makes).
_TO_ALNUM = (_ALNUM * 4).encode() + bytes(8)
_LEFT_OVER = bytes(range(248, 256))


def razorpay_id(prefix: str) -> str:
    # Not the seeded rng: two fakes in one run must never hand the same id to a database that
    # keeps gateway ids unique.
    kept = secrets.token_bytes(20).translate(_TO_ALNUM, _LEFT_OVER)
    while len(kept) < 14:
        kept += secrets.token_bytes(8).translate(_TO_ALNUM, _LEFT_OVER)
    return prefix + kept[:14].decode()


def new_event_id() -> str:
    return razorpay_id("")


def hmac_hex(message: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def client_callback(order_id: str, payment_id: str, key_secret: str) -> dict[str, str]:
    """What Razorpay Checkout's handler receives and the browser posts to the merchant."""
    return {
        "razorpay_order_id": order_id,
        "razorpay_payment_id": payment_id,
        "razorpay_signature": hmac_hex(f"{order_id}|{payment_id}".encode(), key_secret),
    }


def webhook_event(
    event: str,
    payment: dict[str, Any],
    *,
    order: dict[str, Any] | None = None,
    account_id: str = GatewayKeys.account_id,
    created_at: int | None = None,
) -> dict[str, Any]:
    """Razorpay's envelope for `event`, the payment's status and flags made consistent with it."""
    if event not in EVENTS:
        raise ValueError(f"unsupported event {event!r}; expected one of {EVENTS}")
    entity = copy.deepcopy(payment)
    if event == "payment.authorized":
        entity.update(status="authorized", captured=False)
    elif event == "payment.failed":
        entity.update(status="failed", captured=False)
        failure = {
            "error_code": "BAD_REQUEST_ERROR",
            "error_description": "Payment failed",
            "error_source": "gateway",
            "error_step": "payment_authorization",
            "error_reason": "payment_failed",
        }
        for key, value in failure.items():
            if entity.get(key) is None:
                entity[key] = value
    else:  # payment.captured and order.paid both describe a captured payment
        entity.update(status="captured", captured=True)
    envelope: dict[str, Any] = {
        "entity": "event",
        "account_id": account_id,
        "event": event,
        "contains": ["payment"],
        "payload": {"payment": {"entity": entity}},
        "created_at": int(time.time()) if created_at is None else created_at,
    }
    if event == "order.paid":
        paid = copy.deepcopy(order) if order is not None else _order_of(entity)
        paid.update(
            status="paid",
            amount_paid=paid["amount"],
            amount_due=0,
            attempts=max(int(paid.get("attempts") or 0), 1),
        )
        envelope["contains"] = ["payment", "order"]
        envelope["payload"]["order"] = {"entity": paid}
    return envelope


def _order_of(payment: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": payment["order_id"],
        "entity": "order",
        "amount": payment["amount"],
        "currency": payment["currency"],
        "receipt": None,
        "offer_id": None,
        "notes": [],
        "created_at": payment.get("created_at", int(time.time())),
    }


def signed_webhook(
    event: dict[str, Any], webhook_secret: str, *, event_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """The body is signed as sent; receivers must verify these exact bytes, not a re-encoding."""
    body = json.dumps(event, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Razorpay-Signature": hmac_hex(body, webhook_secret),
        "X-Razorpay-Event-Id": event_id if event_id is not None else new_event_id(),
    }
    return body, headers
