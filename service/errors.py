"""Every error leaves the service as JSON `{"error": {"code", "message"}}` with the right status.

    ApiError        raised by routes and the capture routine (status, code, message)
    ├── NotFound        404: unknown payment / order
    ├── Rejected        400: bad signature, amount or order mismatch, malformed body
    ├── RetryLater      409: serialisation failure after retries (safe to retry)
    └── GatewayFailed   502: the gateway failed or refused; nothing was written
install_handlers() maps validation errors (422), unknown routes (404/405) and, as a last
resort, anything unexpected (500, logged) into the same shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("service")


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Rejected(ApiError):
    status = 400
    code = "rejected"


class RetryLater(ApiError):
    status = 409
    code = "retry_later"


class GatewayFailed(ApiError):
    status = 502
    code = "gateway_error"


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if isinstance(exc, RetryLater) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            # A JSON decode error's loc is ("body", <character offset>): the field is the body.
            {
                "field": "body" if e["type"] == "json_invalid" else _field(e["loc"]),
                "problem": e["msg"],
            }
            for e in exc.errors()
        ]
        message = "; ".join(f"{f['field']}: {f['problem']}" for f in fields)
        return error_response(422, "invalid_request", message, fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return error_response(500, "internal_error", "unexpected server error; see service log")
