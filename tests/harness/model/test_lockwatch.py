"""harness/model/lockwatch.py: real row-lock waits on the session's PostgreSQL, seen from outside.

Each test makes its own table and its own transactions with asyncpg; a holder keeps
`SELECT ... FOR UPDATE` on a row while waiters queue behind it for HOLD_S.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from payrace.harness.infra.provider import Database
from payrace.harness.model import lockwatch
from payrace.harness.model.lockwatch import LockWatch

HOLD_S = 0.3


@pytest.fixture
async def table(pg: Database) -> AsyncIterator[str]:
    name = f"lockwatch_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(pg.url)
    try:
        await conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, n int NOT NULL)")
        await conn.execute(f"INSERT INTO {name} VALUES (1, 0), (2, 0)")
        yield name
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {name}")
        await conn.close()


async def hold_row(pg: Database, table: str, waiters: int) -> list[float]:
    """Hold row 1 FOR UPDATE for HOLD_S while `waiters` transactions queue for it; return
    how long each waiter took to get the row, as the waiter itself measured it."""
    holder = await asyncpg.connect(pg.url)
    others = [await asyncpg.connect(pg.url) for _ in range(waiters)]
    try:
        await holder.execute("BEGIN")
        await holder.fetch(f"SELECT * FROM {table} WHERE id = 1 FOR UPDATE")

        async def wait(conn: asyncpg.Connection) -> float:
            started = time.perf_counter()
            async with conn.transaction():
                await conn.fetch(f"SELECT * FROM {table} WHERE id = 1 FOR UPDATE")
                waited = time.perf_counter() - started
                await conn.execute(f"UPDATE {table} SET n = n + 1 WHERE id = 1")
            return waited

        tasks = [asyncio.create_task(wait(conn)) for conn in others]
        await asyncio.sleep(HOLD_S)
        await holder.execute("COMMIT")
        return list(await asyncio.gather(*tasks))
    finally:
        for conn in [holder, *others]:
            await conn.close()


async def test_a_waiter_behind_a_row_lock_is_seen_with_its_wait(pg: Database, table: str) -> None:
    async with LockWatch(pg.url, interval_s=0.005) as watch:
        (waited,) = await hold_row(pg, table, waiters=1)
        # Samples after the wait, so a busy machine's slow first poll cannot leave every
        # sample inside it: the quiet samples below must be counted too.
        await asyncio.sleep(0.1)
    result = watch.result
    assert waited >= HOLD_S * 0.9  # the wait was real
    assert result.waiting_max >= 1
    assert result.waiting_seen >= 10  # ~300 ms of 5 ms samples
    assert result.episodes >= 1
    summary = result.waits.summary()
    assert 150 <= summary["max"] <= 1500, summary
    assert result.samples > result.waiting_seen


async def test_two_waiters_are_counted_at_once(pg: Database, table: str) -> None:
    async with LockWatch(pg.url, interval_s=0.005) as watch:
        await hold_row(pg, table, waiters=2)
    assert watch.result.waiting_max >= 2
    assert watch.result.episodes >= 2


async def test_no_contention_means_no_waits(pg: Database, table: str) -> None:
    conn = await asyncpg.connect(pg.url)
    try:
        async with LockWatch(pg.url, interval_s=0.005) as watch:
            # Locks taken and released one after another: nobody waits.
            for row in (1, 2, 1, 2):
                async with conn.transaction():
                    await conn.fetch(f"SELECT * FROM {table} WHERE id = $1 FOR UPDATE", row)
                    await asyncio.sleep(0.03)
            # Until it has polled five times (bounded): on a loaded machine the 120 ms above
            # may see no poll at all (seen once under the suite's five workers).
            for _ in range(500):
                if watch.result.samples >= 5:
                    break
                await asyncio.sleep(0.01)
    finally:
        await conn.close()
    result = watch.result
    assert result.samples >= 5
    assert result.waiting_seen == 0
    assert result.waiting_max == 0
    assert result.episodes == 0
    assert result.waits.count == 0


async def test_to_json_reports_the_interval_and_the_wait_summary(pg: Database, table: str) -> None:
    async with LockWatch(pg.url, interval_s=0.01) as watch:
        await hold_row(pg, table, waiters=1)
    doc = watch.result.to_json()
    assert set(doc) == {
        "reconnects",
        "unsampled_s",
        "not_seen",
        "samples",
        "interval_ms",
        "waiting_max",
        "waiting_seen",
        "episodes",
        "wait_ms",
        "cycles",
    }
    assert doc["interval_ms"] == pytest.approx(10.0)
    assert doc["samples"] == watch.result.samples > 0
    assert doc["wait_ms"]["count"] == doc["episodes"] >= 1
    assert doc["cycles"] == 0  # one holder and its waiter: a wait, not a cycle


async def test_leaving_the_watch_stops_polling_and_closes_its_connection(pg: Database) -> None:
    watch = LockWatch(pg.url, interval_s=0.005)
    await watch.__aenter__()
    # Until it has polled twice (bounded): on a loaded machine 50 ms may see no poll at all.
    for _ in range(500):
        if watch.result.samples >= 2:
            break
        await asyncio.sleep(0.01)
    started = time.perf_counter()
    await watch.__aexit__(None, None, None)
    assert time.perf_counter() - started < 1.0  # a poll cut short does not hold up the exit
    samples = watch.result.samples
    assert samples >= 2
    await asyncio.sleep(0.05)
    assert watch.result.samples == samples
    assert watch._conn.is_closed()


async def test_a_deadlock_is_recorded_once_with_each_members_statement_and_lock(
    pg: Database, table: str
) -> None:
    """Rows 1 and 2 locked in opposite orders: the cycle stands for deadlock_timeout (~1 s,
    some 200 polls) and is recorded once."""
    a, b = await asyncpg.connect(pg.url), await asyncpg.connect(pg.url)
    first = f"UPDATE {table} SET n = n + 1 WHERE id = 1"
    second = f"UPDATE {table} SET n = n + 1 WHERE id = 2"
    try:
        async with LockWatch(pg.url, interval_s=0.005) as watch:
            await a.execute("BEGIN")
            await b.execute("BEGIN")
            await a.execute(first)
            await b.execute(second)
            outcomes = await asyncio.gather(
                a.execute(second), b.execute(first), return_exceptions=True
            )
            assert sum(isinstance(o, asyncpg.DeadlockDetectedError) for o in outcomes) == 1
            await a.execute("ROLLBACK")
            await b.execute("ROLLBACK")
    finally:
        await a.close()
        await b.close()
    assert watch.result.to_json()["cycles"] == 1
    (cycle,) = watch.result.cycles
    assert {m.query for m in cycle.members} == {first, second}
    pids = {m.pid for m in cycle.members}
    for m in cycle.members:
        assert m.blocked_by == tuple(pids - {m.pid})
        assert m.waits_for.startswith("transaction ") and "(ShareLock)" in m.waits_for
        assert m.xid is not None and m.full_xid is not None and m.full_xid % (1 << 32) == m.xid


async def test_each_wait_is_kept_with_its_backend_lock_holder_and_both_clocks(
    pg: Database, table: str
) -> None:
    """What a timeline draws as <waiting>: which backend waited, for what, behind whom, when
    (the harness's monotonic clock and the server's)."""
    holder = await asyncpg.connect(pg.url)
    waiter = await asyncpg.connect(pg.url)
    try:
        async with LockWatch(pg.url, interval_s=0.005) as watch:
            before = time.monotonic_ns()
            await holder.execute("BEGIN")
            await holder.fetch(f"SELECT * FROM {table} WHERE id = 1 FOR UPDATE")
            task = asyncio.create_task(
                waiter.fetch(f"SELECT * FROM {table} WHERE id = 1 FOR UPDATE")
            )
            await asyncio.sleep(HOLD_S)
            await holder.execute("COMMIT")
            await task
            await asyncio.sleep(0.05)
            after = time.monotonic_ns()
        mine = [e for e in watch.result.episodes_seen if e.pid == waiter.get_server_pid()]
        assert len(mine) == 1, watch.result.episodes_seen
        (episode,) = mine
        assert episode.blocked_by == (holder.get_server_pid(),)
        assert table in episode.waits_for or "transaction" in episode.waits_for
        assert before <= episode.first_ns < episode.last_ns <= after
        assert (episode.last_ns - episode.first_ns) / 1e6 >= HOLD_S * 1000 * 0.5
        assert episode.first_at is not None and episode.last_at is not None
        assert episode.last_at > episode.first_at
    finally:
        await holder.close()
        await waiter.close()


async def _terminate_sampler(pg: Database) -> int:
    conn = await asyncpg.connect(pg.url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'payrace-lockwatch' AND datname = current_database()"
            )
        )
    finally:
        await conn.close()


async def test_a_sampler_whose_connection_is_killed_reconnects_and_says_what_it_missed(
    pg: Database, table: str
) -> None:
    async with LockWatch(pg.url, interval_s=0.005) as watch:
        await asyncio.sleep(0.2)
        assert await _terminate_sampler(pg) >= 1
        await asyncio.sleep(0.3)
        before = watch.result.samples
        waited = await hold_row(pg, table, waiters=1)  # seen after the reconnect
        assert watch.result.samples > before
    r = watch.result
    assert r.reconnects == 1
    assert r.gave_up is None
    assert r.episodes >= 1 and waited[0] >= HOLD_S * 0.8
    (said,) = r.not_seen()
    assert said.startswith("lock waits not sampled for ")
    assert r.to_json()["not_seen"] == [said]


async def test_a_sampler_that_kept_its_connection_says_it_missed_nothing(pg: Database) -> None:
    async with LockWatch(pg.url, interval_s=0.005) as watch:
        # Polled until a few samples were taken (bounded): on a loaded machine 0.2 s may
        # hold only one or two polls, which says nothing about a missed stretch.
        for _ in range(200):  # 10 s at most
            if watch.result.samples > 5:
                break
            await asyncio.sleep(0.05)
    assert watch.result.reconnects == 0
    assert watch.result.not_seen() == []
    assert watch.result.samples > 5


async def test_a_sampler_that_cannot_reconnect_gives_up_and_says_so(
    pg: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lockwatch, "RECONNECT_FOR_S", 0.3)
    watch = LockWatch(pg.url, interval_s=0.005)
    async with watch:
        await asyncio.sleep(0.1)
        watch.url = "postgresql://nobody@127.0.0.1:1/none"  # the server is gone from now on
        await _terminate_sampler(pg)
        await asyncio.sleep(1.5)
    r = watch.result
    assert r.gave_up is not None and "no connection for" in r.gave_up
    assert any("stopped early" in s for s in r.not_seen())
    assert r.unsampled_s >= 0.3
