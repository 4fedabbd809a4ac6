"""The retry policy of the capture path: what a failed transaction attempt becomes.

    retrying(attempt, conflicts=N)   runs `attempt` until it returns, and on a database error
                                     (asyncpg's own, or SQLAlchemy's DBAPIError around it):
        40001 serialization_failure,   retried N times after a short, growing pause, then
        40P01 deadlock_detected        RetryLater: 409 with Retry-After (safe to retry)
        55P03 lock_not_available       the same: a lock waited for past lock_timeout, or a
        57014 query_canceled           statement past statement_timeout (a DBA's setting, or
                                       the nemesis's) aborts only the transaction
        a lost or refused connection   retried CONNECTION_RETRIES times on a fresh connection
          (errors.connection_lost)     (the pool discards the dead one), then
                                       ServiceUnavailable: 503 with Retry-After
        23505 unique_violation         Rejected payment_mismatch (400): the only unique key a
                                       capture can hit is payments.gateway_payment_id
        anything else                  raised as it is (a 500, logged)

Every retry repeats the whole transaction, so an attempt must be safe to repeat: the capture
routine (payrace.service.capture) remembers the gateway's answer across its attempts. Never a
500 for a conflict and never a lost capture.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from asyncpg import PostgresError
from sqlalchemy.exc import DBAPIError

from payrace.service.errors import Rejected, RetryLater, connection_lost, unavailable
from payrace.service.instrument import timing

RETRYABLE_SQLSTATES = {
    "40001": "serialization_failure",
    "40P01": "deadlock_detected",
    # A timeout aborts the transaction, which wrote nothing: the holder of the lock may have
    # committed by the next attempt, and if not the caller is told to retry, never a 500.
    "55P03": "lock_timeout",
    "57014": "statement_timeout",
}
# What the Server-Timing header counts each retried abort as (instrument.timing).
RETRIED_KIND = {
    "40001": "serialization",
    "40P01": "deadlock",
    "55P03": "timeout",
    "57014": "timeout",
}
# A transaction on a lost connection wrote nothing, so it is retried on a fresh one; more
# than twice in one request means the database is going away.
CONNECTION_RETRIES = 2

T = TypeVar("T")


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of asyncpg's error (the capture path's), or of the driver error a
    SQLAlchemy DBAPIError wraps (directly, or as the adapter's error's cause)."""
    if isinstance(exc, PostgresError):
        state = exc.sqlstate
    elif isinstance(exc, DBAPIError):
        orig = exc.orig
        state = getattr(orig, "sqlstate", None) or getattr(
            getattr(orig, "__cause__", None), "sqlstate", None
        )
    else:
        return None
    return state if isinstance(state, str) else None


async def retrying(attempt: Callable[[], Awaitable[T]], *, conflicts: int) -> T:
    """Run `attempt`; retry up to `conflicts` serialisation failures or deadlocks and up to
    CONNECTION_RETRIES lost connections."""
    conflicted = lost = 0
    while True:
        try:
            return await attempt()
        except Exception as exc:
            # Also what a *new* connection raises while the server is down (OSError,
            # asyncpg's CannotConnectNowError), which SQLAlchemy does not wrap.
            if connection_lost(exc):
                if lost == CONNECTION_RETRIES:
                    raise unavailable(conflicted + lost + 1) from exc
                lost += 1
                continue
            state = sqlstate(exc)
            if state is None:
                raise
            if state == "23505":
                raise Rejected(
                    "this gateway payment id is already bound to another payment",
                    code="payment_mismatch",
                ) from exc
            if state not in RETRYABLE_SQLSTATES:
                raise
            if conflicted == conflicts:
                raise RetryLater(
                    f"concurrent update of this payment ({RETRYABLE_SQLSTATES[state]}) "
                    f"persisted after {conflicted + 1} attempts; retry the request",
                    sqlstate=state,
                ) from exc
            conflicted += 1
            retried = timing.current()
            retried.retried = retried.retried or {}
            kind = RETRIED_KIND[state]
            retried.retried[kind] = retried.retried.get(kind, 0) + 1
            # A short, growing pause lets the winning transaction commit first.
            await asyncio.sleep(0.002 * conflicted)
