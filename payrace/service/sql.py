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

Pool (_Pool, not asyncpg's). Connections are made on demand up to max_size and kept; one
idle for IDLE_LIFETIME_S is closed. A checkout takes the connection returned last (the
warmest) without an await; a return hands it to the oldest waiter or puts it back. Returned
connections are not reset with a query (asyncpg's default is RESET ALL, UNLISTEN, CLOSE ALL,
advisory unlock: a round trip per checkout): the capture path sets no session state and takes
only transaction-scoped advisory locks; an open transaction is rolled back, and a connection
with a cancelled statement still in flight is closed. A connection that died (a killed
backend) is dropped and replaced on a later acquire.

Why not asyncpg.Pool: per checkout and return it builds a proxy object, goes through an
asyncio.Queue, arms and cancels an idle timer, and runs the return in a task of its own
(asyncio.shield): about 19 µs of CPU per pair against about 2 µs here, and a capture takes
two pairs (the intent's and the transaction's).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
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


class Database:
    """Where the capture path's statements run: a pool (opened by open(), closed by close())
    or, with max_size=0, a connection per use, closed after it."""

    def __init__(self, url: str, *, max_size: int, name: str = "capture") -> None:
        self.dsn = asyncpg_dsn(url)
        self.max_size = max_size
        self.name = name
        self.observers: list[Observer] = []
        self._pool: _Pool | None = None

    async def open(self) -> None:
        if self.max_size and self._pool is None:
            self._pool = _Pool(self.dsn, self.max_size)

    async def close(self) -> None:
        """Close every connection; one still checked out after CLOSE_TIMEOUT_S is cut."""
        pool = self._pool
        if pool is None:
            return
        try:
            # Requests still in flight give their connections back meanwhile.
            await pool.close()
        finally:
            self._pool = None

    async def acquire(self) -> asyncpg.Connection:
        if not self.max_size:  # a connection per use, closed after it
            return await _new_connection(self.dsn)
        pool = self._pool
        if pool is None:
            raise RuntimeError(f"the {self.name} pool is not open (Database.open())")
        conn = pool.take()
        if conn is not None:
            return conn
        try:
            return await pool.wait()
        except TimeoutError as exc:
            raise PoolExhausted(
                f"no {self.name} connection came free in {ACQUIRE_TIMEOUT_S:.0f} s"
            ) from exc

    async def release(self, conn: asyncpg.Connection) -> None:
        if not self.max_size:
            await _close(conn)
        elif self._pool is not None:
            await self._pool.give_back(conn)
        else:  # the pool was closed under the request
            await _close(conn)

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


class _Pool:
    """Up to `max_size` connections to `dsn`, made on demand: the idle ones (newest last,
    each with the time it was returned), the checked-out ones, and the acquirers waiting
    for one (oldest first; a waiter is handed a connection, or None: "a slot is free,
    connect")."""

    def __init__(self, dsn: str, max_size: int) -> None:
        self.dsn = dsn
        self.max_size = max_size
        self._idle: list[tuple[asyncpg.Connection, float]] = []
        self._busy: set[asyncpg.Connection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._closing = False
        self._drained: asyncio.Event | None = None

    def take(self) -> asyncpg.Connection | None:
        """An idle connection that is still open, checked out; None when there is none."""
        idle = self._idle
        while idle:
            conn, _ = idle.pop()
            if not conn.is_closed():
                self._busy.add(conn)
                return conn
        return None

    async def wait(self) -> asyncpg.Connection:
        """A new connection while there is room, else the next one returned (or the room
        one leaves); TimeoutError after ACQUIRE_TIMEOUT_S."""
        if self._closing:
            raise asyncpg.InterfaceError("pool is closing")
        if len(self._busy) + self._connecting >= self.max_size:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[asyncpg.Connection | None] = loop.create_future()
            self._waiters.append(waiter)
            timer = loop.call_later(ACQUIRE_TIMEOUT_S, _expire, waiter)
            try:
                handed = await waiter
            except BaseException:
                self._abandon(waiter)
                raise
            finally:
                timer.cancel()
            if handed is not None:
                if not handed.is_closed():
                    return handed
                # Its backend went away before this waiter ran: the slot it held is this
                # waiter's to connect with.
                self._busy.discard(handed)
        return await self._connect()

    async def _connect(self) -> asyncpg.Connection:
        self._connecting += 1
        try:
            conn = await _new_connection(self.dsn)
        except BaseException:
            self._connecting -= 1
            self._room()
            raise
        self._connecting -= 1
        if self._closing:
            await _close(conn)
            self._room()
            raise asyncpg.InterfaceError("pool is closing")
        self._busy.add(conn)
        return conn

    def _abandon(self, waiter: asyncio.Future[asyncpg.Connection | None]) -> None:
        """A waiter that gave up (timed out, cancelled): what it was handed goes on."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            handed = waiter.result()
            if handed is None:
                self._room()
            else:
                self._busy.discard(handed)
                self._put_back(handed)

    async def give_back(self, conn: asyncpg.Connection) -> None:
        if conn not in self._busy:
            return  # given back already (a connection closed under its request)
        if conn.is_closed() or self._closing or _cancelling(conn):
            # Dead, or a statement cancelled under it is still being cancelled: closed
            # rather than waited for (rare: a request cancelled mid-statement).
            self._busy.discard(conn)
            if self._closing:
                await _close(conn)
            else:
                conn.terminate()
            self._room()
            return
        if conn.is_in_transaction():
            try:
                await conn.execute("ROLLBACK")
            except BaseException:
                self._busy.discard(conn)
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
                self._room()
                raise
        self._busy.discard(conn)
        self._put_back(conn)

    def _put_back(self, conn: asyncpg.Connection) -> None:
        if self._closing:  # handed to a waiter that gave up while the pool closed
            conn.terminate()
            self._check_drained()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._busy.add(conn)
                waiter.set_result(conn)
                return
        self._idle.append((conn, time.monotonic()))
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_later(IDLE_LIFETIME_S, self._expire_idle)
        self._check_drained()

    def _room(self) -> None:
        """A slot came free (a connection dropped or never made): the oldest waiter may
        connect."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._check_drained()

    def _expire_idle(self) -> None:
        """Close the connections idle for IDLE_LIFETIME_S; come back for the next one."""
        self._expiry = None
        cutoff = time.monotonic() - IDLE_LIFETIME_S
        # Oldest first: each return appends, each checkout takes from the end.
        expired = 0
        while expired < len(self._idle) and self._idle[expired][1] <= cutoff:
            expired += 1
        old, self._idle = self._idle[:expired], self._idle[expired:]
        for conn, _ in old:
            conn.terminate()
        if self._idle:
            delay = self._idle[0][1] + IDLE_LIFETIME_S - time.monotonic()
            self._expiry = asyncio.get_running_loop().call_later(max(0.0, delay), self._expire_idle)

    def _check_drained(self) -> None:
        if self._drained is not None and not self._busy and not self._connecting:
            self._drained.set()

    async def close(self) -> None:
        """Close the idle connections, wait up to CLOSE_TIMEOUT_S for the checked-out ones
        (each is closed as it comes back), then cut what is left."""
        self._closing = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(asyncpg.InterfaceError("pool is closing"))
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_close(conn) for conn, _ in idle))
        self._drained = asyncio.Event()
        self._check_drained()
        try:
            await asyncio.wait_for(self._drained.wait(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            for conn in list(self._busy):
                conn.terminate()
            self._busy.clear()


def _cancelling(conn: asyncpg.Connection) -> bool:
    """A statement cancelled under the connection is still being cancelled (asyncpg's own
    pool checks the same private flag; a release without it reads False)."""
    check = getattr(conn._protocol, "_is_cancelling", None)
    return bool(check()) if check is not None else False


def _expire(waiter: asyncio.Future[asyncpg.Connection | None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


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
        return cast(list[asyncpg.Record], await self._run(sql, args, 0))

    async def fetchrow(self, sql: str, *args: object) -> asyncpg.Record | None:
        rows = await self._run(sql, args, 1)
        return cast(asyncpg.Record, rows[0]) if rows else None

    async def fetchval(self, sql: str, *args: object) -> Any:
        rows = await self._run(sql, args, 1)
        return rows[0][0] if rows else None

    async def execute(self, sql: str, *args: object) -> str:
        """The command tag ("UPDATE 1"); with no args, the simple query protocol."""
        if not args:
            if self.observers:
                self._told(sql, args)
            try:
                return cast(str, await self.conn.execute(sql))
            except BaseException as exc:
                self._failed(exc)
                raise
        _, tag, _ = await self._run(sql, args, 0, tag=True)
        return cast(bytes, tag).decode()

    async def _run(
        self, sql: str, args: tuple[object, ...], limit: int, *, tag: bool = False
    ) -> Any:
        """The observers told first, then the statement; a database error told after it."""
        if self.observers:
            self._told(sql, args)
        try:
            return await _bind_execute(self.conn, sql, args, limit, tag)
        except BaseException as exc:
            self._failed(exc)
            raise

    def _told(self, sql: str, args: tuple[object, ...]) -> None:
        for observer in self.observers:
            observer.on_statement(sql, args)

    def _failed(self, exc: BaseException) -> None:
        _tell_error(self.observers, exc)


class Connection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, with its prepared statements by SQL text at hand: the objects
    asyncpg's own statement cache holds for it (a statement asyncpg closes, evicted or
    invalidated, is looked up again). An attribute, not a map keyed by connection: a weak
    map's lookup builds a weak reference per statement."""

    __slots__ = ("statements",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.statements: dict[str, Any] = {}


async def _new_connection(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, connection_class=Connection)


def _internals_known() -> bool:
    """Whether this asyncpg is one whose internals _bind_execute was written and tested
    against (0.29-0.32): another release takes asyncpg's public methods instead, slower by
    those microseconds but never broken by a private name that moved."""
    try:
        version = tuple(int(part) for part in asyncpg.__version__.split(".")[:2])
    except ValueError:
        return False
    protocol = getattr(getattr(asyncpg, "protocol", None), "Protocol", None)
    names = ("_get_statement", "_check_open", "_drop_global_statement_cache")
    return (
        (0, 29) <= version <= (0, 32)
        and all(hasattr(asyncpg.Connection, name) for name in names)
        and hasattr(protocol, "bind_execute")
    )


DIRECT = _internals_known()


async def _public_execute(
    conn: asyncpg.Connection, sql: str, args: tuple[object, ...], limit: int, tag: bool
) -> Any:
    """_bind_execute's answers through asyncpg's public methods."""
    if tag:
        return None, (await conn.execute(sql, *args)).encode(), True
    if limit == 1:
        row = await conn.fetchrow(sql, *args)
        return [] if row is None else [row]
    return await conn.fetch(sql, *args)


async def _bind_execute(
    conn: asyncpg.Connection, sql: str, args: tuple[object, ...], limit: int, tag: bool
) -> Any:
    """What Connection.fetch / fetchrow / fetchval / execute(sql, *args) send (Bind, Execute,
    Sync on the statement asyncpg prepared and cached for `sql`; Parse first on its first use
    on this connection), with their schema-cache handling, but without the Python layers
    between them and the protocol (the statement-cache lookup, an exclusive-section guard
    the capture path never needs, the timeout and query-logger plumbing): about 6 µs of CPU
    per statement, five statements per capture.

    Answers the rows (at most `limit`; 0: all), or (rows, command tag, completed) with
    `tag`."""
    if not DIRECT:
        return await _public_execute(conn, sql, args, limit, tag)
    prepared = cast(Connection, conn).statements  # Database's connections are all Connection
    state = prepared.get(sql)
    if state is None or state.closed:
        conn._check_open()  # a closed connection: asyncpg's own InterfaceError
        state = prepared[sql] = await conn._get_statement(sql, None)
    try:
        return await conn._protocol.bind_execute(state, args, "", limit, tag, None)
    except asyncpg.exceptions.OutdatedSchemaCacheError:
        # A type changed under the cached codecs (ALTER TYPE): as asyncpg does.
        prepared.clear()
        await conn.reload_schema_state()
        raise
    except asyncpg.InvalidCachedStatementError:
        # The statement's result type changed (ALTER TABLE): asyncpg drops its cache and,
        # outside a transaction, prepares and runs the statement once more.
        prepared.clear()
        conn._drop_global_statement_cache()
        if conn.is_in_transaction():
            raise
        state = prepared[sql] = await conn._get_statement(sql, None)
        return await conn._protocol.bind_execute(state, args, "", limit, tag, None)


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
