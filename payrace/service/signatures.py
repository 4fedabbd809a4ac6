"""Razorpay's signatures on what reaches the service, checked by the razorpay SDK's own code.

    SignatureVerifier   built once per service (payrace.service.app.Runtime), not per request
      .check_callback()   Checkout's callback: HMAC-SHA256 of "order_id|payment_id", key secret
      .check_webhook()    a webhook: HMAC-SHA256 of the raw body, webhook secret

Both raise Rejected(code="invalid_signature"), a 400, for a missing or wrong signature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import razorpay
from razorpay.errors import SignatureVerificationError

from payrace.service.errors import Rejected


class SignatureVerifier:
    def __init__(self, key_id: str, key_secret: str, webhook_secret: str) -> None:
        # The SDK checks a callback against the key secret of the client its Utility belongs
        # to. Building that client also builds a requests.Session: once per service is enough.
        self._utility: Any = razorpay.Client(auth=(key_id, key_secret)).utility
        self._webhook_secret = webhook_secret

    def check_callback(self, order_id: str, payment_id: str, signature: str | None) -> None:
        fields = {
            "razorpay_order_id": order_id,
            "razorpay_payment_id": payment_id,
            "razorpay_signature": signature,
        }
        self._check(signature, lambda: self._utility.verify_payment_signature(fields))

    def check_webhook(self, body_text: str, signature: str | None) -> None:
        """`body_text` is the raw body decoded: the SDK wants a str."""
        secret = self._webhook_secret
        self._check(
            signature, lambda: self._utility.verify_webhook_signature(body_text, signature, secret)
        )

    @staticmethod
    def _check(signature: str | None, verify: Callable[[], object]) -> None:
        if not signature:
            raise Rejected("signature is missing", code="invalid_signature")
        try:
            verify()
        # The SDK raises TypeError, not SignatureVerificationError, for a non-ASCII signature.
        except (SignatureVerificationError, TypeError, ValueError) as exc:
            raise Rejected("signature does not match", code="invalid_signature") from exc
