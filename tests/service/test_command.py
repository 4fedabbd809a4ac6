"""service/command.py: a capture command checked against the stored payment and order, and the
answer's JSON. (record_event and stored_result run inside the capture's transaction: their
behaviour is asserted end to end in test_capture.py and test_app.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from payrace.service.command import CaptureCommand, CaptureResult, validate
from payrace.service.errors import Rejected
from payrace.service.models import OrderRow, PaymentRow


def stored(**payment_fields: Any) -> tuple[PaymentRow, OrderRow]:
    order = OrderRow(id=7, gateway_order_id="order_Abcdefghijklmn", amount=50000, currency="INR")
    fields: dict[str, Any] = {"id": 11, "order_id": 7, "status": "pending"}
    fields.update({"gateway_payment_id": None, **payment_fields})
    return PaymentRow(**fields), order


def command(**fields: Any) -> CaptureCommand:
    values: dict[str, Any] = {
        "source": "webhook",
        "payment_id": 11,
        "gateway_order_id": "order_Abcdefghijklmn",
        "gateway_payment_id": "pay_Abcdefghijklmn",
        "capture_at_gateway": False,
    }
    values.update(fields)
    return CaptureCommand(**values)


def test_a_command_matching_its_order_passes() -> None:
    payment, order = stored()

    validate(command(amount=50000, currency="INR"), payment, order)
    validate(command(source="client"), *stored(gateway_payment_id="pay_Abcdefghijklmn"))


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"gateway_order_id": "order_NotThisOne12345"}, "order_mismatch"),
        ({"amount": 100}, "amount_mismatch"),
        ({"currency": "USD"}, "currency_mismatch"),
    ],
)
def test_a_command_for_another_order_amount_or_currency_is_rejected(
    fields: dict[str, Any], code: str
) -> None:
    with pytest.raises(Rejected) as rejected:
        validate(command(**fields), *stored())

    assert (rejected.value.status, rejected.value.code) == (400, code)


def test_a_payment_bound_to_another_gateway_payment_rejects_all_but_retries_and_failures() -> None:
    bound = {"gateway_payment_id": "pay_Other000000000", "status": "captured"}

    with pytest.raises(Rejected) as rejected:
        validate(command(), *stored(**bound))
    assert rejected.value.code == "payment_mismatch"

    # The customer may retry after a failed attempt; a late payment.failed changes nothing.
    validate(command(), *stored(gateway_payment_id="pay_Other000000000", status="failed"))
    validate(command(event="payment.failed"), *stored(**bound))


def test_a_result_answers_every_field_as_json() -> None:
    result = CaptureResult(
        payment_id=11,
        status="captured",
        gateway_payment_id="pay_Abcdefghijklmn",
        idempotent=True,
        duplicate_event=False,
        invoice_status="paid",
        order_status="paid",
    )

    assert result.as_json() == {
        "payment_id": 11,
        "status": "captured",
        "gateway_payment_id": "pay_Abcdefghijklmn",
        "idempotent": True,
        "duplicate_event": False,
        "invoice_status": "paid",
        "order_status": "paid",
    }
