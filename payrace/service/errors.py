"""Every error leaves the service as JSON `{"error": {"code", "message"}}` with the right status.

    ApiError        raised by routes and the capture routine (status, code, message)
    ├── NotFound        404: unknown payment / order
    ├── Rejected        400: bad signature, amount or order mismatch, malformed body
    ├── RetryLater      409: serialisation failure, deadlock, lock_timeout or statement_timeout
    │                   after retries (safe to retry)
    ├── GatewayFailed   502: the gateway failed or refused; nothing was written
    └── ServiceUnavailable  503: the database connection was lost (backend killed, server
                            restarting); its transaction rolled back, retrying is safe
timed_out()        was the statement cancelled by lock_timeout / statement_timeout (a 503)
connection_lost()  is this error a lost or refused database connection: 57P01-3 / class 08 /
                   asyncpg ConnectionDoesNotExistError / InterfaceError (asyncpg's own, on
                   the capture path, or wrapped by SQLAlchemy elsewhere), a pool with no free
                   connection for its timeout (SQLAlchemy's, payrace.service.sql's)
                   "connection is closed", or what a new connection raises unwrapped while
                   the server is down or restarting (OSError: FileNotFoundError on the Unix
                   socket, ConnectionRefusedError, TimeoutError; asyncpg
                   CannotConnectNowError 57P03)?
install_handlers() maps validation errors (422), unknown routes (404, 405 with Allow), a lost
database connection anywhere (503 with Retry-After, for as long as the outage lasts) and, as a
last resort, anything unexpected (500, logged) into the same shape.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Mapping
from typing import Any

from asyncpg.exceptions import (
    ConnectionDoesNotExistError,
    InterfaceError,
    InternalClientError,
    PostgresError,
)
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from payrace.service.sql import PoolExhausted

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


class ServiceUnavailable(ApiError):
    status = 503
    code = "database_unavailable"


def unavailable(attempts: int | None = None) -> ServiceUnavailable:
    tried = f" ({attempts} attempts)" if attempts else ""
    return ServiceUnavailable(
        f"the database connection was lost{tried}; retry the request (captures are idempotent)"
    )


# A statement PostgreSQL gave up on: lock_timeout (55P03) or statement_timeout (57014). Its
# transaction rolled back, so the request wrote nothing and can be sent again: a 503 with
# Retry-After, as for an outage, never a 500. (FOR UPDATE NOWAIT's 55P03 never gets here: the
# nowait strategy answers it as a 409 itself.)
_TIMED_OUT_SQLSTATES = {"55P03": "lock_timeout", "57014": "statement_timeout"}


def timed_out(exc: BaseException) -> str | None:
    """Which of the database's timeouts cancelled the statement, or None."""
    if isinstance(exc, PostgresError):
        causes: tuple[object, ...] = (exc,)
    elif isinstance(exc, DBAPIError):
        causes = (exc.orig, getattr(exc.orig, "__cause__", None))
    else:
        return None
    for cause in causes:
        state = getattr(cause, "sqlstate", None)
        if isinstance(state, str) and state in _TIMED_OUT_SQLSTATES:
            return _TIMED_OUT_SQLSTATES[state]
    return None


# SQLSTATEs of a connection PostgreSQL ended: pg_terminate_backend() is 57P01, a restarting
# server 57P02 / 57P03; class 08 is every "connection exception".
_CONNECTION_LOST_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})


def connection_lost(exc: BaseException) -> bool:
    """An error meaning "the database connection is gone or cannot be made", not "the
    statement was wrong".

    The transaction it was in died with the backend; only a loss during COMMIT itself leaves
    the outcome unknown, which an idempotent retry resolves. Once the pool has replaced its
    stale connection, a new connection to a server that is down fails *unwrapped* (SQLAlchemy
    wraps only DB-API errors): those count too, so an outage is a 503 for as long as it lasts."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        return any(_lost(cause) for cause in (exc.orig, getattr(exc.orig, "__cause__", None)))
    # Waiting for a pool connection past pool_timeout: every connection is stuck on a server
    # that does not answer.
    if isinstance(exc, PoolTimeout | PoolExhausted):
        return True
    return _lost(exc) and _from_the_driver(exc)


_CLOSED = ("connection is closed", "connection has been released back to the pool")


def _lost(cause: BaseException | None) -> bool:
    state = getattr(cause, "sqlstate", None)
    if isinstance(state, str) and (state in _CONNECTION_LOST_SQLSTATES or state.startswith("08")):
        return True
    # asyncpg: the socket closed mid-statement, or a statement on a closed connection (on a
    # pool's connection: the pool took it back as it closed, "released back to the pool").
    # Other InterfaceErrors ("another operation is in progress") are bugs, not faults.
    if isinstance(cause, InterfaceError):
        return any(lost in str(cause) for lost in _CLOSED)
    # asyncpg's protocol left mid-error by a backend terminated under it ("cannot switch to
    # state 11; another operation (2) is in progress": the FATAL was still being consumed).
    # Seen when a new connection's first statement (SQLAlchemy's dialect initialisation) is
    # killed; that connection is never pooled, and its request is a retryable 503.
    if isinstance(cause, InternalClientError):
        return "another operation" in str(cause)
    # OSError: FileNotFoundError (Unix socket gone), ConnectionRefusedError, TimeoutError ...
    return isinstance(cause, ConnectionDoesNotExistError | OSError)


def _from_the_driver(exc: BaseException) -> bool:
    """Raised while talking to PostgreSQL (asyncpg or SQLAlchemy's pool on the way)? An OSError
    from anywhere else (a file, the gateway) is not a database outage."""
    if not isinstance(exc, OSError):
        return True  # asyncpg's own exception classes
    return any(
        "/asyncpg/" in frame.f_code.co_filename or "/sqlalchemy/" in frame.f_code.co_filename
        for frame, _ in traceback.walk_tb(exc.__traceback__)
    )


class ErrorJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: a message may echo a field name the
    client sent, and a lone surrogate in it cannot be encoded as UTF-8 (a 500 while answering
    a 422)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode()


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    return ErrorJSON(
        {"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers
    )


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


# What to send instead, for the problems whose pydantic message does not say.
_HINTS = {
    "int_type": " (a JSON integer such as 50000: no quotes, fraction, exponent or true/false)",
}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        retry = isinstance(exc, RetryLater | ServiceUnavailable)
        headers = {"Retry-After": "1"} if retry else None
        return ErrorJSON(exc.body(), status_code=exc.status, headers=headers)

    async def _database(request: Request, exc: Exception) -> JSONResponse:
        if (timeout := timed_out(exc)) is not None:
            log.info("statement cancelled by the database's %s: %s", timeout, exc)
            return await _api(
                request,
                ServiceUnavailable(
                    f"the database cancelled a statement ({timeout}); nothing was written; "
                    "retry the request (captures are idempotent)"
                ),
            )
        if not connection_lost(exc):
            raise exc  # on to the last-resort handler: a 500, logged
        log.info("database connection lost: %s: %s", type(exc).__name__, exc)
        return await _api(request, unavailable())

    # What a lost or refused connection raises: SQLAlchemy's wrapped DB-API errors, and on a
    # new connection the driver's own (not wrapped by SQLAlchemy) and plain OSErrors.
    # CannotConnectNowError (57P03, "the database system is starting up") is a PostgresError.
    # InternalClientError: asyncpg on a connection whose backend was just terminated (_lost).
    for kind in (
        DBAPIError,
        PoolTimeout,
        OSError,
        PostgresError,
        InterfaceError,
        InternalClientError,
    ):
        app.add_exception_handler(kind, _database)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            # A JSON decode error's loc is ("body", <character offset>): the field is the body.
            {
                "field": "body" if e["type"] == "json_invalid" else _field(e["loc"]),
                "problem": e["msg"] + _HINTS.get(e["type"], ""),
            }
            for e in exc.errors()
        ]
        message = "; ".join(f"{f['field']}: {f['problem']}" for f in fields)
        return error_response(422, "invalid_request", message, fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        # A 405 names the methods the route does answer (RFC 9110 15.5.6).
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return error_response(500, "internal_error", "unexpected server error; see service log")
