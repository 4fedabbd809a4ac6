"""What the reference service's OpenAPI document says beyond what FastAPI infers.

    ERRORS / errors(*statuses)   the error answers of a route, each with the one error shape
                                 `{"error": {"code", "message", ...}}` and what it means
    WEBHOOK_DOC                  the webhook route's openapi_extra: its signed body (Razorpay's
                                 envelope) and its headers, the signature marked required
    add_components()             the models those refer to, under components/schemas

The webhook route reads its raw body and headers itself (the signature covers the exact
bytes; a missing signature must be a 400 like a wrong one, not FastAPI's 422), so FastAPI
cannot infer them: they are described here. A client generated from the document, or
schemathesis, then knows every answer a route can give.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str = Field(description="machine-readable, e.g. invalid_signature, database_unavailable")
    message: str = Field(description="what went wrong and what to fix")


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS: dict[int, str] = {
    400: "rejected: bad or missing signature, mismatched order / amount / currency, a malformed "
    "or over-nested body, a lone surrogate escape; nothing written",
    404: "unknown payment or order",
    409: "retry_later: concurrent update persisted after retries; safe to retry (Retry-After)",
    413: "body_too_large: the body is over MAX_BODY_BYTES; it was not read",
    422: "invalid_request: a field is missing or of the wrong type (each one named in `fields`)",
    502: "gateway_error / gateway_refused: the payment gateway failed or refused; nothing written",
    503: "database_unavailable: the database is down, restarting or the connection was lost; "
    "safe to retry (Retry-After)",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {
            "model": ErrorBody,
            "description": ERRORS[status],
            **({"headers": _RETRY_AFTER} if status in (409, 503) else {}),
        }
        for status in statuses
    }


# -- the webhook body: Razorpay's envelope, as the service reads it ------------------------------


class PaymentEntity(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=64, examples=["pay_29QQoUBi66xm2f"])
    entity: Literal["payment"] = "payment"
    order_id: str = Field(min_length=1, max_length=64, examples=["order_9A33XWu170gUtm"])
    amount: int = Field(gt=0, description="integer, smallest currency unit (paise)")
    currency: str = Field(pattern=r"^[A-Z]{3}$", examples=["INR"])
    status: str = Field(examples=["captured"])
    method: str | None = Field(default=None, max_length=32)
    error_code: str | None = Field(default=None, max_length=64)


class PaymentWrapper(BaseModel):
    model_config = ConfigDict(extra="allow")
    entity: PaymentEntity


class WebhookPayload(BaseModel):
    model_config = ConfigDict(extra="allow")
    payment: PaymentWrapper


class WebhookEnvelope(BaseModel):
    """Razorpay's webhook envelope. Events other than payment.authorized / payment.captured /
    payment.failed / order.paid are acknowledged and ignored."""

    model_config = ConfigDict(extra="allow")
    entity: Literal["event"] = "event"
    account_id: str = Field(examples=["acc_BFQ7uQEaa7j2z7"])
    event: str = Field(examples=["payment.captured"])
    contains: list[str] = Field(examples=[["payment"]])
    payload: WebhookPayload
    created_at: int


_MODELS: tuple[type[BaseModel], ...] = (ErrorBody, WebhookEnvelope)
_REF = "#/components/schemas/{model}"

WEBHOOK_DOC: dict[str, Any] = {
    "parameters": [
        {
            "name": "X-Razorpay-Signature",
            "in": "header",
            "required": True,
            "description": "HMAC-SHA256 of the raw body with the webhook secret, hex; a missing "
            "or wrong one is a 400 invalid_signature",
            "schema": {"type": "string"},
        },
        {
            "name": "X-Razorpay-Event-Id",
            "in": "header",
            "required": False,
            "description": "Razorpay's event id (1..128 characters): a repeat is answered as a "
            "duplicate and changes nothing",
            "schema": {"type": "string", "minLength": 1, "maxLength": 128},
        },
    ],
    "requestBody": {
        "required": True,
        "description": "the body exactly as signed (UTF-8 JSON, nested at most 32 levels)",
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="WebhookEnvelope")}}},
    },
}


def add_components(document: dict[str, Any]) -> dict[str, Any]:
    """Put the models ERRORS and WEBHOOK_DOC refer to under components/schemas."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in _MODELS:
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return document
