"""The oracle: what the harness sees with its own eyes, independent of the target's self-report.

    (what it watches, WatchedTable / OracleConfig, and OracleError: model.watched)
    install()      schema payrace_audit: table log, function record(), one trigger per table
    uninstall()    drops the triggers and the schema
    baseline()     before a run: last audit id and the deadlock counter  -> Baseline
    observe()      after a run, scoped to its payments                   -> Observation
    statuses()     the payments' statuses now (runner.reconcile polls it while it waits)
    ├── audit       AuditRow per INSERT / UPDATE / DELETE since the baseline
    ├── payments    PaymentState: final status of each payment, its invoice and its order
    ├── gateway_*   the fake gateway's capture calls per gateway payment id
    ├── deadlocks   pg_stat_database.deadlocks delta, and whether that reading has settled
    └── cycles      the wait-for cycles the lock sampler saw, each member's fate read
                    (model.deadlocks ties them to payments through the audit rows)

Every read and the install survive a lost connection (a nemesis killing backends, a
restarted server): they start again on a new connection for up to RECONNECT_FOR_S, so the
harness outlives the faults it injects. A login the server refuses is not retried.

The target's answers say what it *thinks* happened. The audit triggers record what reached
the database: an AFTER ... FOR EACH ROW trigger runs inside the writing transaction, so a
row of `payrace_audit.log` exists iff the write committed, stamped with the writer's txid
and backend pid. Two transactions that each set `payments.status = 'captured'` leave two
rows even when the second overwrote captured with captured (READ COMMITTED re-evaluates the
UPDATE on the committed row and writes it again) — the double capture that the final
state alone can never show.

Every INSERT, UPDATE and DELETE is logged with the status before and after and the columns
the UPDATE changed. The naive flow's second writer shows why UPDATEs that leave the status
as it was must be kept: it reads the invoice after the first writer committed, so its ORM
drops the unchanged status from the SET list and only re-stamps `paid_at` — still a second
"mark paid". A target that touches done rows for other reasons (an `updated_at` bump on an
idempotent repeat) names those columns in `WatchedTable.ignore_columns`, and an UPDATE that
changed nothing else is then not counted as a write of the done status.

Orders, and invoices that hang off orders (`[invoices] order_column`), are logged with their
order id and mapped to their payment through payments.<payment_order_column> when observed.
An invoice link that names the wrong table (a payment_column that is a foreign key to the
orders table, or the reverse) is refused at install.

The trigger function is SECURITY DEFINER with a fixed search_path, so the target's database
role needs no grants on payrace_audit; ids must be integers (checked at install, so a
trigger can never fail the target's write at run time). The triggers add one INSERT to
every write of the target's transactions, so lock hold times measured with the oracle
installed include it (microseconds, the same for every strategy).

Deadlocks: the pg_stat_database counter, when a zero reading of it can be trusted (it
*settles*), and the wait-for cycles that tie a deadlock to its payments are model.deadlocks'
(observe() reads them all; `deadlocks_settled` False makes a zero delta "unknown").
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

import psycopg
from psycopg import sql

from payrace.harness.model import deadlocks
from payrace.harness.model.deadlocks import LockCycle
from payrace.harness.model.watched import OracleConfig, OracleError
from payrace.postgres import libpq_url, refused_for_good

SCHEMA = "payrace_audit"
TRIGGER = "payrace_audit"
APPLICATION_NAME = "payrace-oracle"
_LOCK_TIMEOUT = "10s"
# How long the oracle keeps trying a database that went away (restart, killed connection):
# a restart takes seconds; past this the database is down and the run says so.
RECONNECT_FOR_S = 30.0

P = ParamSpec("P")
R = TypeVar("R")


def _survives_restarts(fn: Callable[P, R]) -> Callable[P, R]:
    """Run `fn` again on a new connection after a lost one, with backoff, for up to
    RECONNECT_FOR_S. Only for what is safe to repeat: reads, and the idempotent install."""

    @functools.wraps(fn)
    def again(*args: P.args, **kwargs: P.kwargs) -> R:
        started = time.monotonic()
        delay = 0.1
        while True:
            try:
                return fn(*args, **kwargs)
            except psycopg.OperationalError as exc:
                if not _connection_lost(exc) or time.monotonic() - started > RECONNECT_FOR_S:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    return again


def _connection_lost(exc: psycopg.OperationalError) -> bool:
    """A lost or refused connection (no SQLSTATE: the socket; class 08: connection
    exception; class 57: the server shut the session down or is starting), never a
    statement's own failure such as a lock timeout, nor a refused login."""
    state = exc.sqlstate
    lost = state is None or state.startswith(("08", "57"))
    return lost and not refused_for_good(str(exc))


# -- what observe() hands the checkers -----------------------------------------------------


@dataclass(frozen=True)
class AuditRow:
    id: int
    table: str  # logical: "payments" | "invoices" | "orders"
    row_id: int
    payment_id: int | None
    op: str  # "INSERT" | "UPDATE" | "DELETE"
    old_status: str | None
    new_status: str | None
    txid: int
    backend_pid: int
    at: datetime
    changed: tuple[str, ...] = ()  # UPDATE: the columns whose value changed

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "table": self.table,
            "row_id": self.row_id,
            "payment_id": self.payment_id,
            "op": self.op,
            "old_status": self.old_status,
            "new_status": self.new_status,
            "txid": self.txid,
            "backend_pid": self.backend_pid,
            "at": self.at.isoformat(),
            "changed": list(self.changed),
        }


@dataclass(frozen=True)
class PaymentState:
    payment_id: int
    status: str
    gateway_payment_id: str | None
    invoice_status: str | None
    order_status: str | None


@dataclass(frozen=True)
class Baseline:
    deadlocks: int
    audit_id: int
    # pg_stat_database.stats_reset: a reset between baseline and observe voids the delta.
    stats_reset: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        reset = self.stats_reset.isoformat() if self.stats_reset is not None else None
        return {"deadlocks": self.deadlocks, "audit_id": self.audit_id, "stats_reset": reset}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Baseline:
        reset = doc.get("stats_reset")
        return cls(
            deadlocks=int(doc["deadlocks"]),
            audit_id=int(doc["audit_id"]),
            stats_reset=datetime.fromisoformat(reset) if isinstance(reset, str) else None,
        )


@dataclass(frozen=True)
class Observation:
    audit: tuple[AuditRow, ...]
    payments: dict[int, PaymentState]  # final states of the payments in scope
    gateway_captures: dict[str, int]  # gateway payment id -> capture calls
    gateway_accepted: dict[str, int]  # gateway payment id -> captures the gateway accepted
    deadlocks: int  # pg_stat_database.deadlocks delta since the baseline
    config: OracleConfig
    # False when a zero delta may be a deadlock not yet flushed (see the module docstring).
    deadlocks_settled: bool = True
    deadlock_note: str = ""
    # What the lock sampler saw (model.lockwatch), members' fates read; cycles_watched says
    # whether a sampler ran at all (no cycles from no sampler proves nothing).
    cycles: tuple[LockCycle, ...] = ()
    cycles_watched: bool = False
    # Gateway payment ids whose status at the gateway is captured (by a capture call or its
    # own automatic capture); gateway_observed says the gateway was read at all.
    gateway_captured: frozenset[str] = frozenset()
    gateway_observed: bool = False
    # Gateway payment id -> capture calls the harness's own fault injection failed
    # (gateway-errors): a client sending the capture again after one is doing the right thing.
    gateway_injected: dict[str, int] = field(default_factory=dict)


# -- connection ---------------------------------------------------------------------------


@contextmanager
def _connect(url: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    # autocommit: every statement of a read is its own transaction, so stats views are fresh.
    # A libpq key=value conninfo (host=... dbname=...) is taken as is; a URL in any spelling
    # a user pastes (postgresql+asyncpg://, postgres://) is made libpq's.
    conninfo = libpq_url(url) if "://" in url else url
    with psycopg.connect(conninfo, autocommit=True, application_name=APPLICATION_NAME) as conn:
        yield conn


# -- install / uninstall ------------------------------------------------------------------

_FUNCTION = """
CREATE OR REPLACE FUNCTION payrace_audit.record() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
-- TG_ARGV: 0 logical table, 1 id column, 2 status column, 3 payment column ('' = none),
-- 4 order column ('' or absent = none: triggers of an older install pass four arguments)
DECLARE
    cur jsonb := CASE WHEN TG_OP = 'DELETE' THEN to_jsonb(OLD) ELSE to_jsonb(NEW) END;
    prev jsonb := CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE to_jsonb(OLD) END;
BEGIN
    INSERT INTO payrace_audit.log
        (tbl, relname, row_id, payment_id, order_id, op, old_status, new_status, changed)
    VALUES (
        TG_ARGV[0],
        TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
        (cur ->> TG_ARGV[1])::bigint,
        CASE WHEN TG_ARGV[3] = '' THEN NULL ELSE (cur ->> TG_ARGV[3])::bigint END,
        CASE WHEN coalesce(TG_ARGV[4], '') = '' THEN NULL ELSE (cur ->> TG_ARGV[4])::bigint END,
        TG_OP,
        prev ->> TG_ARGV[2],
        CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE cur ->> TG_ARGV[2] END,
        CASE WHEN TG_OP = 'UPDATE' THEN ARRAY(
            SELECT n.key FROM jsonb_each(cur) n
            WHERE n.value IS DISTINCT FROM prev -> n.key ORDER BY n.key
        ) END
    );
    RETURN NULL;
END
$fn$
"""

_LOG_TABLE = """
CREATE TABLE IF NOT EXISTS payrace_audit.log (
    id          bigserial PRIMARY KEY,
    tbl         text NOT NULL,
    relname     text NOT NULL,
    row_id      bigint NOT NULL,
    payment_id  bigint,
    order_id    bigint,
    op          text NOT NULL,
    old_status  text,
    new_status  text,
    txid        bigint NOT NULL DEFAULT txid_current(),
    backend_pid int NOT NULL DEFAULT pg_backend_pid(),
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    changed     text[]
)
"""


@_survives_restarts
def install(url: str, config: OracleConfig = OracleConfig.reference()) -> None:
    """Create the audit schema and (re)create the triggers; safe to repeat and to race.

    The watched tables must exist (create the target's schema first). A later install with
    another config replaces the triggers it names."""
    with _connect(url) as conn, conn.transaction():
        # Two installers at once would race on CREATE SCHEMA / CREATE TRIGGER; the second
        # waits here and then finds everything in place.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('payrace.oracle.install'))")
        # CREATE TRIGGER waits for the table's open transactions; never hang a run on it.
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(_LOCK_TIMEOUT)))
        _validate_schema(conn, config)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
        conn.execute(_LOG_TABLE)
        # A log an older install created lacks the order link.
        conn.execute("ALTER TABLE payrace_audit.log ADD COLUMN IF NOT EXISTS order_id bigint")
        conn.execute(
            "CREATE INDEX IF NOT EXISTS log_payment_idx ON payrace_audit.log (tbl, payment_id)"
        )
        conn.execute(_FUNCTION)
        for logical, wt in config.watched():
            payment_column = wt.id_column if logical == "payments" else wt.payment_column
            # Orders, and invoices that hang off orders, reach their payment through
            # payments.<payment_order_column> when observed: the log keeps their order id.
            order_column = wt.id_column if logical == "orders" else wt.order_column
            args = (
                logical,
                wt.id_column,
                wt.status_column,
                payment_column or "",
                order_column or "",
            )
            conn.execute(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                    sql.Identifier(TRIGGER), wt.identifier()
                )
            )
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} "
                    "FOR EACH ROW EXECUTE FUNCTION payrace_audit.record({})"
                ).format(
                    sql.Identifier(TRIGGER),
                    wt.identifier(),
                    sql.SQL(", ").join(sql.Literal(a) for a in args),
                )
            )


def uninstall(url: str, config: OracleConfig = OracleConfig.reference()) -> None:
    """Drop the triggers and the audit schema (with its rows); a no-op when not installed."""
    with _connect(url) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('payrace.oracle.install'))")
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(_LOCK_TIMEOUT)))
        for _, wt in config.watched():
            if _regclass(conn, wt.table) is not None:
                conn.execute(
                    sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                        sql.Identifier(TRIGGER), wt.identifier()
                    )
                )
        # CASCADE also takes triggers an install with another config left on other tables.
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))


def installed(url: str) -> bool:
    with _connect(url) as conn:
        return _regclass(conn, f"{SCHEMA}.log") is not None


def _regclass(conn: psycopg.Connection[tuple[Any, ...]], table: str) -> int | None:
    ident = sql.Identifier(*table.split(".", 1)).as_string(conn)
    row = conn.execute("SELECT to_regclass(%s)::oid", (ident,)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


_INTEGER_TYPES = {"smallint", "integer", "bigint"}


def _validate_schema(conn: psycopg.Connection[tuple[Any, ...]], config: OracleConfig) -> None:
    """Fail at install, naming the config key, rather than fail the target's writes later."""
    for logical, wt in config.watched():
        oid = _regclass(conn, wt.table)
        if oid is None:
            raise OracleError(
                f"{logical}.table = {wt.table!r}: no such table in this database "
                "(create the target's schema before installing the oracle)"
            )
        columns = dict(
            conn.execute(
                "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
                "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
                (oid,),
            ).fetchall()
        )
        wanted = {"id_column": wt.id_column, "status_column": wt.status_column}
        wanted |= {f"ignore_columns[{i}]": c for i, c in enumerate(wt.ignore_columns)}
        if wt.payment_column is not None:
            wanted["payment_column"] = wt.payment_column
        if wt.order_column is not None:
            wanted["order_column"] = wt.order_column
        if logical == "payments":
            wanted["payment_order_column"] = config.payment_order_column
            wanted["gateway_payment_column"] = config.gateway_payment_column
        for key, column in wanted.items():
            prefix = key if key.startswith(("payment_order", "gateway")) else f"{logical}.{key}"
            if column not in columns:
                raise OracleError(
                    f"{prefix} = {column!r}: table {wt.table} has no such column "
                    f"(it has {sorted(columns)})"
                )
            integer = ("id_column", "payment_column", "order_column")
            if key in integer and columns[column] not in _INTEGER_TYPES:
                raise OracleError(
                    f"{prefix} = {column!r}: the oracle needs an integer id column, "
                    f"{wt.table}.{column} is {columns[column]}"
                )
        if logical == "invoices":
            _check_invoice_link(conn, config, oid)


def _check_invoice_link(
    conn: psycopg.Connection[tuple[Any, ...]], config: OracleConfig, invoices_oid: int
) -> None:
    """An invoice link that names the wrong table: a payment_column that is a foreign key to
    the orders table (or an order_column to payments) would map every invoice to the wrong
    payment, silently. Only a declared foreign key tells; a bare column cannot be judged."""
    inv = config.invoices
    column = inv.payment_column or inv.order_column
    key = "payment_column" if inv.payment_column is not None else "order_column"
    referenced = {
        int(row[0])
        for row in conn.execute(
            "SELECT c.confrelid FROM pg_constraint c "
            "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1] "
            "WHERE c.contype = 'f' AND c.conrelid = %s AND cardinality(c.conkey) = 1 "
            "AND a.attname = %s",
            (invoices_oid, column),
        ).fetchall()
    }
    wrong, right, other = (
        (config.orders, "order_column", "orders")
        if key == "payment_column"
        else (config.payments, "payment_column", "payments")
    )
    if _regclass(conn, wrong.table) in referenced:
        holds = "an order id" if other == "orders" else "a payment id"
        raise OracleError(
            f"invoices.{key} = {column!r}: {inv.table}.{column} is a foreign key to the "
            f"{other} table {wrong.table}, so it holds {holds}; describe it as "
            f"invoices.{right} = {column!r} (and leave invoices.{key} unset)"
        )


# -- baseline / observe -------------------------------------------------------------------


@_survives_restarts
def baseline(url: str) -> Baseline:
    """Where the run starts: the last audit id handed out and the deadlock counter."""
    with _connect(url) as conn:
        count, stats_reset = deadlocks.read_counter(conn)
        return Baseline(deadlocks=count, audit_id=_last_audit_id(conn), stats_reset=stats_reset)


def _last_audit_id(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    if _regclass(conn, f"{SCHEMA}.log") is None:
        return 0
    # The sequence, not max(id): an id handed to a transaction still open now belongs to the
    # past even if it commits during the run.
    row = conn.execute("SELECT last_value, is_called FROM payrace_audit.log_id_seq").fetchone()
    assert row is not None
    return int(row[0]) if row[1] else 0


def settled(
    url: str, since: Baseline, obs: Observation, *, wait_s: float, violated: bool
) -> Observation:
    """`obs` (its deadlock count read once, not waited for) with the count settled: waited
    for up to `wait_s` (deadlocks_since). A run `violated` already is not kept waiting, since
    no count can change its verdict: `obs` as read, its note saying why (payrace run and
    payrace load judge a running target this way)."""
    if violated:
        return replace(obs, deadlock_note=deadlocks.not_waited(wait_s, obs.deadlock_note))
    delta, done, note = deadlocks_since(url, since, settle_timeout_s=wait_s)
    return replace(obs, deadlocks=delta, deadlocks_settled=done, deadlock_note=note)


@_survives_restarts
def deadlocks_since(
    url: str, since: Baseline, *, settle_timeout_s: float = 2.0
) -> tuple[int, bool, str]:
    """The deadlock delta alone, read as observe() reads it: (delta, settled, note).

    For a caller that observed while the target was still connected and can read again once
    the target has closed its pool (payrace load, after stopping the service): its backends
    flush their counts on exit, so the reading settles within `settle_timeout_s`."""
    with _connect(url) as conn:
        return deadlocks.settled_delta(conn, since.deadlocks, since.stats_reset, settle_timeout_s)


@_survives_restarts
def observe(
    url: str,
    config: OracleConfig = OracleConfig.reference(),
    *,
    since: Baseline,
    payment_ids: Collection[int] | None = None,
    gateway_counters: Mapping[str, Mapping[str, int]] | None = None,
    gateway_payment_ids: Collection[str] = (),
    settle_timeout_s: float = 2.0,
    lock_cycles: Sequence[LockCycle] | None = None,
) -> Observation:
    """What happened since `since`, for `payment_ids` (None: every payment the audit names).

    `gateway_counters` is FakeRazorpay.counters() (or its JSON from GET /_fake/counters).
    With `payment_ids` given, counters are kept for the gateway ids those payments hold in
    the database plus `gateway_payment_ids` — pass the ids the run authorized so a capture
    the gateway accepted but the database never recorded still reaches the checkers.
    `settle_timeout_s` is how long to wait for the deadlock reading to settle; it returns as
    soon as it has. The default covers a target that has just closed its pool (its backends
    take a moment to exit); a target still connected needs 12 s, or 0 to not wait.
    `lock_cycles` are the wait-for cycles a LockWatch recorded during the run (None: no
    sampler ran); each member's transaction status is read here.
    """
    scope = None if payment_ids is None else frozenset(int(p) for p in payment_ids)
    with _connect(url) as conn:
        if _regclass(conn, f"{SCHEMA}.log") is None:
            raise OracleError("the oracle is not installed in this database; call install() first")
        audit = _audit_rows(conn, config, since.audit_id, scope)
        ids = scope if scope is not None else {r.payment_id for r in audit if r.payment_id}
        states = _payment_states(conn, config, sorted(ids))
        delta, settled, note = deadlocks.settled_delta(
            conn, since.deadlocks, since.stats_reset, settle_timeout_s
        )
        cycles = deadlocks.verify(conn, lock_cycles or ())
    captures, accepted, at_gateway = _gateway(gateway_counters, scope, states, gateway_payment_ids)
    injected = {
        k: int(v) for k, v in (gateway_counters or {}).get("injected", {}).items() if k in captures
    }
    return Observation(
        audit=audit,
        payments=states,
        gateway_captures=captures,
        gateway_accepted=accepted,
        gateway_injected=injected,
        deadlocks=delta,
        config=config,
        deadlocks_settled=settled,
        deadlock_note=note,
        cycles=cycles,
        cycles_watched=lock_cycles is not None,
        gateway_captured=frozenset(at_gateway),
        # An older gateway's counters have no "captured": not observed, not "never captured".
        gateway_observed=gateway_counters is not None and "captured" in gateway_counters,
    )


@_survives_restarts
def statuses(url: str, config: OracleConfig, payment_ids: Collection[int]) -> dict[int, str | None]:
    """Each payment's status in the target's database now (a payment with no row: absent)."""
    with _connect(url) as conn:
        states = _payment_states(conn, config, sorted(int(p) for p in payment_ids))
    return {p: s.status for p, s in states.items()}


def _audit_rows(
    conn: psycopg.Connection[tuple[Any, ...]],
    config: OracleConfig,
    after_id: int,
    scope: frozenset[int] | None,
) -> tuple[AuditRow, ...]:
    pay = config.payments
    # Order rows, and invoices that hang off orders, carry an order id instead of a payment
    # id; map them through payments.<order column> now (an order row logged by an older
    # install has only its row id). With a scope, prefer the scoped payment of an order that
    # has several.
    query = sql.SQL(
        """
        SELECT l.id, l.tbl, l.row_id,
               CASE WHEN l.payment_id IS NULL THEN (
                   SELECT min(p.{pid}) FROM {payments} p
                   WHERE p.{poid} = coalesce(
                             l.order_id, CASE WHEN l.tbl = 'orders' THEN l.row_id END)
                     AND (%(scope)s::bigint[] IS NULL OR p.{pid} = ANY(%(scope)s::bigint[]))
               ) ELSE l.payment_id END,
               l.op, l.old_status, l.new_status, l.txid, l.backend_pid, l.at,
               coalesce(l.changed, '{{}}')
        FROM payrace_audit.log l
        WHERE l.id > %(after)s
        ORDER BY l.id
        """
    ).format(
        pid=sql.Identifier(pay.id_column),
        payments=pay.identifier(),
        poid=sql.Identifier(config.payment_order_column),
    )
    rows = conn.execute(
        query, {"after": after_id, "scope": None if scope is None else sorted(scope)}
    ).fetchall()
    audit = (
        AuditRow(
            id=r[0],
            table=r[1],
            row_id=r[2],
            payment_id=r[3],
            op=r[4],
            old_status=r[5],
            new_status=r[6],
            txid=r[7],
            backend_pid=r[8],
            at=r[9],
            changed=tuple(r[10]),
        )
        for r in rows
    )
    if scope is None:
        return tuple(audit)
    return tuple(r for r in audit if r.payment_id in scope)


def _payment_states(
    conn: psycopg.Connection[tuple[Any, ...]], config: OracleConfig, ids: Sequence[int]
) -> dict[int, PaymentState]:
    if not ids:
        return {}
    pay, inv, order = config.payments, config.invoices, config.orders
    # OracleConfig.__post_init__: exactly one of the invoice's links is set.
    if inv.payment_column is not None:
        invoice_link = sql.SQL("i.{} = p.{}").format(
            sql.Identifier(inv.payment_column), sql.Identifier(pay.id_column)
        )
    else:
        assert inv.order_column is not None
        invoice_link = sql.SQL("i.{} = p.{}").format(
            sql.Identifier(inv.order_column), sql.Identifier(config.payment_order_column)
        )
    query = sql.SQL(
        """
        SELECT DISTINCT ON (p.{pid}) p.{pid}, p.{pstatus}, p.{gwid}, i.{istatus}, o.{ostatus}
        FROM {payments} p
        LEFT JOIN {orders} o ON o.{oid} = p.{poid}
        LEFT JOIN {invoices} i ON {invoice_link}
        WHERE p.{pid} = ANY(%s::bigint[])
        ORDER BY p.{pid}, i.{iid} DESC
        """
    ).format(
        pid=sql.Identifier(pay.id_column),
        pstatus=sql.Identifier(pay.status_column),
        gwid=sql.Identifier(config.gateway_payment_column),
        istatus=sql.Identifier(inv.status_column),
        ostatus=sql.Identifier(order.status_column),
        payments=pay.identifier(),
        orders=order.identifier(),
        oid=sql.Identifier(order.id_column),
        poid=sql.Identifier(config.payment_order_column),
        invoices=inv.identifier(),
        invoice_link=invoice_link,
        iid=sql.Identifier(inv.id_column),
    )
    return {
        int(row[0]): PaymentState(int(row[0]), row[1], row[2], row[3], row[4])
        for row in conn.execute(query, (list(ids),)).fetchall()
    }


def _gateway(
    counters: Mapping[str, Mapping[str, int]] | None,
    scope: frozenset[int] | None,
    states: Mapping[int, PaymentState],
    extra_ids: Collection[str],
) -> tuple[dict[str, int], dict[str, int], set[str]]:
    if counters is None:
        return {}, {}, set()
    captures = counters.get("captures", {})
    accepted = counters.get("accepted", {})
    captured = {k for k, v in counters.get("captured", {}).items() if v}
    if scope is None:
        return dict(captures), dict(accepted), captured
    keep = {s.gateway_payment_id for s in states.values() if s.gateway_payment_id}
    keep |= set(extra_ids)
    return (
        {k: v for k, v in captures.items() if k in keep},
        {k: v for k, v in accepted.items() if k in keep},
        captured & keep,
    )
