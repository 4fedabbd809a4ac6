"""payrace/harness/runner/capture_race.py through payrace.testing.capture_race, as the seed's
test uses it: the callback and the webhook gathered by the test, on a fresh database."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from payrace.harness.infra.provider import Database
from payrace.testing import capture_race


async def test_forced_naive_double_captures_and_the_assertion_says_where_and_how() -> None:
    async with capture_race(strategy="naive") as r:
        answers = await asyncio.gather(r.verify_payment(), r.handle_webhook_event())
    # Both read `pending` before either wrote: both believe they captured.
    assert [(a.status, a.idempotent) for a in answers] == [(200, False), (200, False)]
    assert r.valid is False
    assert r.result is not None and r.result.report is not None
    with pytest.raises(pytest.fail.Exception) as failed:
        r.assert_exactly_once()
    said = str(failed.value)
    assert "capture was not exactly once" in said
    assert "single_capture_write: 1 of 1 payments captured by more than one" in said
    assert f"report: {r.result.report}" in said and r.result.report.is_file()
    assert "read payment (pending)" in said  # the schedule, as the seed's table draws it


async def test_forced_for_update_captures_once_and_passes() -> None:
    async with capture_race(strategy="for_update") as r:
        answers = await asyncio.gather(r.verify_payment(), r.handle_webhook_event())
    assert sorted(a.idempotent for a in answers) == [False, True]
    assert r.result is not None
    forced = r.result.strategy()["forced"]
    assert (forced["forced"], forced["timeouts"]) == (1, 0)  # really held, not timed out
    r.assert_exactly_once()


async def test_unforced_for_update_passes() -> None:
    async with capture_race(strategy="for_update", forced=False) as r:
        await asyncio.gather(r.verify_payment(), r.handle_webhook_event())
    assert r.result is not None and r.result.summary["mode"] == "aligned"
    r.assert_exactly_once()


async def test_requests_awaited_one_after_the_other_do_not_wait_for_each_other() -> None:
    async with capture_race(strategy="naive") as r:
        first = await r.verify_payment()
        second = await r.handle_webhook_event()
    # Nothing raced, so even the naive flow captured once, and nobody waited out a timeout.
    assert (first.idempotent, second.idempotent) == (False, True)
    assert r.result is not None and r.result.strategy()["pause_timeouts"] == 0
    r.assert_exactly_once()


async def test_a_duplicate_delivery_of_the_same_event_id_is_recognised() -> None:
    async with capture_race(strategy="for_update") as r:
        answers = await asyncio.gather(
            r.verify_payment(),
            r.handle_webhook_event(event_id="evt_seed_dup_0001"),
            r.handle_webhook_event(event_id="evt_seed_dup_0001"),
        )
    assert sum(a.body.get("duplicate_event") is True for a in answers) == 1
    r.assert_exactly_once()


def _race_databases(pg: Database) -> set[str]:
    with psycopg.connect(pg.url) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'payrace_%'")
        return {str(row[0]) for row in rows}


async def test_each_race_has_a_database_of_its_own(pg: Database) -> None:
    before = _race_databases(pg)
    for _ in range(2):
        async with capture_race(strategy="for_update", event="order.paid") as r:
            assert len(_race_databases(pg) - before) == 1
            await asyncio.gather(r.verify_payment(), r.handle_webhook_event())
        assert r.payment is not None and r.payment.payment_id == 1  # a fresh database
        r.assert_exactly_once()
    with pytest.raises(ValueError, match="the test's own"):
        async with capture_race(strategy="for_update") as r:
            raise ValueError("the test's own error")
    assert r.result is None  # no verdict on a block that failed
    assert _race_databases(pg) == before  # every race dropped its database


async def test_the_verdict_is_after_the_block() -> None:
    async with capture_race(strategy="for_update") as r:
        await asyncio.gather(r.verify_payment(), r.handle_webhook_event())
        with pytest.raises(pytest.fail.Exception, match="after the block"):
            r.assert_exactly_once()
    with pytest.raises(pytest.fail.Exception, match="inside the `async with"):
        r.verify_payment()


async def test_a_mistake_in_the_arguments_fails_with_payrace_s_message() -> None:
    with pytest.raises(pytest.fail.Exception, match="payrace: unknown strategy nope"):
        async with capture_race(strategy="nope"):
            pass
    with pytest.raises(pytest.fail.Exception, match="payrace: event must be one of"):
        async with capture_race(event="payment.refunded"):
            pass
    async with capture_race(strategy="for_update") as r:
        with pytest.raises(pytest.fail.Exception, match=r"payment\.refunded"):
            r.handle_webhook_event("payment.refunded")
        await r.verify_payment()
    r.assert_exactly_once()
