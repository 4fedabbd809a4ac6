"""Razorpay's signatures on what reaches the service, checked as the razorpay SDK checks them.

    SignatureVerifier   built once per service (payrace.service.app.Runtime), not per request
      .check_callback()   Checkout's callback: HMAC-SHA256 of "order_id|payment_id", key secret
      .check_webhook()    a webhook: HMAC-SHA256 of the raw body, webhook secret

Both raise Rejected(code="invalid_signature"), a 400, for a missing or wrong signature.

The SDK's Utility, step for step (razorpay/utility/utility.py: `str()` of each field, the
secret and the text encoded as UTF-8, HMAC-SHA256's hex digest, `hmac.compare_digest`), not
the SDK itself: importing it imports requests and its client, a tenth of a second of every
service start, for two HMACs. tests/service/test_signatures.py checks the two agree.
"""

from __future__ import annotations

import hashlib
import hmac

from payrace.service.errors import Rejected


class SignatureVerifier:
    def __init__(self, key_id: str, key_secret: str, webhook_secret: str) -> None:
        # The SDK checks a callback against the key secret of its client (`client.auth[1]`).
        self._key_secret = str(key_secret)
        self._webhook_secret = webhook_secret

    def check_callback(self, order_id: str, payment_id: str, signature: str | None) -> None:
        self._check(f"{order_id!s}|{payment_id!s}", signature, self._key_secret)

    def check_webhook(self, body_text: str, signature: str | None) -> None:
        """`body_text` is the raw body decoded: the SDK wants a str."""
        self._check(body_text, signature, self._webhook_secret)

    @staticmethod
    def _check(text: str, signature: str | None, secret: str) -> None:
        if not signature:
            raise Rejected("signature is missing", code="invalid_signature")
        try:
            expected = hmac.new(
                secret.encode("utf-8"), text.encode("utf-8"), hashlib.sha256
            ).hexdigest()
            # compare_digest raises TypeError for a non-ASCII str, as it does in the SDK; an
            # unencodable text (a lone surrogate) raises UnicodeEncodeError, a ValueError.
            matches = hmac.compare_digest(expected, str(signature))
        except (TypeError, ValueError) as exc:
            raise Rejected("signature does not match", code="invalid_signature") from exc
        if not matches:
            raise Rejected("signature does not match", code="invalid_signature")
