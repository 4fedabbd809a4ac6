"""service/app.py over HTTP (ASGI): both callback paths, signatures, idempotency, errors.

Every request goes through the real app, the real gateway client (the lean one by default; the
razorpay SDK too where a test names both) and real PostgreSQL; the fake gateway is the only
stand-in. Assertions are scoped to the test's own order and payment: the
database is shared with the rest of the suite.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import Service, service_settings
from hypothesis import given, settings
from hypothesis import strategies as st
from service_calls import KEYS, assert_error, create_order, customer_pays, deliver, verify
from sqlalchemy import text

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.signing import (
    client_callback,
    signed_webhook,
    webhook_event,
)
from payrace.harness.infra.provider import Database
from payrace.service.app import KNOWN_EVENTS, _parse_envelope
from payrace.service.errors import Rejected
from payrace.service.gateway_client import LeanGatewayClient, SdkGatewayClient

# -- helpers ----------------------------------------------------------------------------------


async def rows(svc: Service, payment_id: int) -> dict[str, Any]:
    """What the database holds for one payment: its row, invoice, order and webhook events."""
    async with svc.runtime.engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT p.status, p.gateway_payment_id, p.captured_at, p.error_code,"
                    " i.status, i.amount_paid, o.status,"
                    " (SELECT count(*) FROM webhook_events w WHERE w.payment_id = p.id)"
                    " FROM payments p JOIN orders o ON o.id = p.order_id"
                    " JOIN invoices i ON i.payment_id = p.id WHERE p.id = :id"
                ),
                {"id": payment_id},
            )
        ).one()
    keys: tuple[str, ...] = ("status", "gateway_payment_id", "captured_at", "error_code")
    keys += ("invoice", "amount_paid", "order", "events")
    return dict(zip(keys, row, strict=True))


async def assert_nothing_written(
    svc: Service, fake: FakeRazorpay, order: dict[str, Any], payment: dict[str, Any]
) -> None:
    state = await rows(svc, order["payment_id"])
    assert state == {
        "status": "pending",
        "gateway_payment_id": None,
        "captured_at": None,
        "error_code": None,
        "invoice": "issued",
        "amount_paid": 0,
        "order": "created",
        "events": 0,
    }
    assert fake.capture_calls(payment["id"]) == 0


# -- POST /orders, GET /payments/{id}, /healthz -------------------------------------------------


async def test_create_order_writes_order_payment_and_issued_invoice(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order = await create_order(service, 12345)

    assert order["amount"] == 12345
    assert order["currency"] == "INR"
    assert order["gateway_order_id"].startswith("order_")
    assert fake_gateway.order(order["gateway_order_id"])["amount"] == 12345  # type: ignore[index]
    state = await rows(service, order["payment_id"])
    assert (state["status"], state["invoice"], state["order"]) == ("pending", "issued", "created")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"amount": -5, "currency": "INR"}, "amount"),
        ({"amount": 0, "currency": "INR"}, "amount"),
        ({"amount": 99, "currency": "INR"}, "amount"),  # below Razorpay's minimum of 100
        ({"amount": "lots", "currency": "INR"}, "amount"),
        ({"amount": 50000, "currency": "inr"}, "currency"),
        ({"amount": 50000, "currency": "RUPEES"}, "currency"),
        ({"amount": 50000, "currency": "INR", "tip": 5}, "tip"),
        ({"currency": "INR"}, "amount"),
    ],
)
async def test_create_order_rejects_bad_fields_with_422_naming_the_field(
    service: Service, body: dict[str, Any], field: str
) -> None:
    async with service.runtime.engine.connect() as conn:
        before = (await conn.execute(text("SELECT count(*) FROM orders"))).scalar_one()

    error = assert_error(await service.client.post("/orders", json=body), 422, "invalid_request")

    assert [f["field"] for f in error["fields"]] == [field]
    assert field in error["message"]
    async with service.runtime.engine.connect() as conn:
        after = (await conn.execute(text("SELECT count(*) FROM orders"))).scalar_one()
    assert after == before


async def test_create_order_with_a_body_that_is_not_json_is_422(service: Service) -> None:
    response = await service.client.post(
        "/orders", content=b"{amount: 5", headers={"content-type": "application/json"}
    )
    error = assert_error(response, 422, "invalid_request")
    assert error["message"].startswith("body: JSON decode error")


async def test_create_order_when_the_gateway_is_unreachable_is_502(pg: Database) -> None:
    # Port 1 on loopback refuses connections: the SDK's request fails at once.
    async with Service(service_settings(pg, "http://127.0.0.1:1")) as svc:
        response = await svc.client.post("/orders", json={"amount": 50000, "currency": "INR"})
    assert_error(response, 502, "gateway_error")
    # Issue 11, finding 10: the answer never says where the gateway lives inside.
    assert "127.0.0.1" not in response.text and ":1" not in response.text, response.text


async def test_get_payment_reports_pending_then_captured(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway, 70000)
    before = await service.client.get(f"/payments/{order['payment_id']}")
    assert before.status_code == 200
    assert before.json() == {
        "payment_id": order["payment_id"],
        "status": "pending",
        "amount": 70000,
        "currency": "INR",
        "gateway_order_id": order["gateway_order_id"],
        "gateway_payment_id": None,
        "order_status": "created",
        "invoice_status": "issued",
        "captured_at": None,
    }

    assert (await verify(service, order, payment)).status_code == 200
    after = (await service.client.get(f"/payments/{order['payment_id']}")).json()

    assert (after["status"], after["gateway_payment_id"]) == ("captured", payment["id"])
    assert (after["order_status"], after["invoice_status"]) == ("paid", "paid")
    assert after["captured_at"] is not None


async def test_get_payment_of_an_unknown_id_is_404(service: Service) -> None:
    assert_error(await service.client.get("/payments/987654321987"), 404, "not_found")


@pytest.mark.parametrize("payment_id", ["abc", "1.5", "-1", "0", str(2**63), str(10**30)])
async def test_get_payment_with_an_impossible_id_is_422_not_500(
    service: Service, payment_id: str
) -> None:
    error = assert_error(
        await service.client.get(f"/payments/{payment_id}"), 422, "invalid_request"
    )
    assert error["fields"][0]["field"] == "payment_id"


async def test_healthz_answers_with_strategy_and_isolation(
    service: Service, naive_service: Service
) -> None:
    fixed = await service.client.get("/healthz")
    naive = await naive_service.client.get("/healthz")

    assert fixed.status_code == naive.status_code == 200
    assert fixed.json() == {
        "status": "ok",
        "strategy": "for_update",
        "isolation_level": "READ COMMITTED",
    }
    assert naive.json()["strategy"] == "naive"
    assert "server-timing" not in fixed.headers  # not a capture-path response
    assert int(fixed.headers["x-payrace-received-at"]) > 0


async def test_unknown_route_and_wrong_method_answer_in_the_error_shape(service: Service) -> None:
    assert_error(await service.client.get("/nope"), 404, "not_found")
    assert_error(await service.client.get("/orders"), 405, "method_not_allowed")
    assert_error(await service.client.delete("/payments/1"), 405, "method_not_allowed")


# -- POST /payments/verify ----------------------------------------------------------------------


async def test_verify_captures_once_at_the_gateway_and_marks_everything_paid(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    response = await verify(service, order, payment)

    assert response.status_code == 200, response.text
    assert response.json() == {
        "payment_id": order["payment_id"],
        "status": "captured",
        "gateway_payment_id": payment["id"],
        "idempotent": False,
        "duplicate_event": False,
        "invoice_status": "paid",
        "order_status": "paid",
    }
    state = await rows(service, order["payment_id"])
    assert (state["status"], state["invoice"], state["order"]) == ("captured", "paid", "paid")
    assert state["amount_paid"] == 50000
    assert fake_gateway.capture_calls(payment["id"]) == 1
    assert fake_gateway.payment(payment["id"])["status"] == "captured"  # type: ignore[index]


async def test_second_verify_is_idempotent_and_does_not_call_the_gateway_again(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    first = await verify(service, order, payment)
    captured_at = (await rows(service, order["payment_id"]))["captured_at"]

    second = await verify(service, order, payment)

    assert first.json()["idempotent"] is False
    assert second.status_code == 200
    assert second.json()["idempotent"] is True
    assert second.json()["status"] == "captured"
    assert fake_gateway.capture_calls(payment["id"]) == 1
    assert (await rows(service, order["payment_id"]))["captured_at"] == captured_at


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("0" * 64, id="wrong"),
        pytest.param("é" * 64, id="non-ascii"),
    ],
)
async def test_verify_with_a_bad_signature_is_400_and_writes_nothing(
    service: Service, fake_gateway: FakeRazorpay, signature: str | None
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    body = client_callback(order["gateway_order_id"], payment["id"], KEYS.key_secret)
    body["internal_payment_id"] = order["payment_id"]
    if signature is None:
        del body["razorpay_signature"]
    else:
        body["razorpay_signature"] = signature

    response = await service.client.post("/payments/verify", json=body)

    assert_error(response, 400, "invalid_signature")
    await assert_nothing_written(service, fake_gateway, order, payment)


async def test_verify_signed_with_another_secret_or_for_another_payment_is_400(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    foreign = client_callback(order["gateway_order_id"], payment["id"], "not-our-secret")
    other = client_callback(order["gateway_order_id"], "pay_SomeoneElse123", KEYS.key_secret)

    for signature in (foreign["razorpay_signature"], other["razorpay_signature"]):
        response = await verify(service, order, payment, razorpay_signature=signature)
        assert_error(response, 400, "invalid_signature")

    await assert_nothing_written(service, fake_gateway, order, payment)


async def test_verify_of_an_unknown_internal_payment_is_404_and_calls_no_gateway(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    response = await verify(service, order, payment, internal_payment_id=2**62)

    assert_error(response, 404, "not_found")
    await assert_nothing_written(service, fake_gateway, order, payment)


async def test_verify_of_a_signed_order_that_is_not_this_payments_order_is_400(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    other_order, other_payment = await customer_pays(service, fake_gateway)

    # A genuine callback for the other order, aimed at this order's internal payment.
    response = await verify(
        service, other_order, other_payment, internal_payment_id=order["payment_id"]
    )

    assert_error(response, 400, "order_mismatch")
    await assert_nothing_written(service, fake_gateway, order, payment)
    await assert_nothing_written(service, fake_gateway, other_order, other_payment)


@pytest.mark.parametrize(
    ("drop", "field"),
    [
        ("internal_payment_id", "internal_payment_id"),
        ("razorpay_order_id", "razorpay_order_id"),
        ("razorpay_payment_id", "razorpay_payment_id"),
    ],
)
async def test_verify_missing_a_field_is_422_naming_it(
    service: Service, fake_gateway: FakeRazorpay, drop: str, field: str
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    body = client_callback(order["gateway_order_id"], payment["id"], KEYS.key_secret)
    body["internal_payment_id"] = order["payment_id"]
    del body[drop]

    error = assert_error(
        await service.client.post("/payments/verify", json=body), 422, "invalid_request"
    )

    assert field in error["message"]
    await assert_nothing_written(service, fake_gateway, order, payment)


async def test_gateway_failure_on_verify_is_502_writes_nothing_and_a_retry_captures(
    service: Service, knobs: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, knobs)
    knobs.set_knobs(fail_rate=1.0)

    failed = await verify(service, order, payment)

    assert_error(failed, 502, "gateway_error")
    state = await rows(service, order["payment_id"])
    assert (state["status"], state["invoice"], state["order"]) == ("pending", "issued", "created")
    assert knobs.counters()["accepted"].get(payment["id"], 0) == 0

    knobs.set_knobs(fail_rate=0.0)
    retried = await verify(service, order, payment)

    assert retried.status_code == 200
    assert retried.json()["idempotent"] is False
    assert (await rows(service, order["payment_id"]))["status"] == "captured"
    assert knobs.counters()["accepted"][payment["id"]] == 1


# -- POST /webhooks/razorpay ----------------------------------------------------------------------


async def test_payment_authorized_webhook_captures_at_the_gateway(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    response = await deliver(service, "payment.authorized", payment)

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["event"], body["status"], body["idempotent"]) == (
        "payment.authorized",
        "captured",
        False,
    )
    assert fake_gateway.capture_calls(payment["id"]) == 1
    state = await rows(service, order["payment_id"])
    assert (state["status"], state["invoice"], state["order"]) == ("captured", "paid", "paid")
    assert state["events"] == 1


async def test_payment_captured_webhook_records_the_capture_without_calling_the_gateway(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    response = await deliver(service, "payment.captured", payment)

    assert response.status_code == 200
    assert response.json()["status"] == "captured"
    state = await rows(service, order["payment_id"])
    assert (state["status"], state["gateway_payment_id"]) == ("captured", payment["id"])
    assert (state["invoice"], state["order"]) == ("paid", "paid")
    assert fake_gateway.capture_calls(payment["id"]) == 0


async def test_order_paid_webhook_captures(service: Service, fake_gateway: FakeRazorpay) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    response = await deliver(service, "order.paid", payment)

    assert response.status_code == 200
    assert (response.json()["event"], response.json()["status"]) == ("order.paid", "captured")
    state = await rows(service, order["payment_id"])
    assert (state["status"], state["invoice"], state["order"]) == ("captured", "paid", "paid")


async def test_same_event_id_delivered_twice_is_reported_as_duplicate(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    first = await deliver(service, "payment.authorized", payment, event_id="evt_dup_0001")
    second = await deliver(service, "payment.authorized", payment, event_id="evt_dup_0001")

    assert (first.json()["duplicate_event"], second.json()["duplicate_event"]) == (False, True)
    assert second.json()["idempotent"] is True
    assert fake_gateway.capture_calls(payment["id"]) == 1
    assert (await rows(service, order["payment_id"]))["events"] == 1


async def test_redelivery_with_a_new_event_id_after_capture_is_idempotent(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    assert (await verify(service, order, payment)).status_code == 200

    again = await deliver(service, "payment.captured", payment)

    assert again.status_code == 200
    assert (again.json()["idempotent"], again.json()["duplicate_event"]) == (True, False)
    assert (await rows(service, order["payment_id"]))["events"] == 1
    assert fake_gateway.capture_calls(payment["id"]) == 1


async def test_verify_after_an_authorized_webhook_captured_is_idempotent(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    assert (await deliver(service, "payment.authorized", payment)).status_code == 200

    response = await verify(service, order, payment)

    assert response.json()["idempotent"] is True
    assert fake_gateway.capture_calls(payment["id"]) == 1


def _bad_signature_headers(kind: str, good: dict[str, str]) -> list[tuple[bytes, bytes]]:
    headers = {k.lower(): v.encode() for k, v in good.items()}
    if kind == "missing":
        del headers["x-razorpay-signature"]
    elif kind == "empty":
        headers["x-razorpay-signature"] = b""
    elif kind == "wrong":
        headers["x-razorpay-signature"] = b"f" * 64
    elif kind == "non-ascii":
        # Raw bytes on the wire: the server decodes them as latin-1, the SDK gets non-ASCII.
        headers["x-razorpay-signature"] = ("é" * 32).encode()
    return [(k.encode(), v) for k, v in headers.items()]


@pytest.mark.parametrize("kind", ["missing", "empty", "wrong", "non-ascii"])
async def test_webhook_with_a_bad_signature_is_400_and_writes_nothing(
    service: Service, fake_gateway: FakeRazorpay, kind: str
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    body, good = signed_webhook(webhook_event("payment.authorized", payment), KEYS.webhook_secret)

    response = await service.client.post(
        "/webhooks/razorpay", content=body, headers=_bad_signature_headers(kind, good)
    )

    assert_error(response, 400, "invalid_signature")
    await assert_nothing_written(service, fake_gateway, order, payment)


async def test_webhook_whose_body_was_changed_after_signing_is_400(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    body, headers = signed_webhook(webhook_event("payment.captured", payment), KEYS.webhook_secret)
    # Same JSON, re-encoded with spaces: the signature covers the raw bytes, not the meaning.
    reencoded = json.dumps(json.loads(body)).encode()

    response = await service.client.post("/webhooks/razorpay", content=reencoded, headers=headers)

    assert_error(response, 400, "invalid_signature")
    await assert_nothing_written(service, fake_gateway, order, payment)


async def test_webhook_for_an_unknown_order_is_404(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    response = await deliver(service, "payment.captured", payment, order_id="order_NotOurs1234567")

    assert_error(response, 404, "unknown_order")
    await assert_nothing_written(service, fake_gateway, order, payment)


@pytest.mark.parametrize(
    ("event", "change", "code"),
    [
        ("payment.captured", {"amount": 49999}, "amount_mismatch"),
        ("payment.authorized", {"amount": 50001}, "amount_mismatch"),
        ("order.paid", {"amount": 1}, "amount_mismatch"),
        ("payment.failed", {"amount": 100}, "amount_mismatch"),
        ("payment.captured", {"currency": "USD"}, "currency_mismatch"),
    ],
)
async def test_webhook_whose_amount_or_currency_differs_from_the_order_is_400_writes_nothing(
    service: Service, fake_gateway: FakeRazorpay, event: str, change: dict[str, Any], code: str
) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    response = await deliver(service, event, payment, **change)

    assert_error(response, 400, code)
    await assert_nothing_written(service, fake_gateway, order, payment)


async def test_unknown_event_types_are_acknowledged_and_ignored(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    envelope = webhook_event("payment.captured", payment)
    envelope["event"] = "refund.processed"
    body, headers = signed_webhook(envelope, KEYS.webhook_secret)

    response = await service.client.post("/webhooks/razorpay", content=body, headers=headers)

    assert response.status_code == 200
    assert response.json() == {"ignored": True, "event": "refund.processed"}
    await assert_nothing_written(service, fake_gateway, order, payment)


def _without(document: dict[str, Any], path: str) -> dict[str, Any]:
    *parents, leaf = path.split(".")
    node = document
    for key in parents:
        node = node[key]
    del node[leaf]
    return document


@pytest.mark.parametrize(
    ("mutate", "named"),
    [
        (lambda d: _without(d, "event"), "'event'"),
        (lambda d: {**d, "event": 7}, "'event'"),
        (lambda d: _without(d, "payload"), "payload.payment.entity"),
        (lambda d: {**d, "payload": []}, "payload.payment.entity"),
        (lambda d: {**d, "payload": {"payment": "pay_x"}}, "payload.payment.entity"),
        (lambda d: {**d, "payload": {"payment": {"entity": 5}}}, "payload.payment.entity"),
        (lambda d: _without(d, "payload.payment.entity.id"), "payload.payment.entity.id"),
        (
            lambda d: _without(d, "payload.payment.entity.order_id"),
            "payload.payment.entity.order_id",
        ),
        (lambda d: _without(d, "payload.payment.entity.amount"), "payload.payment.entity.amount"),
        (
            lambda d: _without(d, "payload.payment.entity.currency"),
            "payload.payment.entity.currency",
        ),
    ],
)
async def test_webhook_missing_a_field_is_400_naming_the_field(
    service: Service, fake_gateway: FakeRazorpay, mutate: Any, named: str
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    body, headers = signed_webhook(
        mutate(webhook_event("payment.captured", payment)), KEYS.webhook_secret
    )

    response = await service.client.post("/webhooks/razorpay", content=body, headers=headers)

    error = assert_error(response, 400, "invalid_body")
    assert named in error["message"]
    await assert_nothing_written(service, fake_gateway, order, payment)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("amount", "50000"),
        ("amount", True),
        ("amount", 500.0),
        ("id", 12),
        ("order_id", None),
        ("currency", ["INR"]),
    ],
)
async def test_webhook_with_a_field_of_the_wrong_type_is_400_naming_it(
    service: Service, fake_gateway: FakeRazorpay, field: str, value: Any
) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    response = await deliver(service, "payment.captured", payment, **{field: value})

    error = assert_error(response, 400, "invalid_body")
    assert f"payload.payment.entity.{field}" in error["message"]
    await assert_nothing_written(service, fake_gateway, order, payment)


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"[1, 2]", b'"payment.captured"', '{"event": "é"}'.encode("latin-1")],
    ids=["broken", "empty", "array", "string", "not-utf8"],
)
async def test_webhook_body_that_is_not_a_json_object_is_400(service: Service, raw: bytes) -> None:
    # Signed over the exact bytes, so only the body's shape is wrong.
    signature = hmac.new(KEYS.webhook_secret.encode(), raw, hashlib.sha256).hexdigest()
    response = await service.client.post(
        "/webhooks/razorpay",
        content=raw,
        headers={"X-Razorpay-Signature": signature, "Content-Type": "application/json"},
    )

    assert_error(response, 400, "invalid_body")


@pytest.mark.parametrize(
    ("change", "event_id", "named"),
    [
        ({"id": "pay_" + "x" * 80}, None, "payload.payment.entity.id"),
        ({"id": ""}, None, "payload.payment.entity.id"),
        ({"order_id": "order_" + "x" * 80}, None, "payload.payment.entity.order_id"),
        ({}, "e" * 200, "X-Razorpay-Event-Id"),
        # Empty would dedupe every later empty-id event as a "duplicate" of this one.
        ({}, "", "X-Razorpay-Event-Id"),
    ],
)
async def test_webhook_with_ids_that_do_not_fit_the_schema_is_400_not_500(
    service: Service,
    fake_gateway: FakeRazorpay,
    change: dict[str, str],
    event_id: str | None,
    named: str,
) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    response = await deliver(service, "payment.captured", payment, event_id=event_id, **change)

    assert named in assert_error(response, 400, "invalid_body")["message"]
    await assert_nothing_written(service, fake_gateway, order, payment)


async def test_gateway_failure_on_authorized_webhook_is_502_and_the_redelivery_captures(
    service: Service, knobs: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, knobs)
    knobs.set_knobs(fail_rate=1.0)

    failed = await deliver(service, "payment.authorized", payment, event_id="evt_retry_after_502")

    assert_error(failed, 502, "gateway_error")
    state = await rows(service, order["payment_id"])
    assert (state["status"], state["invoice"], state["order"]) == ("pending", "issued", "created")
    assert state["events"] == 0  # so Razorpay's redelivery of the same id is not a "duplicate"
    assert knobs.counters()["injected"][payment["id"]] == 1

    knobs.set_knobs(fail_rate=0.0)
    redelivered = await deliver(
        service, "payment.authorized", payment, event_id="evt_retry_after_502"
    )

    assert redelivered.status_code == 200
    assert (redelivered.json()["duplicate_event"], redelivered.json()["status"]) == (
        False,
        "captured",
    )
    assert knobs.counters()["accepted"][payment["id"]] == 1


async def test_payment_failed_then_captured_ends_captured(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    failed = await deliver(service, "payment.failed", payment)
    assert failed.status_code == 200
    assert (failed.json()["status"], failed.json()["idempotent"]) == ("failed", False)
    state = await rows(service, order["payment_id"])
    assert (state["status"], state["error_code"], state["invoice"]) == (
        "failed",
        "BAD_REQUEST_ERROR",
        "issued",
    )

    captured = await deliver(service, "payment.captured", payment)

    assert captured.status_code == 200
    assert (captured.json()["status"], captured.json()["idempotent"]) == ("captured", False)
    state = await rows(service, order["payment_id"])
    assert (state["status"], state["invoice"], state["order"]) == ("captured", "paid", "paid")
    assert state["error_code"] is None


async def test_a_retry_with_a_new_payment_after_a_failed_attempt_is_captured(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    # Razorpay: "payment.failed followed by payment.captured ... user-initiated retries": the
    # customer's second attempt on the same order is a new payment id.
    order, first_attempt = await customer_pays(service, fake_gateway)
    assert (await deliver(service, "payment.failed", first_attempt)).status_code == 200
    second_attempt = fake_gateway.authorize_payment(order["gateway_order_id"])

    response = await verify(service, order, second_attempt)

    assert response.status_code == 200, response.text
    assert response.json()["gateway_payment_id"] == second_attempt["id"]
    state = await rows(service, order["payment_id"])
    assert (state["status"], state["gateway_payment_id"]) == ("captured", second_attempt["id"])
    # The first attempt's failure, delivered late, changes nothing and is not an error.
    late = await deliver(service, "payment.failed", first_attempt)
    assert late.status_code == 200
    assert (late.json()["status"], late.json()["idempotent"]) == ("captured", True)


async def test_payment_failed_after_capture_does_not_downgrade(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    assert (await verify(service, order, payment)).status_code == 200

    response = await deliver(service, "payment.failed", payment)

    assert response.status_code == 200
    assert (response.json()["status"], response.json()["idempotent"]) == ("captured", True)
    state = await rows(service, order["payment_id"])
    assert (state["status"], state["invoice"], state["order"]) == ("captured", "paid", "paid")
    assert state["captured_at"] is not None
    assert state["error_code"] is None


async def test_a_second_payment_captured_for_an_already_paid_order_is_rejected(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    assert (await deliver(service, "payment.captured", payment)).status_code == 200
    stray = {**payment, "id": "pay_StrayCapture0001"}

    response = await deliver(service, "payment.captured", stray)

    assert_error(response, 400, "payment_mismatch")
    assert (await rows(service, order["payment_id"]))["gateway_payment_id"] == payment["id"]


@pytest.mark.parametrize(
    ("event", "field", "value"),
    [
        ("payment.captured", "method", "x" * 33),
        ("payment.captured", "method", 7),
        ("payment.failed", "error_code", "E" * 65),
        ("payment.failed", "error_code", {"code": "BAD"}),
        ("payment.captured", "id", "pay_\x00abc"),
        ("payment.captured", "currency", "IN\x00"),
    ],
    ids=["long-method", "int-method", "long-error", "dict-error", "nul-id", "nul-currency"],
)
async def test_signed_webhook_with_a_field_that_cannot_be_stored_is_400_not_500(
    service: Service, fake_gateway: FakeRazorpay, event: str, field: str, value: Any
) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    response = await deliver(service, event, payment, **{field: value})

    error = assert_error(response, 400, "invalid_body")
    assert f"payload.payment.entity.{field}" in error["message"]
    await assert_nothing_written(service, fake_gateway, order, payment)


async def test_signed_webhook_with_a_nul_in_its_event_id_is_400(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    envelope = webhook_event("payment.captured", payment)
    body, headers = signed_webhook(envelope, KEYS.webhook_secret, event_id="evt_\x00")

    response = await service.client.post("/webhooks/razorpay", content=body, headers=headers)

    assert_error(response, 400, "invalid_body")
    await assert_nothing_written(service, fake_gateway, order, payment)


async def test_a_gateway_payment_id_already_bound_to_another_payment_is_400(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    _, first_payment = await customer_pays(service, fake_gateway)
    assert (await deliver(service, "payment.captured", first_payment)).status_code == 200
    order, payment = await customer_pays(service, fake_gateway)

    # Signed and well formed, but it names the first payment's pay_ id for the second order.
    response = await deliver(service, "payment.captured", payment, id=first_payment["id"])

    assert_error(response, 400, "payment_mismatch")
    await assert_nothing_written(service, fake_gateway, order, payment)


# -- hostile input: surrogates, nesting, size, loose numbers; nothing written -------------------


async def table_counts(svc: Service) -> dict[str, int]:
    async with svc.runtime.engine.connect() as conn:
        counts = {}
        for table in ("orders", "payments", "invoices", "webhook_events", "capture_intents"):
            counts[table] = (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
    return counts


def _signed(raw: bytes) -> dict[str, str]:
    signature = hmac.new(KEYS.webhook_secret.encode(), raw, hashlib.sha256).hexdigest()
    return {"X-Razorpay-Signature": signature, "Content-Type": "application/json"}


@pytest.mark.parametrize(
    "where",
    [
        "event",
        "payload.payment.entity.id",
        "payload.payment.entity.order_id",
        "payload.payment.entity.currency",
        "payload.payment.entity.method",
        "payload.payment.entity.error_code",
        "account_id",
    ],
)
async def test_signed_webhook_with_a_lone_surrogate_is_400_naming_where(
    service: Service, fake_gateway: FakeRazorpay, where: str
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    envelope = webhook_event("payment.captured", payment)
    *parents, last = where.split(".")
    node = envelope
    for key in parents:
        node = node[key]
    node[last] = "pay\ud800"
    body, headers = signed_webhook(envelope, KEYS.webhook_secret)
    assert b"\\ud800" in body  # json.dumps escapes it: valid JSON text, no valid Unicode
    before = await table_counts(service)

    response = await service.client.post("/webhooks/razorpay", content=body, headers=headers)

    error = assert_error(response, 400, "invalid_body")
    assert "surrogate" in error["message"]
    assert where in error["message"]
    assert await table_counts(service) == before
    await assert_nothing_written(service, fake_gateway, order, payment)


async def test_signed_webhook_nested_a_thousand_levels_is_400(service: Service) -> None:
    raw = b'{"event": "payment.captured", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    before = await table_counts(service)

    response = await service.client.post("/webhooks/razorpay", content=raw, headers=_signed(raw))

    error = assert_error(response, 400, "invalid_body")
    assert "1001 levels" in error["message"]
    assert await table_counts(service) == before


@pytest.mark.parametrize(
    "raw",
    [
        b'{"amount": 50000, "currency": "INR", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        b"[" * 5000,  # unterminated, too
    ],
    ids=["deep", "deep-unterminated"],
)
async def test_an_order_body_nested_too_deep_is_400_not_500(service: Service, raw: bytes) -> None:
    before = await table_counts(service)
    response = await service.client.post(
        "/orders", content=raw, headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "invalid_body")
    assert await table_counts(service) == before


async def test_verify_with_a_lone_surrogate_in_an_id_is_422_naming_it(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)
    body = json.dumps(
        {
            "razorpay_order_id": order["gateway_order_id"],
            "razorpay_payment_id": "pay_\ud800",
            "razorpay_signature": "0" * 64,
            "internal_payment_id": order["payment_id"],
        }
    )

    response = await service.client.post(
        "/payments/verify", content=body, headers={"content-type": "application/json"}
    )

    error = assert_error(response, 422, "invalid_request")
    assert error["fields"][0]["field"] == "razorpay_payment_id"
    await assert_nothing_written(service, fake_gateway, order, payment)


async def test_an_unknown_field_named_with_a_lone_surrogate_is_422_not_500(
    service: Service,
) -> None:
    body = '{"amount": 50000, "currency": "INR", "\\ud800": 1}'
    response = await service.client.post(
        "/orders", content=body, headers={"content-type": "application/json"}
    )
    assert_error(response, 422, "invalid_request")
    assert response.content.isascii()


async def test_a_body_over_the_limit_is_413_in_the_error_shape_and_writes_nothing(
    service: Service,
) -> None:
    before = await table_counts(service)
    padding = "x" * (service.runtime.settings.max_body_bytes + 1)

    response = await service.client.post(
        "/orders", json={"amount": 50000, "currency": "INR", "note": padding}
    )

    error = assert_error(response, 413, "body_too_large")
    assert str(service.runtime.settings.max_body_bytes) in error["message"]
    assert await table_counts(service) == before


async def test_the_body_limit_is_a_setting(pg: Database, gateway_url: str) -> None:
    settings = service_settings(pg, gateway_url, max_body_bytes=2048)
    async with Service(settings) as svc:
        small = await svc.client.post("/orders", json={"amount": 50000, "currency": "INR"})
        large = await svc.client.post("/webhooks/razorpay", content=b"{" + b" " * 3000 + b"}")
    assert small.status_code == 201, small.text
    assert_error(large, 413, "body_too_large")


@pytest.mark.parametrize(
    ("path", "problem"),
    [("1_0", "digits"), ("+7", "digits"), (" 7", "digits"), ("٣", "digits"), ("true", "digits")],
)
async def test_a_payment_id_in_the_path_is_digits_only(
    service: Service, path: str, problem: str
) -> None:
    error = assert_error(await service.client.get(f"/payments/{path}"), 422, "invalid_request")
    assert error["fields"][0]["field"] == "payment_id"
    assert problem in error["message"]


@pytest.mark.parametrize("value", [True, "1", 1.0, "7"])
async def test_verify_takes_internal_payment_id_only_as_a_json_integer(
    service: Service, fake_gateway: FakeRazorpay, value: Any
) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    response = await verify(service, order, payment, internal_payment_id=value)

    error = assert_error(response, 422, "invalid_request")
    assert error["fields"][0]["field"] == "internal_payment_id"
    assert "integer" in error["message"]
    await assert_nothing_written(service, fake_gateway, order, payment)


@pytest.mark.parametrize("amount", ["50000", 50000.0, True, "5e4", None])
async def test_an_order_amount_is_only_a_json_integer_of_paise(
    service: Service, amount: Any
) -> None:
    before = await table_counts(service)

    response = await service.client.post("/orders", json={"amount": amount, "currency": "INR"})

    error = assert_error(response, 422, "invalid_request")
    assert [f["field"] for f in error["fields"]] == ["amount"]
    assert "integer" in error["message"]
    assert await table_counts(service) == before


# -- the OpenAPI document and 405 ---------------------------------------------------------------


async def test_a_wrong_method_names_the_allowed_ones(service: Service) -> None:
    response = await service.client.get("/orders")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert (await service.client.put("/payments/1")).headers["allow"] == "GET"


async def test_openapi_lists_every_error_answer_of_each_route(service: Service) -> None:
    doc = (await service.client.get("/openapi.json")).json()
    expected = {
        ("post", "/orders"): {"201", "400", "413", "422", "502", "503"},
        ("get", "/payments/{payment_id}"): {"200", "404", "422", "503"},
        ("post", "/payments/verify"): {"200", "400", "404", "409", "413", "422", "502", "503"},
        ("post", "/webhooks/razorpay"): {"200", "400", "404", "409", "413", "502", "503"},
        ("get", "/healthz"): {"200", "503"},
    }
    for (method, path), statuses in expected.items():
        responses = doc["paths"][path][method]["responses"]
        assert set(responses) == statuses, (method, path)
        for status in statuses - {"200", "201"}:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}
    assert "Retry-After" in doc["paths"]["/payments/verify"]["post"]["responses"]["503"]["headers"]
    assert set(doc["components"]["schemas"]["ErrorBody"]["properties"]) == {"error"}


async def test_openapi_describes_the_webhook_body_and_requires_the_signature(
    service: Service,
) -> None:
    doc = (await service.client.get("/openapi.json")).json()
    operation = doc["paths"]["/webhooks/razorpay"]["post"]
    headers = {p["name"]: p for p in operation["parameters"] if p["in"] == "header"}

    assert headers["X-Razorpay-Signature"]["required"] is True
    assert headers["X-Razorpay-Event-Id"]["required"] is False
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/WebhookEnvelope"}
    schemas = doc["components"]["schemas"]
    envelope = schemas["WebhookEnvelope"]
    assert {"event", "payload"} <= set(envelope["required"])
    entity = schemas["PaymentEntity"]
    assert {"id", "order_id", "amount", "currency"} <= set(entity["required"])
    assert entity["properties"]["amount"]["type"] == "integer"


# -- properties (hypothesis): envelope parsing never fails any other way than a 400 -------------

PROPERTY = settings(max_examples=300, deadline=None, database=None, derandomize=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)
ids = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=64)
entities = st.fixed_dictionaries(
    {
        "id": ids,
        "order_id": ids,
        "amount": st.integers(min_value=-(2**70), max_value=2**70),
        "currency": st.from_regex(r"\A[A-Z]{3}\Z"),
    },
    optional={"method": st.none() | st.text(max_size=32), "status": st.text()},
)


@PROPERTY
@given(doc=json_values)
def test_any_json_document_parses_or_is_a_400_invalid_body(doc: Any) -> None:
    try:
        parsed = _parse_envelope(json.dumps(doc))
    except Rejected as exc:
        assert exc.code == "invalid_body"
        assert exc.message
    else:
        assert parsed["event"] == doc["event"]


@PROPERTY
@given(event=st.sampled_from(sorted(KNOWN_EVENTS)), entity=entities)
def test_a_well_formed_envelope_yields_its_entity(event: str, entity: dict[str, Any]) -> None:
    doc = {"entity": "event", "event": event, "payload": {"payment": {"entity": entity}}}

    parsed = _parse_envelope(json.dumps(doc, ensure_ascii=False))

    assert parsed["event"] == event
    assert parsed["payment"] == entity


@PROPERTY
@given(
    event=st.sampled_from(sorted(KNOWN_EVENTS)),
    entity=entities,
    field=st.sampled_from(["id", "order_id", "currency", "method", "note"]),
    surrogate=st.integers(min_value=0xD800, max_value=0xDFFF),
)
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(
    event: str, entity: dict[str, Any], field: str, surrogate: int
) -> None:
    entity = {**entity, field: "x" + chr(surrogate)}
    doc = {"event": event, "payload": {"payment": {"entity": entity}}}
    text = json.dumps(doc)  # ensure_ascii: written as a \\udxxx escape, valid JSON

    with pytest.raises(Rejected) as caught:
        _parse_envelope(text)

    assert "surrogate" in caught.value.message
    assert f"payload.payment.entity.{field}" in caught.value.message


# -- both gateway clients, end to end -----------------------------------------------------------


@pytest.fixture(params=["lean", "sdk"])
async def client_service(
    request: pytest.FixtureRequest, pg: Database, gateway_url: str
) -> AsyncIterator[Service]:
    settings = service_settings(pg, gateway_url, gateway_client=request.param)
    async with Service(settings) as svc:
        kind = LeanGatewayClient if request.param == "lean" else SdkGatewayClient
        assert type(svc.runtime.gateway) is kind
        yield svc


async def test_both_gateway_clients_capture_once_and_answer_gateway_failures_alike(
    client_service: Service, knobs: FakeRazorpay
) -> None:
    svc = client_service
    order, payment = await customer_pays(svc, knobs)  # the order created through the client

    first = await verify(svc, order, payment)
    again = await verify(svc, order, payment)

    assert (first.status_code, first.json()["status"], first.json()["idempotent"]) == (
        200,
        "captured",
        False,
    )
    assert (again.status_code, again.json()["idempotent"]) == (200, True)
    assert "gateway;dur=" in first.headers["server-timing"]
    assert knobs.counters()["accepted"][payment["id"]] == 1

    # Unavailable: a 502, nothing written; the redelivery captures.
    order, payment = await customer_pays(svc, knobs)
    knobs.set_knobs(fail_rate=1.0)
    failed = await deliver(svc, "payment.authorized", payment, event_id=f"evt_{payment['id']}")
    assert_error(failed, 502, "gateway_error")
    assert (await rows(svc, order["payment_id"]))["status"] == "pending"
    knobs.set_knobs(fail_rate=0.0)
    redelivered = await deliver(svc, "payment.authorized", payment, event_id=f"evt_{payment['id']}")
    assert (redelivered.status_code, redelivered.json()["status"]) == (200, "captured")

    # Captured at the gateway already (Razorpay's automatic capture): "already been captured"
    # is the gateway's 400, and the service records the capture instead of failing.
    order, payment = await customer_pays(svc, knobs)
    knobs.auto_capture(payment["id"])
    late = await verify(svc, order, payment)
    assert (late.status_code, late.json()["status"]) == (200, "captured")
    assert knobs.counters()["rejected"][payment["id"]] == 1


def test_the_capture_routes_run_nothing_in_a_thread() -> None:
    """A sync dependency or endpoint is run in a worker thread: a hop per request."""
    from payrace.service.app import create_app
    from payrace.service.settings import Settings

    app = create_app(Settings())
    routes = {r.path: r for r in app.routes if hasattr(r, "dependant")}
    for path in ("/payments/verify", "/webhooks/razorpay"):
        pending = [routes[path].dependant]
        while pending:
            dependant = pending.pop()
            if dependant.call is not None:
                call = dependant.call
                assert inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call), (
                    path,
                    call,
                )
            pending.extend(dependant.dependencies)
