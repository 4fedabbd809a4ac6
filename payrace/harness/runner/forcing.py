"""Forced mode from what the harness owns: row locks in the target's database and capture
calls held at the fake gateway. The target implements nothing (`--force locks`).

    LockForcing     one strategy's trials: a pool of barrier connections to the target's
                    database (the oracle's DSN), the sampler, the gateway; trial() -> Barrier
    Barrier         one trial: takes its rows, arms the gateway, run(sends) fires the requests
                    and releases the stages in capture order, each once the trial is quiescent
                    (or its timeout passed: the trial is then not forced)
    RowLocator      where a payment's rows are, from the oracle's schema description
                    (model.watched); take(): the barrier's script, one round trip
    Sampler         one pg_stat_activity + pg_blocking_pids query, plus the gateway's held
                    calls, shared by every trial that waits for a fresh look (Snapshot)
    attributed()    which waiting backends are blocked, through any chain, by a trial's
                    barrier or by a request it already saw blocked (pure)
    behind_parked() which waiting backends queue behind a parked request no barrier saw (pure)
    STAGES          payment, invoice, order: the order in which a barrier lets go

How a trial is forced. Before any request is sent, the barrier's transaction locks the order
row, SAVEPOINT, the invoice row(s), SAVEPOINT, the payment row, each `FOR UPDATE`. Plain reads
pass; writes, `FOR UPDATE` and foreign-key checks wait. So the incident's flow is held where it
hurts: both requests read `pending`, both block on their write, and they are let go together
(a double capture); with `FOR UPDATE` the requests queue on the read, and the second sees
`captured`. Letting go in capture order — payment (ROLLBACK TO SAVEPOINT releases the locks
taken after it), then invoice, then order (COMMIT) — holds the requests again at each later
row, which is what makes a lock-order inversion (a webhook that locks the invoice before the
payment) meet the callback head on, as a deadlock. A capture call at the fake gateway for the
trial's payment is held too, and released first whenever the trial is quiescent: a service
that reads, captures at the gateway, then writes sends both captures together (the second is
answered Razorpay's "already captured").

Quiescent: every request of the trial still in flight is seen waiting where the harness holds
it — a backend of the target's database whose pg_blocking_pids chain leads to the barrier's
backend (a second waiter on a row waits for the first waiter, not for the barrier), or to a
request's transaction the trial already saw blocked there (it may now be held at the gateway),
or a call held at the gateway — or has finished. Counted, not mapped: the harness does not
know which backend serves which request, so it compares how many it sees held with how many
are in flight. Rows of different trials are disjoint, so a chain that leads to this trial's
barrier is this trial's request.

A request queued behind another that took a lock the barrier never saw (an advisory lock
taken before any barrier row) and is now held at the gateway leads to no barrier. Its chain
ends at a backend parked idle in its transaction (PARKED_MS) that no barrier saw; which trial
that is cannot be told, so such waits count only while there are parked backends enough for
every trial that holds a gateway call and misses requests, one each, and waiters enough for
all of them (otherwise the trials wait, and may time out: not forced).

Forced: no stage had to be let go by its timeout, and at least two requests (all, for a
one-request trial) were seen held at once. The target's own lock timings include the time the
barrier held its rows: measure latency with aligned mode.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import asyncpg
from psycopg import sql

from payrace.harness.errors import UsageError
from payrace.harness.gateway.controls import GatewayControl, LocalGateway
from payrace.harness.model.watched import OracleConfig, WatchedTable

STAGES: tuple[str, ...] = ("payment", "invoice", "order")
BARRIER_APPLICATION_NAME = "payrace-barrier"  # `payrace-…`: the oracle and nemesis skip it
SAMPLER_APPLICATION_NAME = "payrace-forcing"
# A held gateway call waits at most this many barrier timeouts: past them the harness has let
# go of everything or is gone, and the gateway must not stay stuck.
GATEWAY_HOLD_TIMEOUTS = 4
# Each stage waits at most one timeout, and the gateway is let go at most this many times per
# trial (a capture per request, and the retries a target may make): the loop is bounded.
MAX_GATEWAY_RELEASES = 16

T = TypeVar("T")

# A backend idle inside its transaction this long is parked: its client waits on something
# else (a capture held at the gateway), not merely between two statements.
PARKED_MS = 20

SNAPSHOT = f"""
SELECT pid, xact_start,
       CASE WHEN wait_event_type = 'Lock' THEN pg_blocking_pids(pid) END AS blockers,
       state = 'idle in transaction'
         AND clock_timestamp() - state_change > interval '{PARKED_MS} milliseconds' AS parked
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


# -- where the trial's rows are --------------------------------------------------------------


R = TypeVar("R")


async def on_gateway(gateway: GatewayControl, call: Callable[..., R], *args: Any) -> R:
    """A fake in this process answers at once, under its own lock; a remote one is an HTTP
    call, made off the event loop."""
    if isinstance(gateway, LocalGateway):
        return call(*args)
    return await asyncio.to_thread(call, *args)


def _ident(table: str) -> sql.Identifier:
    return sql.Identifier(*table.split(".", 1))


async def _column_type(conn: asyncpg.Connection, table: str, column: str) -> str:
    """The column's type as PostgreSQL spells it, so the payment id (text from JSON) is cast
    to it and the lookup uses the column's index."""
    spelled = await conn.fetchval(
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
        _ident(table).as_string(None),
        column,
    )
    if spelled is None:
        raise UsageError(
            f"forced by locks: no column {column!r} in table {table!r} of the target's "
            "database; --oracle-config must name the tables and columns the service writes"
        )
    return str(spelled)


@dataclass(frozen=True)
class RowLocator:
    """Where one payment's rows are, as the oracle's schema description says; the types of
    the columns the payment id is compared with, so it is cast to them and their indexes
    serve the lookups."""

    schema: OracleConfig
    payment_type: str
    invoice_link_type: str | None  # None: invoices hang off the order

    @classmethod
    async def build(cls, conn: asyncpg.Connection, schema: OracleConfig) -> RowLocator:
        pays = schema.payments
        link = _invoice_link(schema.invoices)
        return cls(
            schema,
            await _column_type(conn, pays.table, pays.id_column),
            None if link.startswith("order:") else
            await _column_type(conn, schema.invoices.table, link),
        )  # fmt: skip

    def take(self, payment_id: str, lock_timeout_ms: int) -> str:
        """One script, one round trip: BEGIN, the order row, SAVEPOINT, the invoice rows,
        SAVEPOINT, the payment row, each FOR UPDATE. Its status is the payment's row count."""
        pays, invoices, orders = self.schema.payments, self.schema.invoices, self.schema.orders
        key = sql.Literal(payment_id)
        by_payment = sql.SQL("{} = {}::text::{}").format(
            sql.Identifier(pays.id_column), key, sql.SQL(self.payment_type)
        )
        order_id = sql.SQL("(SELECT {} FROM {} WHERE {})").format(
            sql.Identifier(self.schema.payment_order_column), _ident(pays.table), by_payment
        )
        link = _invoice_link(invoices)
        if self.invoice_link_type is None:
            invoice_where = sql.SQL("{} = {}").format(
                sql.Identifier(link.removeprefix("order:")), order_id
            )
        else:
            invoice_where = sql.SQL("{} = {}::text::{}").format(
                sql.Identifier(link), key, sql.SQL(self.invoice_link_type)
            )

        def lock(table: WatchedTable, where: sql.Composable) -> sql.Composable:
            return sql.SQL("SELECT 1 FROM {} WHERE {} FOR UPDATE").format(
                _ident(table.table), where
            )

        order_where = sql.SQL("{} = {}").format(sql.Identifier(orders.id_column), order_id)
        return (
            sql.SQL("; ")
            .join(
                [
                    sql.SQL("BEGIN"),
                    # The barrier never waits on a request (its rows are fresh), but if
                    # something else holds them, the trial fails instead of hanging.
                    sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout_ms)),
                    lock(orders, order_where),
                    sql.SQL("SAVEPOINT payrace_invoice"),
                    lock(invoices, invoice_where),
                    sql.SQL("SAVEPOINT payrace_payment"),
                    lock(pays, by_payment),
                ]
            )
            .as_string(None)
        )


def _invoice_link(invoices: WatchedTable) -> str:
    """How an invoice row names its payment: its payment_column, or (when invoices hang off
    orders) "order:<its order_column>"."""
    order_column = getattr(invoices, "order_column", None)
    if invoices.payment_column is None and isinstance(order_column, str):
        return f"order:{order_column}"
    assert invoices.payment_column is not None  # OracleConfig requires one of the two
    return invoices.payment_column


# -- what the database and the gateway show ---------------------------------------------------

Transaction = tuple[int, datetime]  # (backend pid, xact_start): one transaction of a pooled backend


@dataclass(frozen=True)
class Backend:
    xact_start: datetime | None
    blockers: tuple[int, ...]  # empty unless it waits for a lock
    parked: bool = False  # idle in its transaction for PARKED_MS and more


@dataclass(frozen=True)
class Snapshot:
    backends: Mapping[int, Backend]
    held: Mapping[str, int]  # gateway payment id -> capture calls held now


def attributed(snapshot: Snapshot, barrier_pid: int, seen: set[Transaction]) -> set[Transaction]:
    """The waiting transactions whose chain of blockers reaches `barrier_pid`, or a
    transaction in `seen` (one this trial saw blocked before, which may now be held at the
    gateway): what the harness holds of one trial, in the database."""
    backends = snapshot.backends

    def held_by_trial(pid: int) -> bool:
        # A walk, not a recursion with memo: a wait graph may hold a cycle (a deadlock about
        # to be broken), and a verdict cut short by one must not be remembered.
        todo, visited = list(backends[pid].blockers), {pid}
        while todo:
            blocker = todo.pop()
            if blocker in visited:
                continue
            visited.add(blocker)
            if blocker == barrier_pid:
                return True
            other = backends.get(blocker)
            if other is None:
                continue
            if other.xact_start is not None and (blocker, other.xact_start) in seen:
                return True
            todo.extend(other.blockers)
        return False

    return {
        (pid, b.xact_start)
        for pid, b in backends.items()
        if b.blockers and b.xact_start is not None and held_by_trial(pid)
    }


def behind_parked(
    snapshot: Snapshot, barriers: Sequence[tuple[int, set[Transaction]]]
) -> dict[int, set[Transaction]]:
    """Parked backend -> the waiting transactions queued behind it, for what no barrier in
    `barriers` (pid, seen) accounts for: requests queued behind one whose lock the barrier
    never saw (an advisory lock), while that one waits on its client (held at the gateway,
    when a trial holds a call); the parked backend is no barrier's either."""
    accounted: set[Transaction] = set()
    for pid, seen in barriers:
        accounted |= attributed(snapshot, pid, seen) | seen
    backends = snapshot.backends
    groups: dict[int, set[Transaction]] = {}
    for pid, backend in backends.items():
        if not backend.blockers or backend.xact_start is None:
            continue
        if (pid, backend.xact_start) in accounted:
            continue
        todo, visited = list(backend.blockers), {pid}
        while todo:
            blocker = todo.pop()
            other = backends.get(blocker)
            if blocker in visited or other is None:
                continue
            visited.add(blocker)
            if other.parked and not other.blockers and (blocker, other.xact_start) not in accounted:
                groups.setdefault(blocker, set()).add((pid, backend.xact_start))
                break
            todo.extend(other.blockers)
    return groups


class Sampler:
    """Looks at the database (and the gateway's held calls) for every waiting trial at once:
    a trial asking for a fresh look gets the first snapshot that started after it asked."""

    def __init__(self, conn: asyncpg.Connection, gateway: GatewayControl | None) -> None:
        self.conn = conn
        self.gateway = gateway
        self._lock = asyncio.Lock()
        self._started = 0
        self._last = Snapshot({}, {})
        self.samples = 0

    async def _held(self) -> dict[str, int]:
        return await on_gateway(self.gateway, self.gateway.holds) if self.gateway else {}

    async def held(self, gateway_payment_id: str) -> int:
        """Capture calls held for this payment right now, from the gateway alone."""
        return (await self._held()).get(gateway_payment_id, 0)

    async def fresh(self) -> Snapshot:
        wanted = self._started + 1
        async with self._lock:
            if self._started >= wanted:  # another trial's look started after this call
                return self._last
            self._started += 1
            rows, held = await asyncio.gather(self.conn.fetch(SNAPSHOT), self._held())
            self._last = Snapshot(
                {
                    int(r["pid"]): Backend(
                        r["xact_start"], tuple(r["blockers"] or ()), bool(r["parked"])
                    )
                    for r in rows
                },
                held,
            )
            self.samples += 1
            return self._last


# -- one trial --------------------------------------------------------------------------------


@dataclass(eq=False)  # one per trial, told apart by identity (LockForcing's list of peers)
class Barrier:
    """One trial's locks and gateway hold; see the module docstring for when it lets go."""

    conn: asyncpg.Connection
    locator: RowLocator
    sampler: Sampler
    gateway: GatewayControl | None
    payment_id: str
    gateway_payment_id: str
    timeout_s: float
    poll_s: float = 0.002
    timeouts: int = 0  # stages (or gateway releases) let go by the timeout, not by quiescence
    most_held: int = 0  # the most requests seen held at once, at a release
    releases: list[str] = field(default_factory=list)  # what was let go, in order
    _stages: list[str] = field(default_factory=list)
    # Every trial's barrier in flight, this one included (LockForcing keeps the list).
    peers: list[Barrier] = field(default_factory=list)
    # In-flight requests not seen waiting while this trial holds a gateway call (as of its
    # last look): what parked backends may explain.
    unexplained: int = 0
    _seen: set[Transaction] = field(default_factory=set)
    _armed: bool = False
    _open: bool = False
    _size: int = 0

    @property
    def pid(self) -> int:
        return int(self.conn.get_server_pid())

    @property
    def forced(self) -> bool:
        return self.timeouts == 0 and self.most_held >= min(2, self._size)

    async def take(self) -> None:
        """Lock order, SAVEPOINT, invoices, SAVEPOINT, payment: released in reverse."""
        script = self.locator.take(self.payment_id, int(self.timeout_s * 1000))
        self._open = True
        try:
            status = await self.conn.execute(script)
        except asyncpg.DataError as exc:  # the id does not cast to the column's type
            status = f"SELECT 0 ({exc})"
        if status.split()[:2] != ["SELECT", "1"]:
            raise UsageError(
                f"forced by locks: the target's payments table holds no row for the "
                f"payment_id {self.payment_id!r} its POST /orders answered; --oracle-config "
                "must name the table and id column the service writes (or use --mode aligned)"
            )
        self._stages = list(STAGES)
        if self.gateway is not None:
            hold_s = self.timeout_s * GATEWAY_HOLD_TIMEOUTS
            await on_gateway(self.gateway, self.gateway.arm_holds, self.gateway_payment_id, hold_s)
            self._armed = True

    async def run(self, sends: Sequence[Callable[[], Coroutine[Any, Any, T]]]) -> list[T]:
        """Send every request; let go of the stages as the trial settles; their answers."""
        self._size = len(sends)
        tasks = [asyncio.create_task(send()) for send in sends]
        try:
            await self._release_as_settled(tasks)
        except BaseException:
            await self.end()  # nothing may stay held while the requests are stopped
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        await self.end()
        return list(await asyncio.gather(*tasks))

    async def _release_as_settled(self, tasks: list[asyncio.Task[T]]) -> None:
        waiting_since = time.monotonic()
        gateway_releases = 0
        while pending := [t for t in tasks if not t.done()]:
            if not self._stages:
                if not self._armed:
                    await asyncio.wait(pending)
                    return
                # Every row is let go: only a gateway call may still come to be held, so ask
                # the gateway alone (the database is looked at again once one is).
                if not await self.sampler.held(self.gateway_payment_id):
                    waiting_since = time.monotonic()
                    await asyncio.wait(pending, timeout=self.poll_s)
                    continue
            snapshot = await self.sampler.fresh()
            in_flight = sum(not t.done() for t in tasks)
            blocked = attributed(snapshot, self.pid, self._seen)
            self._seen |= blocked
            held = snapshot.held.get(self.gateway_payment_id, 0)
            waiting = len(blocked) + held
            self.unexplained = in_flight - waiting if held else 0
            if self.unexplained > 0 and self._covered_by_parked(snapshot):
                waiting = in_flight
            settled = waiting >= in_flight
            timed_out = time.monotonic() - waiting_since > self.timeout_s
            if not settled and not timed_out:
                # Woken early by a request that finishes: it may be the one waited for.
                await asyncio.wait(pending, timeout=self.poll_s)
                continue
            if held and gateway_releases < MAX_GATEWAY_RELEASES:
                gateway_releases += 1
                await self._let_go("gateway")
            elif held:
                await self._disarm()  # past the bound on releases: the rest runs freely
            elif self._stages:
                await self._let_go(self._stages.pop(0))
            else:
                # Nothing is held by the harness any more: the requests run on their own, or
                # wait on one another (a deadlock, which PostgreSQL breaks).
                waiting_since = time.monotonic()
                await asyncio.wait(pending, timeout=self.poll_s)
                continue
            if settled:
                self.most_held = max(self.most_held, min(waiting, in_flight))
            else:
                self.timeouts += 1
            waiting_since = time.monotonic()

    def _covered_by_parked(self, snapshot: Snapshot) -> bool:
        """Requests of trials holding a gateway call, unseen by any barrier, may be queued
        behind the held requests' own locks (parked backends). Which trial a parked backend
        is cannot be told, so this trial counts them only when there are parked backends
        enough for every such trial, one each, and waiters enough for all."""
        short = [b for b in self.peers if b.unexplained > 0]
        groups = behind_parked(snapshot, [(b.pid, b._seen) for b in self.peers])
        return len(groups) >= len(short) and sum(map(len, groups.values())) >= sum(
            b.unexplained for b in short
        )

    async def _let_go(self, what: str) -> None:
        self.releases.append(what)
        self.unexplained = 0
        if what == "gateway":
            assert self.gateway is not None
            await on_gateway(self.gateway, self.gateway.release_holds, self.gateway_payment_id)
        elif what == "payment":
            await self.conn.execute("ROLLBACK TO SAVEPOINT payrace_payment")
        elif what == "invoice":
            await self.conn.execute("ROLLBACK TO SAVEPOINT payrace_invoice")
        else:
            await self.conn.execute("COMMIT")
            self._open = False

    async def _disarm(self) -> None:
        if self._armed and self.gateway is not None:
            self._armed = False
            await on_gateway(self.gateway, self.gateway.disarm_holds, self.gateway_payment_id)

    async def end(self) -> None:
        """Let go of everything still held (idempotent)."""
        try:
            await self._disarm()
        finally:
            self._stages = []
            if self._open:
                self._open = False
                try:
                    await self.conn.execute("ROLLBACK")
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    # Interrupted mid-statement: the server ends the transaction, and lets
                    # go of its locks, with the session; the pool discards the connection.
                    self.conn.terminate()


# -- per strategy -----------------------------------------------------------------------------


class LockForcing:
    """The barriers of one strategy's trials, on connections of the harness's own."""

    def __init__(
        self,
        dsn: str,
        schema: OracleConfig,
        gateway: GatewayControl | None,
        *,
        timeout_s: float,
        concurrency: int,
        poll_s: float = 0.002,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.gateway = gateway
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.poll_s = poll_s
        self._pool: asyncpg.Pool | None = None
        self._conn: asyncpg.Connection | None = None
        self._sampler: Sampler | None = None
        self._locator: RowLocator | None = None
        self._barriers: list[Barrier] = []

    async def __aenter__(self) -> LockForcing:
        try:
            self._conn = await asyncpg.connect(
                self.dsn, server_settings={"application_name": SAMPLER_APPLICATION_NAME}
            )
            self._locator = await RowLocator.build(self._conn, self.schema)
            self._sampler = Sampler(self._conn, self.gateway)
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=0,
                max_size=self.concurrency,
                server_settings={"application_name": BARRIER_APPLICATION_NAME},
            )
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        try:
            if self._pool is not None:
                await self._pool.close()
        finally:
            if self._conn is not None:
                await self._conn.close()

    @asynccontextmanager
    async def trial(self, payment_id: Any, gateway_payment_id: str) -> AsyncIterator[Barrier]:
        """A barrier over this payment's rows, taken; let go of on the way out."""
        assert self._pool is not None and self._sampler is not None and self._locator
        async with self._pool.acquire() as conn:
            barrier = Barrier(
                conn,
                self._locator,
                self._sampler,
                self.gateway,
                str(payment_id),
                gateway_payment_id,
                self.timeout_s,
                self.poll_s,
                peers=self._barriers,
            )
            self._barriers.append(barrier)
            try:
                await barrier.take()
                yield barrier
            finally:
                self._barriers.remove(barrier)
                await barrier.end()
