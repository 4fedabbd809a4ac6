"""payrace/service/signatures.py: Razorpay's callback and webhook signatures, checked as the SDK
checks them (the SDK itself is the oracle below)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
import razorpay
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from razorpay.errors import SignatureVerificationError

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


# -- the SDK as the oracle: the verifier accepts exactly what razorpay's Utility accepts --------

SDK = razorpay.Client(auth=(KEYS.key_id, KEYS.key_secret)).utility


def _sdk_accepts(verify: Any) -> bool:
    try:
        verify()
    except (SignatureVerificationError, TypeError, ValueError):
        return False
    return True


def _accepts(check: Any) -> bool:
    try:
        check()
    except Rejected as exc:
        assert exc.code == "invalid_signature"
        return False
    return True


texts = st.one_of(st.text(max_size=200), st.sampled_from(["", "\ud800", "é|x", "a\x00b"]))


@PROPERTY
@given(
    body=texts, order_id=texts, payment_id=texts, forged=st.text(max_size=80), right=st.booleans()
)
def test_the_verifier_accepts_exactly_what_the_sdk_accepts(
    body: str, order_id: str, payment_id: str, forged: str, right: bool
) -> None:
    def signed(secret: str, text: str) -> str:
        try:
            return _hmac(secret, text) if right else forged
        except UnicodeEncodeError:  # a lone surrogate: nothing can sign it
            return forged

    webhook_signature = signed(KEYS.webhook_secret, body)
    callback_signature = signed(KEYS.key_secret, f"{order_id}|{payment_id}")
    sdk_webhook = _sdk_accepts(
        lambda: SDK.verify_webhook_signature(body, webhook_signature, KEYS.webhook_secret)
    )
    sdk_callback = _sdk_accepts(
        lambda: SDK.verify_payment_signature(
            {
                "razorpay_order_id": order_id,
                "razorpay_payment_id": payment_id,
                "razorpay_signature": callback_signature,
            }
        )
    )

    # The SDK accepts no empty signature either (the HMAC is 64 hex digits); the verifier
    # says "missing" for it before checking.
    assert _accepts(lambda: VERIFIER.check_webhook(body, webhook_signature)) == sdk_webhook
    assert (
        _accepts(lambda: VERIFIER.check_callback(order_id, payment_id, callback_signature))
        == sdk_callback
    )
