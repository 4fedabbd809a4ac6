"""The capture path's SQL: asyncpg connections, one round trip per statement, nothing between.

    Database      a pool of asyncpg connections (or a connection per use: max_size=0) and
                  the observers told about every statement it runs
      .transaction(isolation)   `async with`: BEGIN at that level -> Tx -> COMMIT, or
                                ROLLBACK when the block raises
      .fetch / .fetchrow / .fetchval / .execute   one statement in autocommit
    Tx            the transaction's connection: fetch / fetchrow / fetchval / execute with $n
                  parameters (asyncpg prepares each text once per connection and caches it)
    Observer      on_begin / on_statement / on_commit / on_rollback / on_error, called in the
                  task that runs the statement (the explorer reads its request from there;
                  the bench logs one capture's SQL for pgbench). Override what you need.
    asyncpg_dsn() a DSN of any PostgreSQL spelling, as asyncpg reads it

Why not SQLAlchemy here: its asyncio layer runs every statement through a greenlet bridge, and
the ORM loads and tracks objects the capture path never changes. Profiled, that was most of
the service's CPU per capture (docs/benchmarks.md); the routes off the capture path keep
SQLAlchemy (payrace.service.db).

Pool. Connections are made on demand up to max_size and kept (asyncpg closes one idle for
IDLE_LIFETIME_S). Returned connections are not reset with asyncpg's default query (RESET ALL,
UNLISTEN, CLOSE ALL, advisory unlock: a round trip per checkout): the capture path sets no
session state and takes only transaction-scoped advisory locks; an open transaction is still
rolled back by asyncpg. A connection that died (a killed backend) is dropped by the pool and
replaced on the next acquire.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, cast

import asyncpg

from payrace.postgres import libpq_url, normalise_isolation

IDLE_LIFETIME_S = 300.0
# What SQLAlchemy's pool waits for a free connection before giving up (its pool_timeout): a
# pool that stays exhausted this long means every connection is stuck on the database.
ACQUIRE_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 5.0
_BEGIN = {
    level: f"BEGIN ISOLATION LEVEL {level}"
    for level in ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")
}


def _begin(isolation: str) -> str:
    return _BEGIN.get(isolation) or _BEGIN[normalise_isolation(isolation)]


def asyncpg_dsn(url: str) -> str:
    return libpq_url(url)


class PoolExhausted(TimeoutError):
    """No connection came free within ACQUIRE_TIMEOUT_S (errors.connection_lost: a 503)."""


class Observer:
    """Told about what a Database runs, synchronously, in the task running it, before it is
    sent (as SQLAlchemy's engine events: on_commit also for a COMMIT that then fails, which
    on_error tells)."""

    def on_begin(self, isolation: str) -> None:
        pass

    def on_statement(self, sql: str, args: Sequence[object]) -> None:
        pass

    def on_commit(self) -> None:
        pass

    def on_rollback(self) -> None:
        pass

    def on_error(self, exc: BaseException) -> None:
        pass


async def _keep(conn: asyncpg.Connection) -> None:
    """The pool's reset: nothing beyond asyncpg's own rollback of an open transaction."""


class Database:
    """Where the capture path's statements run: a pool (opened by open(), closed by close())
    or, with max_size=0, a connection per use, closed after it."""

    def __init__(self, url: str, *, max_size: int, name: str = "capture") -> None:
        self.dsn = asyncpg_dsn(url)
        self.max_size = max_size
        self.name = name
        self.observers: list[Observer] = []
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        if self.max_size and self._pool is None:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=0,
                max_size=self.max_size,
                max_inactive_connection_lifetime=IDLE_LIFETIME_S,
                reset=_keep,
            )

    async def close(self) -> None:
        """Close every connection; one still checked out after CLOSE_TIMEOUT_S is cut."""
        pool = self._pool
        if pool is None:
            return
        try:
            # Requests still in flight give their connections back meanwhile.
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            pool.terminate()
        finally:
            self._pool = None

    async def acquire(self) -> asyncpg.Connection:
        if not self.max_size:  # a connection per use, closed after it
            return await asyncpg.connect(self.dsn)
        if self._pool is None:
            raise RuntimeError(f"the {self.name} pool is not open (Database.open())")
        try:
            # asyncio.timeout, not acquire(timeout=): asyncpg's own runs the acquire in a task
            # of its own, a task per checkout (~5 % of the service's CPU at saturation).
            async with asyncio.timeout(ACQUIRE_TIMEOUT_S):
                conn: asyncpg.Connection = await self._pool.acquire()
        except TimeoutError as exc:
            raise PoolExhausted(
                f"no {self.name} connection came free in {ACQUIRE_TIMEOUT_S:.0f} s"
            ) from exc
        return conn

    async def release(self, conn: asyncpg.Connection) -> None:
        if not self.max_size:
            await _close(conn)
        elif self._pool is not None:
            await self._pool.release(conn)
        # else the pool was closed under the request: its connections went with it.

    def transaction(self, isolation: str = "READ COMMITTED") -> Transaction:
        return Transaction(self, isolation)

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        return cast(list[asyncpg.Record], await self._autocommit(Tx.fetch, sql, args))

    async def fetchrow(self, sql: str, *args: object) -> asyncpg.Record | None:
        return cast(asyncpg.Record | None, await self._autocommit(Tx.fetchrow, sql, args))

    async def fetchval(self, sql: str, *args: object) -> Any:
        return await self._autocommit(Tx.fetchval, sql, args)

    async def execute(self, sql: str, *args: object) -> str:
        return cast(str, await self._autocommit(Tx.execute, sql, args))

    async def _autocommit(
        self, run: Callable[..., Awaitable[Any]], sql: str, args: tuple[object, ...]
    ) -> Any:
        """One statement on a connection of its own; sent again once on another connection
        when the first one turns out dead before anything was sent (_unsent)."""
        for last in (False, True):
            conn = await self.acquire()
            try:
                return await run(Tx(conn, self.observers), sql, *args)
            except asyncpg.InternalClientError as exc:
                if last or not _unsent(exc):
                    raise
                conn.terminate()
            finally:
                await self.release(conn)
        raise AssertionError("unreachable")


def _unsent(exc: BaseException) -> bool:
    """A pooled connection whose backend was terminated while it sat idle (a failover, a
    DBA's pg_terminate_backend, payrace's kill nemeses) can be handed out before asyncpg has
    read the server's FATAL and the socket's end: its first statement then fails in the
    driver, before anything is sent ("cannot switch to state 11; another operation (2) is
    in progress": the FATAL still being consumed). Nothing ran, so it is safe to send the
    statement again on another connection."""
    return isinstance(exc, asyncpg.InternalClientError) and "another operation" in str(exc)


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=CLOSE_TIMEOUT_S)
    except Exception:
        conn.terminate()


class Tx:
    """Statements on one connection, each told to the observers before it is sent."""

    __slots__ = ("conn", "observers")

    def __init__(self, conn: asyncpg.Connection, observers: list[Observer]) -> None:
        self.conn = conn
        self.observers = observers

    @property
    def backend_pid(self) -> int:
        """Known to the driver since the connection was made: no statement."""
        return int(self.conn.get_server_pid())

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        return cast(list[asyncpg.Record], await self._run(self.conn.fetch, sql, args))

    async def fetchrow(self, sql: str, *args: object) -> asyncpg.Record | None:
        return cast(asyncpg.Record | None, await self._run(self.conn.fetchrow, sql, args))

    async def fetchval(self, sql: str, *args: object) -> Any:
        return await self._run(self.conn.fetchval, sql, args)

    async def execute(self, sql: str, *args: object) -> str:
        """The command tag ("UPDATE 1"); with no args, the simple query protocol."""
        return cast(str, await self._run(self.conn.execute, sql, args))

    async def _run(
        self, send: Callable[..., Awaitable[Any]], sql: str, args: tuple[object, ...]
    ) -> Any:
        """The observers told first, then the statement; a database error told after it."""
        if self.observers:
            self._told(sql, args)
        try:
            return await send(sql, *args)
        except BaseException as exc:
            self._failed(exc)
            raise

    def _told(self, sql: str, args: tuple[object, ...]) -> None:
        for observer in self.observers:
            observer.on_statement(sql, args)

    def _failed(self, exc: BaseException) -> None:
        _tell_error(self.observers, exc)


def _tell_error(observers: list[Observer], exc: BaseException) -> None:
    """The database's errors (a cancelled task is not one)."""
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        for observer in observers:
            observer.on_error(exc)


class Transaction:
    """`async with db.transaction(level) as tx`: a connection from the pool, BEGIN at that
    level; COMMIT when the block ends, ROLLBACK when it raises (also on cancellation). A
    connection whose ROLLBACK fails is closed, never handed out again."""

    __slots__ = ("_conn", "_db", "_isolation")

    def __init__(self, db: Database, isolation: str) -> None:
        self._db = db
        self._isolation = isolation
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> Tx:
        db = self._db
        for last in (False, True):
            conn = await db.acquire()
            for observer in db.observers:
                observer.on_begin(self._isolation)
            try:
                await conn.execute(_begin(self._isolation))
            except BaseException as exc:
                _tell_error(db.observers, exc)
                if not last and _unsent(exc):  # a dead connection: BEGIN on another one
                    conn.terminate()
                await _discard(db, conn)
                if last or not _unsent(exc):
                    raise
                continue
            self._conn = conn
            return Tx(conn, db.observers)
        raise AssertionError("unreachable")

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        db, conn = self._db, self._conn
        assert conn is not None
        self._conn = None
        if kind is None:
            for observer in db.observers:
                observer.on_commit()
            try:
                await conn.execute("COMMIT")
            except BaseException as failed:
                _tell_error(db.observers, failed)
                await _discard(db, conn)
                raise
            await db.release(conn)
            return
        for observer in db.observers:
            observer.on_rollback()
        await _discard(db, conn)


async def _discard(db: Database, conn: asyncpg.Connection) -> None:
    """Roll back whatever is open and give the connection back; a connection that cannot
    (its backend is gone, a statement was cancelled under it) is closed instead."""
    try:
        # A connection whose backend died is already back in the pool (asyncpg releases it
        # as it closes): any call on it raises, and there is nothing to roll back.
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")
    except BaseException:
        with contextlib.suppress(asyncpg.InterfaceError):
            conn.terminate()
    await db.release(conn)


__all__ = [
    "Database",
    "Observer",
    "PoolExhausted",
    "Transaction",
    "Tx",
    "asyncpg_dsn",
]
