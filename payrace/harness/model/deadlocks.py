"""Deadlocks: the server's count of them, and which payments they hit, from what the harness
sees itself.

    read_counter()    pg_stat_database.deadlocks and stats_reset (model.oracle's baseline)
    settled_delta()   the counter's delta, and whether a zero can be trusted yet (it settles)
    CycleMember       one backend of a wait-for cycle: pid, xid, its statement, the lock it
                      waits for, and (once observed) what became of its transaction
    LockCycle         a wait-for cycle the lock sampler (model.lockwatch) saw, and when
    find_cycles()     the cycles of a wait-for graph (pid -> the pids blocking it)
    full_xid()        a backend's 32-bit xid as the 64-bit txid the audit log stamps
    describe_lock()   a pg_locks row as words: "transaction 812 (ShareLock)"
    verify()          txid_status of every member, read when the oracle observes
    names_deadlock()  a reply whose body or error names 40P01 / "deadlock detected"
    PaymentDeadlocks  one payment's deadlocks: its cycles, its replies, their statements
    DeadlockAccount   the run's deadlocks: by payment, and how many none could be tied to (why)
    account()         (history, observation) -> DeadlockAccount; no_deadlock and the judge
                      both read it, so the check and the summary count alike

Why cycles, and why through the audit log. A target is any service; its answers cannot be
read for a deadlock it retried or hid. PostgreSQL itself leaves a deadlock in place for
deadlock_timeout (1 s by default) before the backend that waited longest checks for it and
aborts itself (the victim); a sampler polling pg_blocking_pids every few milliseconds sees
the wait-for cycle many times over. It records each member's backend_xid, statement
(pg_stat_activity.query) and the lock it waits for — what PostgreSQL's own error DETAIL
reports. The survivor's transaction goes on and commits its writes, so the oracle's audit
rows stamped with its xid name the payment; the victim's rows roll back with it.

Not every cycle of pg_blocking_pids is a deadlock: PostgreSQL may resolve a cycle through a
lock queue's soft edges by reordering the queue, aborting nobody, and the view is not read
atomically. So a cycle is recorded only when a second, later reading shows it again, and it
counts only when a member's transaction was aborted (or no member's fate could be read); a
cycle whose every member committed is dropped.

A reply whose body or error text names 40P01 or "deadlock detected" (the reference service
answers 409 retry_later with `sqlstate: 40P01` once its retries are spent) attributes its
trial directly. pg_stat_database.deadlocks (model.oracle) stays the run-level cross-check:
deadlocks it counted beyond those attributed are violations of no payment, said with why.

Deadlocks, and how stale the counter can be. `pg_stat_database.deadlocks` is counted by
the backend that detects the deadlock (the victim), in backend-local pending stats:
- PostgreSQL 15+: pending stats reach shared memory when the backend is idle outside a
  transaction, at most once per second (PGSTAT_MIN_INTERVAL); a rate-limited or contended
  flush is retried after 10 s idle (PGSTAT_IDLE_INTERVAL), a busy backend flushes at the
  latest after 60 s, and a backend flushes everything when it exits.
  `pg_stat_force_next_flush()` only affects the calling backend, so it cannot help here.
- PostgreSQL 14 and older: the victim sends a message to the stats collector at once; a
  reader sees it within ~0.5 s (PGSTAT_STAT_INTERVAL). The collector's UDP is lossy.
So a zero delta read right after a run may be a deadlock not yet flushed. settled_delta()
calls the reading *settled* only when every other client backend of the database has gone
away or has been idle outside a transaction long enough that its pending counters must have
been flushed (11 s on 15+, 1 s before). Otherwise `deadlocks_settled` is False and the
checker says "unknown" for a zero delta with nothing else seen — never a false "valid". A
positive delta is always reported. To get a settled reading, close the target's pool first
(its backends flush on exit, so the reading settles as soon as they are gone) or pass
`settle_timeout_s=12`. Harness connections that never write name themselves
`application_name = 'payrace-…'` and are not waited for.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg

from payrace.harness.model.history import Operation
from payrace.harness.model.watched import OracleError

if TYPE_CHECKING:  # the oracle imports this module; its rows are only read here
    from payrace.harness.model.oracle import Observation

# Harness connections that never write; the counter's reading does not wait for them.
HARNESS_APPLICATION_PREFIX = "payrace-"
# PostgreSQL 15+: an idle backend retries a deferred flush after PGSTAT_IDLE_INTERVAL (10 s).
_SETTLE_S_PG15 = 11.0
# PostgreSQL <= 14: the deadlock message is sent at once; the stats file is <= 0.5 s old.
_SETTLE_S_PG14 = 1.0
_XID_SPAN = 1 << 32
_MAX_QUERY = 1000  # characters of a member's statement kept (track_activity_query_size: 1024)
_MAX_LISTED = 10  # cycles / replies listed per payment
DEADLOCK_MARKERS = ("40p01", "deadlock detected", "deadlock_detected")


@dataclass(frozen=True)
class CycleMember:
    pid: int
    xid: int | None  # backend_xid (32-bit); None when its transaction has not written yet
    query: str
    waits_for: str
    blocked_by: tuple[int, ...]
    full_xid: int | None = None  # the 64-bit txid, as txid_current() gives it
    status: str | None = None  # txid_status: "committed" | "aborted" | "in progress" | None

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "xid": self.full_xid if self.full_xid is not None else self.xid,
            "query": self.query,
            "waits_for": self.waits_for,
            "blocked_by": list(self.blocked_by),
            "status": self.status,
        }


@dataclass(frozen=True)
class LockCycle:
    seen_at: datetime  # the server's clock when the cycle was confirmed (audit rows' clock)
    members: tuple[CycleMember, ...]

    @property
    def deadlock(self) -> bool:
        """PostgreSQL aborted a member, or nothing says it did not; a cycle whose members all
        committed was resolved without a victim (a lock queue reordered), not a deadlock."""
        statuses = [m.status for m in self.members]
        return "aborted" in statuses or not all(s == "committed" for s in statuses)

    def key(self) -> frozenset[tuple[int, int | None]]:
        return frozenset((m.pid, m.xid) for m in self.members)

    def to_json(self) -> dict[str, Any]:
        return {
            "seen_at": self.seen_at.isoformat(),
            "members": [m.to_json() for m in self.members],
        }


# -- the server's count --------------------------------------------------------------------


def read_counter(conn: psycopg.Connection[tuple[Any, ...]]) -> tuple[int, datetime | None]:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT deadlocks, stats_reset FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()
    if row is None:  # pragma: no cover - the database we are connected to is always there
        raise OracleError("pg_stat_database has no row for the current database")
    return int(row[0] or 0), row[1]


def _unsettled_backends(conn: psycopg.Connection[tuple[Any, ...]], settle_s: float) -> list[str]:
    """Client backends of this database that may still hold unflushed deadlock counts, each
    as `pid (application, state)`: the message names them, so a user can tell whose they are."""
    rows = conn.execute(
        "SELECT pid, coalesce(nullif(application_name, ''), 'no application_name'), "
        "coalesce(state, 'state hidden') FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND backend_type = 'client backend' "
        "AND coalesce(application_name, '') NOT LIKE %s "
        # state is NULL for other roles' sessions without pg_read_all_stats: not settled.
        "AND (state IS DISTINCT FROM 'idle' "
        "     OR state_change > clock_timestamp() - make_interval(secs => %s))",
        (HARNESS_APPLICATION_PREFIX + "%", settle_s),
    ).fetchall()
    return [f"{pid} ({app}, {state})" for pid, app, state in rows]


def settled_delta(
    conn: psycopg.Connection[tuple[Any, ...]],
    since: int,
    since_reset: datetime | None,
    settle_timeout_s: float,
) -> tuple[int, bool, str]:
    """(delta since the baseline count `since`, settled, why not): waits up to
    `settle_timeout_s` for every other client backend to flush (see the module docstring)."""
    settle_s = _SETTLE_S_PG15 if conn.info.server_version >= 150000 else _SETTLE_S_PG14
    deadline = time.monotonic() + settle_timeout_s
    while True:
        unsettled = _unsettled_backends(conn, settle_s)
        # Read after the activity check: a backend that just exited has had time to flush.
        count, stats_reset = read_counter(conn)
        if not unsettled or time.monotonic() >= deadline:
            break
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
    delta = count - since
    if stats_reset != since_reset or delta < 0:
        return 0, False, "pg_stat_database was reset during the run; the deadlock delta is void"
    if unsettled:
        return (
            delta,
            False,
            f"{len(unsettled)} client backend(s) stayed active or idle for less than "
            f"{settle_s:g} s within the {settle_timeout_s:g} s waited, and may hold deadlock "
            "counts not yet flushed to pg_stat_database: wait longer (`payrace run --settle-s`, "
            "settle_timeout_s) or let the target's pool close idle connections; backends: "
            + ", ".join(unsettled[:5]),
        )
    return delta, True, ""


def not_waited(wait_s: float, note: str) -> str:
    """no_deadlock's note when a run violated already was not kept waiting `wait_s` for the
    count to settle (runner.run, load.gate): nothing the count says can change that verdict."""
    return (
        "not waited for: the run is violated already, which no deadlock count can change "
        f"(waiting up to {wait_s:g} s for the target's backends to flush theirs is what "
        f"--settle-s {wait_s:g} asks for); read at once: {note}"
    )


# -- what the sampler needs ---------------------------------------------------------------


def find_cycles(edges: Mapping[int, Iterable[int]]) -> list[frozenset[int]]:
    """The strongly connected parts (two or more pids) of a wait-for graph: every pid in one
    waits, through the others, for itself. Tarjan's algorithm, iterative (no recursion limit)."""
    graph = {pid: [b for b in blockers if b in edges] for pid, blockers in edges.items()}
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    found: list[frozenset[int]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, child = work.pop()
            if child == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if child < len(graph[node]):
                work.append((node, child + 1))
                nxt = graph[node][child]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if work:  # done with node: hand its low link to the parent
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                part: set[int] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    part.add(member)
                    if member == node:
                        break
                if len(part) > 1:
                    found.append(frozenset(part))
    return found


def full_xid(xid: int, near: int) -> int:
    """The 64-bit txid of a running transaction's 32-bit xid, given a 64-bit txid `near` it
    (a current snapshot's xmax). Relative, as PostgreSQL's FullXidRelativeTo: the xid is
    within 2^31 of `near` on either side, since a snapshot's xmax may trail a running xid."""
    diff = (xid - near) % _XID_SPAN
    return near + (diff - _XID_SPAN if diff >= _XID_SPAN // 2 else diff)


def describe_lock(lock: Mapping[str, Any]) -> str:
    """The lock a member waits for, as PostgreSQL's deadlock DETAIL names it."""
    kind, mode = lock.get("locktype"), lock.get("mode") or "?"
    if kind is None:
        return "a lock (gone by the time it was read)"
    if kind == "transactionid":
        what = f"transaction {lock.get('transactionid')}"
    elif kind == "tuple":
        what = f"row ({lock.get('page')},{lock.get('tuple')}) of {lock.get('relation')}"
    elif kind == "relation":
        what = f"table {lock.get('relation')}"
    elif kind == "advisory":
        what = f"advisory lock {lock.get('classid')}:{lock.get('objid')}"
    else:
        what = str(kind)
    return f"{what} ({mode})"


def clip(query: str | None) -> str:
    text = " ".join((query or "").split())
    return text if len(text) <= _MAX_QUERY else text[: _MAX_QUERY - 1] + "…"


# -- what the oracle does with them -------------------------------------------------------


def verify(
    conn: psycopg.Connection[tuple[Any, ...]], cycles: Sequence[LockCycle]
) -> tuple[LockCycle, ...]:
    """Each member's transaction status (txid_status), read once the run is over."""
    xids = sorted({m.full_xid for c in cycles for m in c.members if m.full_xid is not None})
    status: dict[int, str | None] = {}
    if xids:
        try:
            rows = conn.execute(
                "SELECT x, txid_status(x) FROM unnest(%s::bigint[]) AS x", (xids,)
            ).fetchall()
            status = {int(x): s for x, s in rows}
        except psycopg.Error:
            # A txid the server cannot place (its status truncated away): fates unknown, so
            # the cycles count (LockCycle.deadlock), never silently dropped.
            status = {}
    return tuple(
        replace(
            c,
            members=tuple(
                replace(m, status=status.get(m.full_xid)) if m.full_xid is not None else m
                for m in c.members
            ),
        )
        for c in cycles
    )


def names_deadlock(op: Operation) -> bool:
    """A completion whose body or error names a deadlock (SQLSTATE 40P01)."""
    if op.type == "invoke":
        return False
    text = json.dumps(op.value, default=str) + " " + (op.error or "")
    lowered = text.lower()
    return any(marker in lowered for marker in DEADLOCK_MARKERS)


@dataclass(frozen=True)
class PaymentDeadlocks:
    payment: int
    trial: int | None
    cycles: tuple[LockCycle, ...] = ()
    replies: tuple[Operation, ...] = ()

    @property
    def count(self) -> int:
        """Deadlocks this payment is known to have met: a cycle is one, a reply at least one,
        and a reply may report a cycle already seen, so the larger of the two."""
        return max(len(self.cycles), len(self.replies))

    def statements(self) -> list[str]:
        seen = [m.query for c in self.cycles for m in c.members if m.query]
        return list(dict.fromkeys(seen))

    def to_json(self) -> dict[str, Any]:
        return {
            "payment": self.payment,
            "trial": self.trial,
            "deadlocks": self.count,
            "statements": self.statements()[:_MAX_LISTED],
            "cycles": [c.to_json() for c in self.cycles[:_MAX_LISTED]],
            "replies": [_reply_ref(op) for op in self.replies[:_MAX_LISTED]],
        }


def _reply_ref(op: Operation) -> dict[str, Any]:
    error = op.value.get("error") if isinstance(op.value, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return {
        "index": op.index,
        "f": op.f,
        "process": op.process,
        "status": op.status,
        "said": str(message or op.error or json.dumps(op.value, default=str))[:300],
    }


@dataclass(frozen=True)
class DeadlockAccount:
    counted: int  # pg_stat_database.deadlocks delta
    settled: bool
    watched: bool  # a lock sampler ran and its cycles reached the observation
    cycles_seen: int  # cycles that were deadlocks (LockCycle.deadlock)
    payments: dict[int, PaymentDeadlocks] = field(default_factory=dict)
    unattributed_cycles: tuple[LockCycle, ...] = ()
    resolved_cycles: int = 0  # cycles PostgreSQL resolved without aborting anybody

    @property
    def attributed(self) -> int:
        return sum(p.count for p in self.payments.values())

    @property
    def unattributed(self) -> int:
        """Deadlocks tied to no payment: counted by the server beyond those attributed, or
        seen as a cycle that named no payment (the larger: they may be the same ones)."""
        return max(self.counted - self.attributed, len(self.unattributed_cycles), 0)

    def why_unattributed(self) -> str:
        """Why the unattributed ones could not be tied to a trial; "" when there are none."""
        if not self.unattributed:
            return ""
        reasons = []
        if self.unattributed_cycles:
            reasons.append(
                f"{len(self.unattributed_cycles)} wait-for cycle(s) seen whose surviving "
                "transaction wrote no row the oracle audits for this run's payments"
            )
        unseen = self.counted - self.attributed - len(self.unattributed_cycles)
        if unseen > 0 and not self.watched:
            reasons.append(
                f"{unseen} counted by pg_stat_database while no lock sampler watched the "
                "database's wait-for cycles, and no reply named 40P01"
            )
        elif unseen > 0:
            reasons.append(
                f"{unseen} counted by pg_stat_database were never seen as a wait-for cycle "
                "(broken before the sampler's next poll: a deadlock_timeout shorter than its "
                "interval, or a cycle among backends of another database's sessions) and no "
                "reply named 40P01"
            )
        return "; ".join(reasons)

    def to_json(self) -> dict[str, Any]:
        return {
            "counted": self.counted,
            "settled": self.settled,
            "cycles_seen": self.cycles_seen,
            "attributed": self.attributed,
            "unattributed": self.unattributed,
            "why_unattributed": self.why_unattributed(),
            "payments": sorted(self.payments),
        }


def account(ops: Sequence[Operation], obs: Observation) -> DeadlockAccount:
    """Tie each deadlock to the payments it hit: a cycle through the audit rows its members'
    transactions left (the survivor's commit), a reply through its own payment."""
    trial_of: dict[int, int] = {}
    replies: dict[int, list[Operation]] = defaultdict(list)
    for op in ops:
        if op.payment is None:
            continue
        trial_of.setdefault(op.payment, op.trial)
        if names_deadlock(op):
            replies[op.payment].append(op)
    by_xid: dict[int, set[int]] = defaultdict(set)
    for row in obs.audit:
        if row.payment_id is not None:
            by_xid[row.txid % _XID_SPAN].add(row.payment_id)
    cycles: dict[int, list[LockCycle]] = defaultdict(list)
    deadlocks = [c for c in obs.cycles if c.deadlock]
    unattributed: list[LockCycle] = []
    for cycle in deadlocks:
        hit = {p for m in cycle.members if m.xid is not None for p in by_xid.get(m.xid, ())}
        for payment in sorted(hit):
            cycles[payment].append(cycle)
        if not hit:
            unattributed.append(cycle)
    payments = {
        p: PaymentDeadlocks(p, trial_of.get(p), tuple(cycles.get(p, ())), tuple(replies.get(p, ())))
        for p in sorted(set(cycles) | set(replies))
    }
    return DeadlockAccount(
        counted=obs.deadlocks,
        settled=obs.deadlocks_settled,
        watched=obs.cycles_watched,
        cycles_seen=len(deadlocks),
        payments=payments,
        unattributed_cycles=tuple(unattributed),
        resolved_cycles=len(obs.cycles) - len(deadlocks),
    )
