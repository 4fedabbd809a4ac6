"""service/retry.py: which database errors a capture attempt retries, and what the rest become."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError

from payrace.service.errors import Rejected, RetryLater, ServiceUnavailable
from payrace.service.retry import CONNECTION_RETRIES, retrying, sqlstate


class DriverError(Exception):
    def __init__(self, state: str) -> None:
        super().__init__(f"driver error {state}")
        self.sqlstate = state


def failure(state: str) -> DBAPIError:
    return DBAPIError("UPDATE payments ...", {}, DriverError(state))


class Attempts:
    """Fails with the given SQLSTATEs in turn, then answers "ok" (as SQLAlchemy raises them:
    a DBAPIError wrapping the driver's error)."""

    def __init__(self, *states: str) -> None:
        self.states = list(states)
        self.calls = 0

    def error(self, state: str) -> Exception:
        return failure(state)

    async def __call__(self) -> str:
        self.calls += 1
        if self.states:
            raise self.error(self.states.pop(0))
        return "ok"


@pytest.mark.parametrize("state", ["40001", "40P01", "55P03", "57014"])
async def test_serialisation_failures_deadlocks_and_timeouts_are_retried_until_success(
    state: str,
) -> None:
    attempt = Attempts(state, state)

    assert await retrying(attempt, conflicts=2) == "ok"
    assert attempt.calls == 3


async def test_conflicts_past_the_allowance_are_a_retryable_409_naming_the_sqlstate() -> None:
    attempt = Attempts("40001", "40P01", "40001")

    with pytest.raises(RetryLater) as raised:
        await retrying(attempt, conflicts=1)

    assert attempt.calls == 2
    assert raised.value.status == 409
    assert raised.value.extra == {"sqlstate": "40P01"}
    assert "deadlock_detected" in raised.value.message
    assert "after 2 attempts" in raised.value.message


@pytest.mark.parametrize(
    ("state", "named"), [("55P03", "lock_timeout"), ("57014", "statement_timeout")]
)
async def test_a_timeout_past_the_allowance_is_a_retryable_409_never_a_500(
    state: str, named: str
) -> None:
    """lock_timeout / statement_timeout expiring aborts the transaction, which wrote nothing:
    retried, then a 409 the caller may retry (it used to leave the app as an exception)."""
    attempt = Attempts(state, state, state)

    with pytest.raises(RetryLater) as raised:
        await retrying(attempt, conflicts=2)

    assert attempt.calls == 3
    assert raised.value.status == 409
    assert raised.value.extra == {"sqlstate": state}
    assert named in raised.value.message


async def test_a_lost_connection_is_retried_then_a_503_that_counts_every_attempt() -> None:
    recovers = Attempts(*["57P01"] * CONNECTION_RETRIES)
    assert await retrying(recovers, conflicts=0) == "ok"
    assert recovers.calls == CONNECTION_RETRIES + 1

    gone = Attempts("40001", *["08006"] * (CONNECTION_RETRIES + 1))
    with pytest.raises(ServiceUnavailable) as raised:
        await retrying(gone, conflicts=1)

    assert gone.calls == CONNECTION_RETRIES + 2
    assert f"({CONNECTION_RETRIES + 2} attempts)" in raised.value.message


async def test_a_unique_violation_is_a_payment_mismatch_and_is_not_retried() -> None:
    attempt = Attempts("23505")

    with pytest.raises(Rejected) as raised:
        await retrying(attempt, conflicts=3)

    assert (raised.value.status, raised.value.code) == (400, "payment_mismatch")
    assert attempt.calls == 1


async def test_any_other_database_error_is_raised_as_it_is_without_a_retry() -> None:
    attempt = Attempts("22001")

    with pytest.raises(DBAPIError) as raised:
        await retrying(attempt, conflicts=3)

    assert sqlstate(raised.value) == "22001"
    assert attempt.calls == 1


def test_sqlstate_is_read_from_the_driver_error_or_the_error_it_wraps() -> None:
    wrapper = Exception("asyncpg error wrapped by the SQLAlchemy adapter")
    wrapper.__cause__ = DriverError("40001")

    assert sqlstate(failure("40P01")) == "40P01"
    assert sqlstate(DBAPIError("SELECT 1", {}, wrapper)) == "40001"
    assert sqlstate(DBAPIError("SELECT 1", {}, Exception("no state"))) is None


class AsyncpgAttempts(Attempts):
    """The capture path's own errors: asyncpg's, unwrapped (payrace.service.sql)."""

    def error(self, state: str) -> Exception:
        return asyncpg.PostgresError.new({"C": state, "M": f"server said {state}"})


@pytest.mark.parametrize("state", ["40001", "40P01", "55P03", "57014"])
async def test_asyncpg_conflicts_and_timeouts_are_retried_then_a_409(state: str) -> None:
    recovers = AsyncpgAttempts(state)
    assert await retrying(recovers, conflicts=1) == "ok"
    assert recovers.calls == 2

    persists = AsyncpgAttempts(state, state)
    with pytest.raises(RetryLater) as raised:
        await retrying(persists, conflicts=1)
    assert raised.value.extra == {"sqlstate": state}


async def test_asyncpg_unique_violation_lost_connection_and_other_errors() -> None:
    with pytest.raises(Rejected) as rejected:
        await retrying(AsyncpgAttempts("23505"), conflicts=3)
    assert rejected.value.code == "payment_mismatch"

    killed = AsyncpgAttempts(*["57P01"] * (CONNECTION_RETRIES + 1))  # pg_terminate_backend
    with pytest.raises(ServiceUnavailable):
        await retrying(killed, conflicts=3)
    assert killed.calls == CONNECTION_RETRIES + 1

    other = AsyncpgAttempts("22001")
    with pytest.raises(asyncpg.StringDataRightTruncationError) as raised:
        await retrying(other, conflicts=3)
    assert sqlstate(raised.value) == "22001" and other.calls == 1
