"""The server's side of lock waits, sampled while a run goes on.

    LockWatch   a background task that polls pg_stat_activity every few milliseconds on its
                own connection and keeps: how many samples, the most backends seen waiting for
                a lock at once, how many were seen blocked by another backend, a wait
                duration estimate per waiting episode (first seen .. last seen + one interval),
                and the wait-for cycles among the database's backends (`result.cycles`)
    WaitEpisode one backend's wait as the polls saw it: when (time.monotonic_ns, the clock
                of the pause points' probes), for what lock, behind which backends
                (`result.episodes_seen`: what run mode's timeline draws as <waiting>)

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

    def to_json(self) -> dict[str, Any]:
        return {
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

    async def __aenter__(self) -> LockWatch:
        self._conn = await asyncpg.connect(
            self.url, server_settings={"application_name": "payrace-lockwatch"}
        )
        self._task = asyncio.create_task(self._poll())
        return self

    async def _poll(self) -> None:
        while True:
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
            await asyncio.sleep(self.interval_s)

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
        if self._conn is not None:
            await self._conn.close()
