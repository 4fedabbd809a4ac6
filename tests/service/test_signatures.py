"""payrace/service/signatures.py: Razorpay's callback and webhook signatures, checked by the SDK."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
import razorpay
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from payrace.harness.gateway.signing import (
    GatewayKeys,
    client_callback,
    signed_webhook,
    webhook_event,
)
from payrace.service.errors import Rejected
from payrace.service.signatures import SignatureVerifier

KEYS = GatewayKeys()
ORDER, PAYMENT = "order_Abcdefghijklmn", "pay_Abcdefghijklmn"


@pytest.fixture
def verifier() -> SignatureVerifier:
    return SignatureVerifier(KEYS.key_id, KEYS.key_secret, KEYS.webhook_secret)


def webhook() -> tuple[str, str]:
    payment = {"id": PAYMENT, "order_id": ORDER, "amount": 50000, "currency": "INR"}
    body, headers = signed_webhook(webhook_event("payment.captured", payment), KEYS.webhook_secret)
    return body.decode(), headers["X-Razorpay-Signature"]


def test_good_signatures_pass(verifier: SignatureVerifier) -> None:
    callback = client_callback(ORDER, PAYMENT, KEYS.key_secret)

    verifier.check_callback(ORDER, PAYMENT, callback["razorpay_signature"])
    verifier.check_webhook(*webhook())


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        (None, "signature is missing"),
        ("", "signature is missing"),
        ("0" * 64, "signature does not match"),
        ("é" * 64, "signature does not match"),  # the SDK raises TypeError for non-ASCII
    ],
)
def test_a_missing_wrong_or_non_ascii_signature_is_a_400(
    verifier: SignatureVerifier, signature: str | None, message: str
) -> None:
    body, _ = webhook()
    for check in (
        lambda: verifier.check_callback(ORDER, PAYMENT, signature),
        lambda: verifier.check_webhook(body, signature),
    ):
        with pytest.raises(Rejected) as rejected:
            check()
        assert (rejected.value.status, rejected.value.code) == (400, "invalid_signature")
        assert rejected.value.message == message


def test_a_callback_signed_for_another_payment_or_with_the_webhook_secret_is_rejected(
    verifier: SignatureVerifier,
) -> None:
    other = client_callback(ORDER, "pay_Other000000000", KEYS.key_secret)
    webhook_secret = client_callback(ORDER, PAYMENT, KEYS.webhook_secret)
    body, signature = webhook()

    for bad in (other, webhook_secret):
        with pytest.raises(Rejected):
            verifier.check_callback(ORDER, PAYMENT, bad["razorpay_signature"])
    with pytest.raises(Rejected):
        verifier.check_webhook(body.replace("50000", "50001"), signature)


def test_checks_build_no_razorpay_client(
    verifier: SignatureVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Any] = []

    def counting_client(*args: Any, **kwargs: Any) -> Any:
        built.append(args)
        raise AssertionError("a razorpay.Client was built per check")

    monkeypatch.setattr(razorpay, "Client", counting_client)
    callback = client_callback(ORDER, PAYMENT, KEYS.key_secret)
    for _ in range(3):
        verifier.check_callback(ORDER, PAYMENT, callback["razorpay_signature"])
        verifier.check_webhook(*webhook())

    assert built == []


# -- properties (hypothesis): the right HMAC always passes, anything else is a 400 --------------

VERIFIER = SignatureVerifier(KEYS.key_id, KEYS.key_secret, KEYS.webhook_secret)
PROPERTY = settings(max_examples=200, deadline=None, database=None, derandomize=True)


def _hmac(secret: str, text: str) -> str:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


@PROPERTY
@given(body=st.text())
def test_any_body_signed_with_the_webhook_secret_passes(body: str) -> None:
    VERIFIER.check_webhook(body, _hmac(KEYS.webhook_secret, body))


@PROPERTY
@given(body=st.text(), other=st.text())
def test_a_signature_of_another_body_is_rejected(body: str, other: str) -> None:
    assume(body != other)
    with pytest.raises(Rejected) as caught:
        VERIFIER.check_webhook(body, _hmac(KEYS.webhook_secret, other))
    assert caught.value.code == "invalid_signature"


@PROPERTY
@given(body=st.text(max_size=200), signature=st.text())
def test_any_wrong_signature_string_is_a_400_never_another_error(body: str, signature: str) -> None:
    # Non-ASCII, empty, whitespace, the wrong length: the SDK raises TypeError for some.
    assume(signature != _hmac(KEYS.webhook_secret, body))
    with pytest.raises(Rejected):
        VERIFIER.check_webhook(body, signature)


@PROPERTY
@given(body=st.text(max_size=200), secret=st.text(min_size=1))
def test_a_body_signed_with_another_secret_is_rejected(body: str, secret: str) -> None:
    assume(secret != KEYS.webhook_secret)
    with pytest.raises(Rejected):
        VERIFIER.check_webhook(body, _hmac(secret, body))


ids = st.text(st.characters(codec="ascii", exclude_characters="|\x00"), min_size=1, max_size=64)


@PROPERTY
@given(order_id=ids, payment_id=ids)
def test_any_callback_signed_with_the_key_secret_passes_and_a_swapped_one_does_not(
    order_id: str, payment_id: str
) -> None:
    signature = _hmac(KEYS.key_secret, f"{order_id}|{payment_id}")
    VERIFIER.check_callback(order_id, payment_id, signature)
    assume(order_id != payment_id)
    with pytest.raises(Rejected):
        VERIFIER.check_callback(payment_id, order_id, signature)
