"""The shop's HTTP side: Flask routes under /shop/api/v1, Razorpay through its SDK.

    create_app(settings, pool)    the Flask app; the capture flow is FLOWS[settings.variant]
    POST /purchases               JSON {amount, currency}: the order is created at Razorpay,
                                  then purchase + charge + bill -> 201 {purchase, charge}
    POST /checkout/callback       form-encoded Checkout fields + charge_id: signature checked,
                                  payment captured at Razorpay, charge settled
    POST /hooks/razorpay          webhooks, signature checked on the raw body:
                                  payment.authorized (capture, settle), payment.captured and
                                  order.paid (settle); other events are acknowledged
    GET  /health                  the pool answers a query
    ShopError                     an answer: status + {"error": {"code", "message"}}

Bad input is a 400 and an unknown charge or order a 404, both before anything is written; a
gateway that fails is a 502. One SDK client per request: werkzeug serves each request in a
thread of its own, and the SDK's requests.Session is not documented as thread-safe.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import razorpay
import requests
from flask import Blueprint, Flask, Response, jsonify, request
from psycopg_pool import ConnectionPool
from razorpay.errors import BadRequestError, SignatureVerificationError
from werkzeug.exceptions import HTTPException

from examples.flask_shop.flows import FLOWS, Capture, Charge, UnknownCharge, read_charge
from examples.flask_shop.settings import Settings

PREFIX = "/shop/api/v1"
GATEWAY_TIMEOUT_S = 10
CALLBACK_FIELDS = ("razorpay_order_id", "razorpay_payment_id", "razorpay_signature", "charge_id")
SETTLING_EVENTS = ("payment.authorized", "payment.captured", "order.paid")
_MAX_ID = 2**63 - 1  # bigserial


class ShopError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def create_app(settings: Settings, pool: ConnectionPool) -> Flask:
    app = Flask(__name__)
    api = Blueprint("shop", __name__, url_prefix=PREFIX)
    settle = FLOWS[settings.variant]

    def gateway() -> Any:
        return razorpay.Client(
            auth=(settings.key_id, settings.key_secret), base_url=settings.razorpay_base_url
        )

    def capture_at_gateway(payment_id: str) -> Capture:
        def capture(charge: Charge) -> None:
            data = {"currency": charge.currency}  # a fresh dict: the SDK writes into it
            call = gateway().payment.capture
            _at_gateway(lambda: call(payment_id, charge.amount, data, timeout=GATEWAY_TIMEOUT_S))

        return capture

    @api.get("/health")
    def health() -> Response:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        return jsonify(ok=True, variant=settings.variant)

    @api.post("/purchases")
    def create_purchase() -> tuple[Response, int]:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise ShopError(400, "bad_request", "the body must be a JSON object")
        amount, currency = body.get("amount"), body.get("currency", "INR")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 100:
            raise ShopError(400, "bad_amount", "amount: an integer >= 100 (paise)")
        if not (isinstance(currency, str) and len(currency) == 3 and currency.isupper()):
            raise ShopError(400, "bad_currency", "currency: three capital letters (INR)")
        data = {"amount": amount, "currency": currency}
        order = _at_gateway(lambda: gateway().order.create(data=data, timeout=GATEWAY_TIMEOUT_S))
        with pool.connection() as conn, conn.transaction():
            purchase_id = _one(
                conn.execute(
                    "INSERT INTO shop.purchases (amount, currency, razorpay_order_id)"
                    " VALUES (%s, %s, %s) RETURNING id",
                    (amount, currency, order["id"]),
                ).fetchone()
            )
            charge_id = _one(
                conn.execute(
                    "INSERT INTO shop.charges (purchase_id) VALUES (%s) RETURNING id",
                    (purchase_id,),
                ).fetchone()
            )
            conn.execute("INSERT INTO shop.bills (purchase_id) VALUES (%s)", (purchase_id,))
        purchase = {"id": purchase_id, "razorpay_order_id": order["id"], "state": "open"}
        purchase |= {"amount": amount, "currency": currency}
        return jsonify(purchase=purchase, charge={"id": charge_id, "state": "created"}), 201

    @api.post("/checkout/callback")
    def checkout_callback() -> Response:
        fields = {name: request.form.get(name, "") for name in CALLBACK_FIELDS}
        missing = [name for name, value in fields.items() if not value]
        if missing:
            raise ShopError(400, "missing_field", f"form fields required: {', '.join(missing)}")
        _verified(lambda: gateway().utility.verify_payment_signature(fields))
        charge_id = _charge_id(fields["charge_id"])
        with pool.connection() as conn:
            charge = read_charge(conn, charge_id)
            if charge is None:
                raise ShopError(404, "unknown_charge", f"no charge {charge_id}")
            if charge.razorpay_order_id != fields["razorpay_order_id"]:
                raise ShopError(400, "order_mismatch", "the charge belongs to another order")
            payment_id = fields["razorpay_payment_id"]
            settled = settle(conn, charge_id, payment_id, capture_at_gateway(payment_id))
        return jsonify(charge={"id": charge_id, "state": "captured"}, repeat=not settled)

    @api.post("/hooks/razorpay")
    def razorpay_hook() -> Response:
        raw = request.get_data(as_text=True)  # the SDK verifies a str, these exact characters
        signature = request.headers.get("X-Razorpay-Signature", "")
        secret = settings.webhook_secret
        _verified(lambda: gateway().utility.verify_webhook_signature(raw, signature, secret))
        event, entity = _event(raw)
        if event not in SETTLING_EVENTS:
            return jsonify(event=event, ignored=True)
        payment_id, order_id = _payment_of(entity)
        with pool.connection() as conn:
            row = conn.execute(
                "SELECT c.id FROM shop.charges c JOIN shop.purchases p ON p.id = c.purchase_id"
                " WHERE p.razorpay_order_id = %s ORDER BY c.id DESC LIMIT 1",
                (order_id,),
            ).fetchone()
            if row is None:
                raise ShopError(404, "unknown_order", f"no purchase for {order_id}")
            capture = capture_at_gateway(payment_id) if event == "payment.authorized" else None
            try:
                settled = settle(conn, row[0], payment_id, capture)
            except UnknownCharge:  # deleted between the two reads
                raise ShopError(404, "unknown_charge", f"no charge {row[0]}") from None
        return jsonify(event=event, charge={"id": row[0], "state": "captured"}, repeat=not settled)

    @app.errorhandler(ShopError)
    def shop_error(exc: ShopError) -> tuple[Response, int]:
        return jsonify(error={"code": exc.code, "message": exc.message}), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        code = (exc.name or "error").lower().replace(" ", "_")
        return jsonify(error={"code": code, "message": exc.description}), exc.code or 500

    app.register_blueprint(api)
    return app


def _at_gateway(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except BadRequestError as exc:
        # Razorpay refuses a second capture; the payment *is* captured, as this call wanted.
        if "already been captured" in str(exc):
            return None
        raise ShopError(502, "gateway_refused", f"Razorpay refused: {exc}") from exc
    except (razorpay.errors.ServerError, razorpay.errors.GatewayError) as exc:
        raise ShopError(502, "gateway_error", f"Razorpay failed: {exc}") from exc
    except requests.RequestException as exc:
        raise ShopError(502, "gateway_unreachable", f"Razorpay unreachable: {exc}") from exc


def _verified(check: Callable[[], object]) -> None:
    try:
        check()
    # The SDK raises TypeError, not its own error, for a signature that is not ASCII.
    except (SignatureVerificationError, TypeError):
        raise ShopError(400, "bad_signature", "the Razorpay signature does not match") from None


def _charge_id(value: str) -> int:
    if not (value.isascii() and value.isdigit() and 0 < int(value) <= _MAX_ID):
        raise ShopError(400, "bad_charge_id", f"charge_id must be a positive integer: {value!r}")
    return int(value)


def _event(raw: str) -> tuple[str, Any]:
    """The event's name and its payment entity (None if it has none), or a 400."""
    try:
        body = json.loads(raw)
        event = body["event"]
    except (ValueError, KeyError, TypeError):
        raise ShopError(400, "bad_event", "the body is not a Razorpay event") from None
    if not isinstance(event, str):
        raise ShopError(400, "bad_event", "event must be a string")
    payload = body.get("payload")
    payment = payload.get("payment") if isinstance(payload, dict) else None
    return event, payment.get("entity") if isinstance(payment, dict) else None


def _payment_of(entity: Any) -> tuple[str, str]:
    """(pay_…, order_…) of a payment entity, or a 400."""
    ids = (entity.get("id"), entity.get("order_id")) if isinstance(entity, dict) else (0, 0)
    match ids:
        case (str(payment_id), str(order_id)) if payment_id and order_id:
            return payment_id, order_id
    raise ShopError(400, "bad_event", "payload.payment.entity needs an id and an order_id")


def _one(row: tuple[Any, ...] | None) -> int:
    assert row is not None  # INSERT ... RETURNING answers one row
    return int(row[0])
