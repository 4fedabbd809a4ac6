"""service/sql.py: the capture path's asyncpg pool, transactions and observers, on real
PostgreSQL (the tests' session database; each test uses a table of its own)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

import asyncpg
import psycopg
import pytest

from payrace.harness.infra.provider import Database as Postgres
from payrace.service import sql
from payrace.service.errors import connection_lost


class Log(sql.Observer):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_begin(self, isolation: str) -> None:
        self.seen.append(f"BEGIN {isolation}")

    def on_statement(self, sql: str, args: Sequence[object]) -> None:
        self.seen.append(f"{sql.split()[0]} {list(args)}")

    def on_commit(self) -> None:
        self.seen.append("COMMIT")

    def on_rollback(self) -> None:
        self.seen.append("ROLLBACK")

    def on_error(self, exc: BaseException) -> None:
        self.seen.append(f"error {type(exc).__name__}")


@pytest.fixture
async def db(pg: Postgres) -> AsyncIterator[sql.Database]:
    database = sql.Database(pg.url, max_size=2, name="test")
    await database.open()
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def table(pg: Postgres) -> str:
    name = f"test_sql_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
    return name


async def test_a_transaction_commits_at_its_level_and_observers_see_each_step(
    db: sql.Database, table: str
) -> None:
    log = Log()
    db.observers.append(log)

    async with db.transaction("REPEATABLE READ") as tx:
        level = await tx.fetchval("SHOW transaction_isolation")
        await tx.execute(f"INSERT INTO {table} VALUES ($1, $2)", 1, "one")
        assert tx.backend_pid == await tx.fetchval("SELECT pg_backend_pid()")

    assert level == "repeatable read"
    assert await db.fetchval(f"SELECT note FROM {table} WHERE id = $1", 1) == "one"
    assert log.seen[:4] == [
        "BEGIN REPEATABLE READ",
        "SHOW []",
        "INSERT [1, 'one']",
        "SELECT []",
    ]
    assert log.seen[4:] == ["COMMIT", "SELECT [1]"]  # then the autocommit read


async def test_a_block_that_raises_rolls_back_and_the_connection_is_reused(
    db: sql.Database, table: str
) -> None:
    log = Log()
    db.observers.append(log)

    with pytest.raises(asyncpg.UniqueViolationError):
        async with db.transaction() as tx:
            await tx.execute(f"INSERT INTO {table} VALUES (1, 'kept?')")
            first = tx.backend_pid
            await tx.execute(f"INSERT INTO {table} VALUES (1, 'twice')")

    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0
    assert log.seen[-3:] == ["error UniqueViolationError", "ROLLBACK", "SELECT []"]
    async with db.transaction() as tx:
        assert tx.backend_pid == first  # rolled back and handed out again, not closed


async def test_a_killed_backend_is_a_lost_connection_and_the_pool_replaces_it(
    db: sql.Database, pg: Postgres
) -> None:
    """What the nemesis and a failover do: the statement fails as a lost connection (the
    capture retries it, then answers 503), and the next transaction gets a live one."""
    with pytest.raises(Exception) as raised:
        async with db.transaction() as tx:
            killed = tx.backend_pid
            with psycopg.connect(pg.url, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (killed,))
            await asyncio.sleep(0.05)
            await tx.fetchval("SELECT 1")

    assert connection_lost(raised.value), repr(raised.value)
    async with db.transaction() as tx:
        assert tx.backend_pid != killed
        assert await tx.fetchval("SELECT 1") == 1


async def test_a_connection_killed_while_idle_in_the_pool_never_fails_in_the_driver(
    pg: Postgres,
) -> None:
    """A backend terminated while its connection sat in the pool (kill-after-capture,
    kill-backends, a DBA): handed out before asyncpg has read the FATAL, its first statement
    used to fail in the driver ("another operation (2) is in progress", a 500 on POST
    /orders). That statement was never sent, so it goes out again on a fresh connection;
    a loss the driver did see is a lost connection (a 503), never anything else."""
    db = sql.Database(pg.url, max_size=1, name="test")
    await db.open()
    admin = await asyncpg.connect(sql.asyncpg_dsn(pg.url))
    answered = lost = 0
    try:
        for i in range(40):
            pid = await db.fetchval("SELECT pg_backend_pid()")
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            # Before, while and after asyncpg reads the FATAL and the end of the socket.
            await asyncio.sleep(0.0005 * (i % 10))
            try:
                if i % 2:
                    assert await db.fetchval("SELECT 1") == 1
                else:
                    async with db.transaction() as tx:
                        assert await tx.fetchval("SELECT 2") == 2
                answered += 1
            except Exception as exc:  # anything but a lost connection fails the test
                assert connection_lost(exc), repr(exc)
                assert not isinstance(exc, asyncpg.InternalClientError), repr(exc)
                lost += 1
    finally:
        await admin.close()
        await db.close()
    assert answered + lost == 40
    assert answered >= 20, (answered, lost)


async def test_without_a_pool_each_use_connects_and_closes(pg: Postgres) -> None:
    once = sql.Database(pg.url, max_size=0, name="per use")
    await once.open()  # nothing to open

    pids = [await once.fetchval("SELECT pg_backend_pid()") for _ in range(2)]

    assert pids[0] != pids[1]
    with psycopg.connect(pg.url) as conn:
        alive = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
        ).fetchone()
    assert alive == (0,)


async def test_closing_the_pool_ends_its_backends(db: sql.Database, pg: Postgres) -> None:
    """The explorer and the oracle read deadlock counters once the service's backends exit."""
    pid = await db.fetchval("SELECT pg_backend_pid()")

    await db.close()

    with psycopg.connect(pg.url) as conn:
        for _ in range(50):
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            if row.fetchone() == (0,):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail(f"backend {pid} still there after the pool closed")


async def test_a_pool_that_is_not_open_says_so(pg: Postgres) -> None:
    closed = sql.Database(pg.url, max_size=1, name="capture")

    with pytest.raises(RuntimeError, match="capture pool is not open"):
        await closed.fetchval("SELECT 1")


async def test_an_exhausted_pool_is_a_lost_connection(
    db: sql.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection stuck on a server that does not answer: a 503, as SQLAlchemy's
    pool timeout was."""
    held = [await db.acquire() for _ in range(db.max_size)]
    # Only now: making those connections may take longer than this on a loaded machine.
    monkeypatch.setattr(sql, "ACQUIRE_TIMEOUT_S", 0.05)
    try:
        with pytest.raises(sql.PoolExhausted) as raised:
            await db.acquire()
    finally:
        for conn in held:
            await db.release(conn)

    assert connection_lost(raised.value)


async def test_the_connection_given_back_last_is_the_next_one_taken(db: sql.Database) -> None:
    first, second = await db.acquire(), await db.acquire()
    await db.release(first)
    await db.release(second)

    again = await db.acquire()
    try:
        assert again is second  # the warmest: the one most recently used
    finally:
        await db.release(again)


async def test_a_waiter_gets_the_connection_given_back_and_a_cancelled_one_loses_none(
    db: sql.Database,
) -> None:
    held = [await db.acquire() for _ in range(db.max_size)]
    cancelled = asyncio.create_task(db.acquire())
    waiting = asyncio.create_task(db.acquire())
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await db.release(held[0])

    assert await waiting is held[0]
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    for conn in (held[1], held[0]):
        await db.release(conn)
    # Both connections are back: two can be held at once again.
    both = [await db.acquire() for _ in range(db.max_size)]
    assert set(both) == set(held)
    for conn in both:
        await db.release(conn)


async def test_a_connection_dropped_under_a_full_pool_lets_a_waiter_connect(
    db: sql.Database,
) -> None:
    held = [await db.acquire() for _ in range(db.max_size)]
    waiting = asyncio.create_task(db.acquire())
    await asyncio.sleep(0.01)
    held[0].terminate()
    await db.release(held[0])

    fresh = await asyncio.wait_for(waiting, 5)
    assert fresh not in held and not fresh.is_closed()
    for conn in (fresh, held[1]):
        await db.release(conn)


async def test_a_connection_idle_for_its_lifetime_is_closed(
    pg: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql, "IDLE_LIFETIME_S", 0.05)
    db = sql.Database(pg.url, max_size=2, name="test")
    await db.open()
    try:
        conn = await db.acquire()
        await db.release(conn)
        await asyncio.sleep(0.2)

        assert conn.is_closed()
        assert await db.fetchval("SELECT 1") == 1  # a new one is made
    finally:
        await db.close()


async def test_closing_waits_for_a_checked_out_connection_and_closes_it(
    db: sql.Database,
) -> None:
    conn = await db.acquire()

    async def give_back_later() -> None:
        await asyncio.sleep(0.05)
        await db.release(conn)

    later = asyncio.create_task(give_back_later())
    await asyncio.wait_for(db.close(), sql.CLOSE_TIMEOUT_S / 2)
    await later

    assert conn.is_closed()


async def test_statements_see_a_changed_table_as_asyncpg_does(db: sql.Database, table: str) -> None:
    """A statement prepared before an ALTER TABLE changed its result type: outside a
    transaction it is prepared again and answers; inside one it fails, and the next
    transaction prepares it again."""
    await db.execute(f"INSERT INTO {table} VALUES ($1, $2)", 1, "one")
    query = f"SELECT * FROM {table} WHERE id = $1"
    assert tuple(await db.fetchrow(query, 1) or ()) == (1, "one")
    await db.execute(f"ALTER TABLE {table} ADD COLUMN extra int DEFAULT 7")

    assert tuple(await db.fetchrow(query, 1) or ()) == (1, "one", 7)
    await db.execute(f"ALTER TABLE {table} DROP COLUMN extra")
    with pytest.raises(asyncpg.InvalidCachedStatementError):
        async with db.transaction() as tx:
            await tx.fetchrow(query, 1)
    async with db.transaction() as tx:
        assert tuple(await tx.fetchrow(query, 1) or ()) == (1, "one")


async def test_execute_with_arguments_answers_the_command_tag(db: sql.Database, table: str) -> None:
    assert await db.execute(f"INSERT INTO {table} VALUES ($1, $2)", 1, "one") == "INSERT 0 1"
    assert await db.fetch(f"SELECT id FROM {table} WHERE id > $1", 0) == [(1,)]
    assert await db.fetchval(f"SELECT note FROM {table} WHERE id = $1", 2) is None
    assert await db.fetchrow(f"SELECT note FROM {table} WHERE id = $1", 2) is None


async def test_a_waiter_handed_a_connection_that_died_meanwhile_connects_anew(
    db: sql.Database,
) -> None:
    held = [await db.acquire() for _ in range(db.max_size)]
    waiting = asyncio.create_task(db.acquire())
    await asyncio.sleep(0.01)
    await db.release(held[0])  # handed to the waiter, which has not run yet
    held[0].terminate()

    fresh = await asyncio.wait_for(waiting, 5)
    assert fresh is not held[0] and not fresh.is_closed()
    assert await fresh.fetchval("SELECT 1") == 1
    for conn in (fresh, held[1]):
        await db.release(conn)


@pytest.mark.parametrize("direct", [True, False], ids=["bound", "public"])
async def test_statements_answer_the_same_on_asyncpgs_public_methods(
    db: sql.Database, table: str, direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An asyncpg release whose internals are not the known ones (sql.DIRECT False) runs the
    same statements through Connection.fetch / fetchrow / execute, with the same answers."""
    assert sql.DIRECT  # the installed asyncpg is one of the known ones
    monkeypatch.setattr(sql, "DIRECT", direct)
    async with db.transaction() as tx:
        insert = f"INSERT INTO {table} VALUES ($1, $2), ($3, $4)"
        assert await tx.execute(insert, 1, "a", 2, "b") == "INSERT 0 2"
        rows = await tx.fetch(f"SELECT id FROM {table} WHERE id >= $1 ORDER BY id", 1)
        assert [r["id"] for r in rows] == [1, 2]
        row = await tx.fetchrow(f"SELECT id FROM {table} WHERE id = $1", 2)
        assert row is not None and row["id"] == 2
        assert await tx.fetchrow(f"SELECT id FROM {table} WHERE id = $1", 99) is None
        assert await tx.fetchval(f"SELECT count(*) FROM {table} WHERE id > $1", 0) == 2
        assert await tx.fetchval(f"SELECT id FROM {table} WHERE id = $1", 99) is None
