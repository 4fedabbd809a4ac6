"""The server's side of lock waits, sampled while a run goes on.

    LockWatch   a background task that polls pg_stat_activity every few milliseconds on its
                own connection and keeps: how many samples, the most backends seen waiting for
                a lock at once, how many were seen blocked by another backend, a wait
                duration estimate per waiting episode (first seen .. last seen + one interval),
                and the wait-for cycles among the database's backends (`result.cycles`)
    WaitEpisode one backend's wait as the polls saw it: when (time.monotonic_ns, the clock
                of the pause points' probes), for what lock, behind which backends
                (`result.episodes_seen`: what run mode's timeline draws as <waiting>)

A lost connection (a nemesis, a database restart) does not end the sampler: it reconnects
with backoff for up to RECONNECT_FOR_S per loss and counts what it missed; the summary says
"lock waits not sampled for X s" (`unsampled_s`, `reconnects`, `not_seen`) instead of a
silent short sample count.

It cross-checks the per-request lock times the target reports in Server-Timing: a target
that under-reports its waits shows up as a gap between the two. The estimate's resolution is
the poll interval, which the summary states.

Cycles: PostgreSQL leaves a deadlock in place for deadlock_timeout (1 s by default) before
it aborts a victim, so a poll every few milliseconds sees the cycle in pg_blocking_pids. A
cycle found in one poll is read again at once with its members' backend_xid, statement and
the lock each waits for (pg_locks); it is recorded only if that second reading shows the
same cycle, so a graph read mid-change is not mistaken for one. model.deadlocks ties the
recorded cycles to payments.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

import asyncpg

from payrace.harness.model.deadlocks import (
    CycleMember,
    LockCycle,
    clip,
    describe_lock,
    find_cycles,
    full_xid,
)
from payrace.harness.model.stats import LatencyHistogram

# The lock each waiter waits for (timelines say on what): read per waiting backend only
# (LATERAL), so a poll that finds nobody waiting does not read pg_locks at all.
QUERY = """
SELECT a.pid, pg_blocking_pids(a.pid) AS blockers, l.*, clock_timestamp() AS at
FROM pg_stat_activity a
LEFT JOIN LATERAL (
  SELECT locktype, mode, relation::regclass::text AS relation, page, tuple,
         transactionid::text AS transactionid, classid, objid
  FROM pg_locks WHERE pid = a.pid AND NOT granted LIMIT 1
) l ON true
WHERE a.datname = current_database() AND a.wait_event_type = 'Lock'
  AND a.pid <> pg_backend_pid()
"""
# A cycle's members read again: who blocks them now, their xid, statement and awaited lock.
CYCLE_QUERY = """
SELECT a.pid, pg_blocking_pids(a.pid) AS blockers, a.backend_xid::text AS xid, a.query,
       l.locktype, l.mode, l.relation::regclass::text AS relation, l.page, l.tuple,
       l.transactionid::text AS transactionid, l.classid, l.objid,
       txid_snapshot_xmax(txid_current_snapshot()) AS next_xid, clock_timestamp() AS now
FROM pg_stat_activity a
LEFT JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted
WHERE a.pid = ANY($1::int[])
"""
MAX_CYCLES = 1000  # recorded per watch; a run with more has said enough (cycles_dropped)
MAX_EPISODES = 100_000  # kept for timelines; the histogram counts every one


@dataclass
class WaitEpisode:
    """One backend waiting for a lock, first seen .. last seen by the polls."""

    pid: int
    first_ns: int
    last_ns: int
    waits_for: str  # the lock, as deadlocks.describe_lock names it
    blocked_by: tuple[int, ...]
    # The same two moments on the server's clock, the clock of the oracle's audit rows
    # (over HTTP a timeline is drawn from those).
    first_at: datetime | None = None
    last_at: datetime | None = None


# How long one loss of the connection is retried before the sampler gives up for the run:
# past a minute the database is down, and the run's own requests say so.
RECONNECT_FOR_S = 60.0
# What a lost connection raises: the server went away (terminated backend, restart,
# shutdown), the socket broke, or the server is not taking connections yet. asyncpg's
# InternalClientError ("cannot switch to state ...") is what a query on a connection killed
# mid-read raises: the protocol is broken, and only a new connection mends it.
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InternalClientError,
)


@dataclass
class LockWatchResult:
    samples: int = 0
    interval_ms: float = 0.0
    waiting_max: int = 0
    waiting_seen: int = 0  # samples with at least one backend waiting for a lock
    episodes: int = 0
    waits: LatencyHistogram = field(default_factory=LatencyHistogram)
    cycles: list[LockCycle] = field(default_factory=list)
    cycles_dropped: int = 0  # confirmed beyond MAX_CYCLES
    episodes_seen: list[WaitEpisode] = field(default_factory=list)
    reconnects: int = 0  # the connection was lost and opened again
    unsampled_s: float = 0.0  # time without a connection to sample on
    gave_up: str | None = None  # why sampling stopped before the run did

    def not_seen(self) -> list[str]:
        """What the run could not see because the sampler was not sampling."""
        said = []
        if self.unsampled_s > 0 or self.reconnects:
            said.append(
                f"lock waits not sampled for {self.unsampled_s:.1f} s (the sampler's "
                f"connection was lost {max(self.reconnects, 1)} time(s))"
            )
        if self.gave_up is not None:
            said.append(f"lock sampler stopped early: {self.gave_up}")
        return said

    def to_json(self) -> dict[str, Any]:
        return {
            "reconnects": self.reconnects,
            "unsampled_s": round(self.unsampled_s, 3),
            "not_seen": self.not_seen(),
            "samples": self.samples,
            "interval_ms": self.interval_ms,
            "waiting_max": self.waiting_max,
            "waiting_seen": self.waiting_seen,
            "episodes": self.episodes,
            "wait_ms": self.waits.summary(),
            "cycles": len(self.cycles) + self.cycles_dropped,
        }


class LockWatch:
    def __init__(self, url: str, interval_s: float = 0.005) -> None:
        self.url = url
        self.interval_s = interval_s
        self.result = LockWatchResult(interval_ms=interval_s * 1000)
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self._open: dict[int, WaitEpisode] = {}
        # Cycles (by pids) present in the last poll and already read: a deadlock stays for
        # deadlock_timeout, and is recorded once.
        self._present: set[frozenset[int]] = set()
        self._recorded: set[frozenset[tuple[int, int | None]]] = set()
        self._lost_at: float | None = None  # the connection is lost since (perf_counter)

    async def _connect(self) -> Any:
        return await asyncpg.connect(
            self.url, server_settings={"application_name": "payrace-lockwatch"}, timeout=5
        )

    async def __aenter__(self) -> LockWatch:
        self._conn = await self._connect()
        self._task = asyncio.create_task(self._poll())
        return self

    async def _poll(self) -> None:
        try:
            while True:
                try:
                    await self._sample()
                except CONNECTION_LOST as exc:
                    if not await self._reconnect(exc):
                        return
                    continue
                await asyncio.sleep(self.interval_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not pass for "no lock waits"
            self.result.gave_up = f"{type(exc).__name__}: {exc}"

    async def _reconnect(self, exc: BaseException) -> bool:
        """Open a new connection after `exc`, with backoff; False once RECONNECT_FOR_S passed.
        Waits open at the loss are closed there: what came after was not seen."""
        lost_at = time.perf_counter()
        self._lost_at = lost_at
        for pid in list(self._open):
            self._close(pid)
        self._present = set()
        with contextlib.suppress(Exception):
            self._conn.terminate()
        delay = 0.05
        while True:
            try:
                self._conn = await self._connect()
                break
            except CONNECTION_LOST as again:
                if time.perf_counter() - lost_at > RECONNECT_FOR_S:
                    self.result.gave_up = (
                        f"no connection for {RECONNECT_FOR_S:.0f} s after "
                        f"{type(exc).__name__}: {exc}; last: {type(again).__name__}: {again}"
                    )
                    self._conn = None
                    return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        self.result.reconnects += 1
        self.result.unsampled_s += time.perf_counter() - lost_at
        self._lost_at = None
        return True

    async def _sample(self) -> None:
        rows = await self._conn.fetch(QUERY)
        now = time.monotonic_ns()
        r = self.result
        r.samples += 1
        edges = {int(row["pid"]): [int(b) for b in row["blockers"]] for row in rows}
        locks = {int(row["pid"]): describe_lock(dict(row)) for row in rows}
        at = {int(row["pid"]): row["at"] for row in rows}
        waiting = {pid for pid, blockers in edges.items() if blockers}
        if waiting:
            r.waiting_seen += 1
            r.waiting_max = max(r.waiting_max, len(waiting))
        for pid in waiting:
            episode = self._open.get(pid)
            if episode is None:
                episode = WaitEpisode(pid, now, now, locks[pid], (), at[pid], at[pid])
                self._open[pid] = episode
            episode.last_ns, episode.last_at = now, at[pid]
            episode.blocked_by = tuple(sorted({*episode.blocked_by, *edges[pid]}))
        for pid in list(self._open):
            if pid not in waiting:
                self._close(pid)
        cycles = find_cycles(edges) if len(waiting) > 1 else []
        # A cycle not confirmed now is tried again at the next poll.
        self._present = {
            pids for pids in cycles if pids in self._present or await self._confirm(pids)
        }

    async def _confirm(self, pids: frozenset[int]) -> bool:
        """Read a cycle again; record it if it is still there, with what each member does."""
        try:
            rows = await self._conn.fetch(CYCLE_QUERY, sorted(pids))
        except asyncpg.PostgresError:  # a view we may not read here: the waits still count
            return False
        by_pid = {int(row["pid"]): row for row in rows}  # one ungranted lock per waiter
        edges = {pid: [int(b) for b in row["blockers"]] for pid, row in by_pid.items()}
        if pids not in find_cycles(edges):
            return False
        members = []
        for pid in sorted(pids):
            row = by_pid[pid]
            xid = int(row["xid"]) if row["xid"] is not None else None
            members.append(
                CycleMember(
                    pid=pid,
                    xid=xid,
                    query=clip(row["query"]),
                    waits_for=describe_lock(dict(row)),
                    blocked_by=tuple(sorted(b for b in edges[pid] if b in pids)),
                    full_xid=full_xid(xid, int(row["next_xid"])) if xid is not None else None,
                )
            )
        cycle = LockCycle(seen_at=rows[0]["now"], members=tuple(members))
        if cycle.key() in self._recorded:
            return True  # the same deadlock, missed by one poll
        if len(self.result.cycles) >= MAX_CYCLES:
            self.result.cycles_dropped += 1
            return True
        self._recorded.add(cycle.key())
        self.result.cycles.append(cycle)
        return True

    def _close(self, pid: int) -> None:
        episode = self._open.pop(pid)
        self.result.episodes += 1
        self.result.waits.record_ms(
            (episode.last_ns - episode.first_ns) / 1e6 + self.result.interval_ms
        )
        if len(self.result.episodes_seen) < MAX_EPISODES:
            self.result.episodes_seen.append(episode)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for pid in list(self._open):
            self._close(pid)
        if self._lost_at is not None:  # still without a connection at the end of the run
            self.result.unsampled_s += time.perf_counter() - self._lost_at
            self._lost_at = None
        if self._conn is not None:
            try:
                await self._conn.close(timeout=2)
            except Exception:  # a connection lost for good: nothing left to close politely
                self._conn.terminate()
