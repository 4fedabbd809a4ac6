"""Forced mode from what the harness owns: row locks in the target's database and capture
calls held at the fake gateway. The target implements nothing (`--force locks`).

    LockForcing     one strategy's trials: a pool of barrier connections to the target's
                    database (the oracle's DSN), the sampler, the gateway; trial() -> Barrier
    Barrier         one trial: takes its rows, arms the gateway, run(sends) fires the requests
                    and releases the stages in capture order, each once the trial is quiescent
                    (or its timeout passed: the trial is then not forced)
    RowLocator      the barrier's SELECT ... FOR UPDATE statements, built from the oracle's
                    schema description (model.watched): payment, its invoices, its order
    Sampler         one pg_stat_activity + pg_blocking_pids query, plus the gateway's held
                    calls, shared by every trial that waits for a fresh look (Snapshot)
    attributed()    which waiting backends are blocked, through any chain, by a trial's
                    barrier or by a request it already saw blocked (pure)
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

Forced: no stage had to be let go by its timeout, and at least two requests (all, for a
one-request trial) were seen held at once. A request blocked behind another that took a lock
the barrier never saw (an advisory lock taken before any barrier row) and is held at the
gateway cannot be attributed: that trial waits out its timeout and is counted not forced.
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
from payrace.harness.gateway.controls import GatewayControl
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

SNAPSHOT = """
SELECT pid, xact_start,
       CASE WHEN wait_event_type = 'Lock' THEN pg_blocking_pids(pid) END AS blockers
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


# -- where the trial's rows are --------------------------------------------------------------


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
    """The barrier's statements; each takes the payment id as text in $1."""

    payment: str
    invoices: str
    order: str

    @classmethod
    async def build(cls, conn: asyncpg.Connection, schema: OracleConfig) -> RowLocator:
        pays, invoices, orders = schema.payments, schema.invoices, schema.orders
        pay_type = await _column_type(conn, pays.table, pays.id_column)
        by_payment = sql.SQL("{} = $1::text::{}").format(
            sql.Identifier(pays.id_column), sql.SQL(pay_type)
        )
        order_id = sql.SQL("(SELECT {} FROM {} WHERE {})").format(
            sql.Identifier(schema.payment_order_column), _ident(pays.table), by_payment
        )
        invoice_link = _invoice_link(invoices)
        if invoice_link.startswith("order:"):
            invoice_where = sql.SQL("{} = {}").format(
                sql.Identifier(invoice_link.removeprefix("order:")), order_id
            )
        else:
            link_type = await _column_type(conn, invoices.table, invoice_link)
            invoice_where = sql.SQL("{} = $1::text::{}").format(
                sql.Identifier(invoice_link), sql.SQL(link_type)
            )

        def lock(table: WatchedTable, where: sql.Composable) -> str:
            return (
                sql.SQL("SELECT 1 FROM {} WHERE {} FOR UPDATE")
                .format(_ident(table.table), where)
                .as_string(None)
            )

        return cls(
            payment=lock(pays, by_payment),
            invoices=lock(invoices, invoice_where),
            order=lock(
                orders, sql.SQL("{} = {}").format(sql.Identifier(orders.id_column), order_id)
            ),
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


@dataclass(frozen=True)
class Snapshot:
    backends: Mapping[int, Backend]
    held: Mapping[str, int]  # gateway payment id -> capture calls held now


def attributed(snapshot: Snapshot, barrier_pid: int, seen: set[Transaction]) -> set[Transaction]:
    """The waiting transactions whose chain of blockers reaches `barrier_pid`, or a
    transaction in `seen` (one this trial saw blocked before, which may now be held at the
    gateway): what the harness holds of one trial, in the database."""
    backends = snapshot.backends
    verdicts: dict[int, bool] = {}

    def held_by_trial(pid: int, path: frozenset[int]) -> bool:
        if pid in verdicts:
            return verdicts[pid]
        backend = backends.get(pid)
        found = False
        for blocker in backend.blockers if backend is not None else ():
            other = backends.get(blocker)
            if blocker == barrier_pid or (
                other is not None
                and other.xact_start is not None
                and (blocker, other.xact_start) in seen
            ):
                found = True
                break
            if blocker not in path and held_by_trial(blocker, path | {blocker}):
                found = True
                break
        verdicts[pid] = found
        return found

    return {
        (pid, b.xact_start)
        for pid, b in backends.items()
        if b.blockers and b.xact_start is not None and held_by_trial(pid, frozenset({pid}))
    }


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

    async def fresh(self) -> Snapshot:
        wanted = self._started + 1
        async with self._lock:
            if self._started >= wanted:  # another trial's look started after this call
                return self._last
            self._started += 1
            rows = await self.conn.fetch(SNAPSHOT)
            held = await asyncio.to_thread(self.gateway.holds) if self.gateway else {}
            self._last = Snapshot(
                {int(r["pid"]): Backend(r["xact_start"], tuple(r["blockers"] or ())) for r in rows},
                held,
            )
            self.samples += 1
            return self._last


# -- one trial --------------------------------------------------------------------------------


@dataclass
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
    rows: dict[str, int] = field(default_factory=dict)  # rows locked per stage
    _stages: list[str] = field(default_factory=list)
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
        await self.conn.execute("BEGIN")
        self._open = True
        # The barrier never waits on a request (its rows are fresh), but if something else
        # holds them, the trial fails instead of hanging.
        await self.conn.execute(f"SET LOCAL lock_timeout = {int(self.timeout_s * 1000)}")
        self.rows["order"] = len(await self.conn.fetch(self.locator.order, self.payment_id))
        await self.conn.execute("SAVEPOINT payrace_invoice")
        self.rows["invoice"] = len(await self.conn.fetch(self.locator.invoices, self.payment_id))
        await self.conn.execute("SAVEPOINT payrace_payment")
        self.rows["payment"] = len(await self.conn.fetch(self.locator.payment, self.payment_id))
        if self.rows["payment"] != 1:
            raise UsageError(
                f"forced by locks: the target's payments table holds no row for the "
                f"payment_id {self.payment_id!r} its POST /orders answered; --oracle-config "
                "must name the table and id column the service writes (or use --mode aligned)"
            )
        self._stages = list(STAGES)
        if self.gateway is not None:
            hold_s = self.timeout_s * GATEWAY_HOLD_TIMEOUTS
            await asyncio.to_thread(self.gateway.arm_holds, self.gateway_payment_id, hold_s)
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
        while any(not t.done() for t in tasks):
            if not self._stages and not self._armed:
                await asyncio.wait(tasks)
                return
            snapshot = await self.sampler.fresh()
            in_flight = sum(not t.done() for t in tasks)
            blocked = attributed(snapshot, self.pid, self._seen)
            self._seen |= blocked
            held = snapshot.held.get(self.gateway_payment_id, 0)
            settled = len(blocked) + held >= in_flight
            timed_out = time.monotonic() - waiting_since > self.timeout_s
            if not settled and not timed_out:
                await asyncio.sleep(self.poll_s)
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
                # wait on one another (a deadlock, which PostgreSQL breaks). Only a gateway
                # call may still arrive to be held.
                waiting_since = time.monotonic()
                await asyncio.sleep(self.poll_s)
                continue
            if settled:
                self.most_held = max(self.most_held, min(len(blocked) + held, in_flight))
            else:
                self.timeouts += 1
            waiting_since = time.monotonic()

    async def _let_go(self, what: str) -> None:
        self.releases.append(what)
        if what == "gateway":
            assert self.gateway is not None
            await asyncio.to_thread(self.gateway.release_holds, self.gateway_payment_id)
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
            await asyncio.to_thread(self.gateway.disarm_holds, self.gateway_payment_id)

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
            )
            try:
                await barrier.take()
                yield barrier
            finally:
                await barrier.end()
