"""The server's side of lock waits, sampled while a run goes on.

    LockWatch   a background task that polls pg_stat_activity every few milliseconds on its
                own connection and keeps: how many samples, the most backends seen waiting for
                a lock at once, how many were seen blocked by another backend, and a wait
                duration estimate per waiting episode (first seen .. last seen + one interval)

It cross-checks the per-request lock times the target reports in Server-Timing: a target
that under-reports its waits shows up as a gap between the two. The estimate's resolution is
the poll interval, which the summary states.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import asyncpg

from payrace.harness.model.stats import LatencyHistogram

QUERY = """
SELECT pid, cardinality(pg_blocking_pids(pid)) AS blockers
FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()
"""


@dataclass
class LockWatchResult:
    samples: int = 0
    interval_ms: float = 0.0
    waiting_max: int = 0
    waiting_seen: int = 0  # samples with at least one backend waiting for a lock
    episodes: int = 0
    waits: LatencyHistogram = field(default_factory=LatencyHistogram)

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "interval_ms": self.interval_ms,
            "waiting_max": self.waiting_max,
            "waiting_seen": self.waiting_seen,
            "episodes": self.episodes,
            "wait_ms": self.waits.summary(),
        }


class LockWatch:
    def __init__(self, url: str, interval_s: float = 0.005) -> None:
        self.url = url
        self.interval_s = interval_s
        self.result = LockWatchResult(interval_ms=interval_s * 1000)
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self._open: dict[int, tuple[float, float]] = {}

    async def __aenter__(self) -> LockWatch:
        self._conn = await asyncpg.connect(
            self.url, server_settings={"application_name": "payrace-lockwatch"}
        )
        self._task = asyncio.create_task(self._poll())
        return self

    async def _poll(self) -> None:
        while True:
            rows = await self._conn.fetch(QUERY)
            now = time.perf_counter()
            r = self.result
            r.samples += 1
            waiting = {int(row["pid"]) for row in rows if row["blockers"] > 0}
            if waiting:
                r.waiting_seen += 1
                r.waiting_max = max(r.waiting_max, len(waiting))
            for pid in waiting:
                first, _ = self._open.get(pid, (now, now))
                self._open[pid] = (first, now)
            for pid in list(self._open):
                if pid not in waiting:
                    self._close(pid)
            await asyncio.sleep(self.interval_s)

    def _close(self, pid: int) -> None:
        first, last = self._open.pop(pid)
        self.result.episodes += 1
        self.result.waits.record_ms((last - first) * 1000 + self.result.interval_ms)

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
