"""Who waits for whom: PostgreSQL's lock waits, named by request.

    blocking_pids()   pg_blocking_pids() of the backends the requests named (the reference
                      service names its backend before anything it runs can wait)
    AppWaits          every backend of an app's database that waits for a lock held by another
                      of the app's backends, and the statement it waits in (pg_stat_activity);
                      payrace's own connections (application_name payrace-…) left out
    Waiting           one request found waiting: the requests it waits for, the pids named
    UNNAMED           the label of a lock holder no request can be matched to
    name_waits()      PostgreSQL's answer -> which request waits for which

Used by explore.scheduler when it settles a step: a request is waiting when PostgreSQL says
its backend waits for a backend of another request of the schedule; then, and only then,
the scheduler may choose the next step.

Naming a backend. A request's backend pid is known when the request said it (the reference
service's probes, or `pause(..., backend_pid=)` in a team's app: payrace.pausing). An app
need not say it: the explorer runs one schedule at a time and the app's database serves only
that schedule, so every app backend that waits is a request of the schedule, and only a
request that was released and has not paused again can be waiting (a paused request runs no
statement; one not started has no backend; one that answered gave its connection back). So
when exactly one such request has no known pid and exactly one unknown backend waits, that
backend is that request's — learned, and kept for the rest of the schedule. A lock holder
is named the same way: the one started, unanswered request, other than the waiter, whose
backend is not known. Where elimination leaves a choice (three or more requests, none of
which said its pid), the waiter still counts as waiting but its holder is UNNAMED rather
than guessed: a wrong name could draw a deadlock that never was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_BLOCKERS = "SELECT pid, pg_blocking_pids(pid) AS blockers FROM unnest($1::int[]) AS pid"

# Backends of the app: client backends of this database, but ours. wait_event_type 'Lock' is
# a heavyweight lock (rows, transaction ids, advisory locks): what pg_blocking_pids reports.
_APP_WAITS = """
WITH app AS (
    SELECT pid, wait_event_type, query FROM pg_stat_activity
    WHERE datname = current_database() AND backend_type = 'client backend'
      AND pid <> pg_backend_pid() AND coalesce(application_name, '') NOT LIKE 'payrace-%'
)
SELECT w.pid, w.query,
       ARRAY(SELECT b FROM unnest(pg_blocking_pids(w.pid)) AS b
             WHERE b IN (SELECT pid FROM app)) AS blockers
FROM app AS w
WHERE w.wait_event_type = 'Lock' OR w.pid = ANY($1::int[])
"""

UNNAMED = "another request"


async def blocking_pids(conn: Any, pids: list[int]) -> dict[int, list[int]]:
    """pid -> the pids PostgreSQL says it waits for (asyncpg connection, one round trip)."""
    if not pids:
        return {}
    rows = await conn.fetch(_BLOCKERS, pids)
    return {int(row["pid"]): [int(p) for p in row["blockers"]] for row in rows}


@dataclass
class AppWaits:
    """pg_blocking_pids() for every waiting backend of an app's database (asyncpg connection,
    one round trip); `statements` keeps what each waiting backend runs, for the timeline."""

    conn: Any
    statements: dict[int, str] = field(default_factory=dict)

    async def __call__(self, pids: list[int]) -> dict[int, list[int]]:
        rows = await self.conn.fetch(_APP_WAITS, pids)
        found: dict[int, list[int]] = {}
        for row in rows:
            pid = int(row["pid"])
            found[pid] = [int(p) for p in row["blockers"]]
            if found[pid] and row["query"]:
                self.statements[pid] = str(row["query"])
        return found

    def statement(self, pid: int) -> str | None:
        return self.statements.get(pid)


@dataclass(frozen=True)
class Waiting:
    by: tuple[str, ...]  # the requests it waits for, in request order; UNNAMED last
    pids: tuple[int, ...]  # the blockers PostgreSQL named that belong to the schedule
    pid: int | None = None  # its own backend, as known or learned


@dataclass
class Named:
    waits: dict[str, Waiting] = field(default_factory=dict)
    learned: dict[str, int] = field(default_factory=dict)  # label -> pid, found by elimination


def name_waits(
    active: Sequence[tuple[str, int | None]],
    holders: Sequence[tuple[str, int | None]],
    answer: Mapping[int, Sequence[int]],
    *,
    eliminate: bool,
) -> Named:
    """Which of the `active` requests (released, not paused, not answered; label and pid if
    known) wait for which of the `holders` (started, not answered), from PostgreSQL's
    `answer` (pid -> blocker pids). Without `eliminate`, only known pids count."""
    order = {label: i for i, (label, _) in enumerate(holders)}
    known = {pid: label for label, pid in holders if pid is not None}
    named = Named()
    if eliminate:
        unknown = [label for label, pid in active if pid is None]
        strangers = [pid for pid, by in answer.items() if by and pid not in known]
        if len(unknown) == 1 and len(strangers) == 1:
            known[strangers[0]] = unknown[0]
            named.learned[unknown[0]] = strangers[0]
    by_label = {label: pid for pid, label in known.items()}
    for label, _ in active:
        pid = by_label.get(label)
        if pid is None:
            continue
        blockers = [b for b in answer.get(pid, []) if known.get(b) != label]
        names: set[str] = set()
        pids: list[int] = []
        unnamed = False
        for b in blockers:
            holder = known.get(b)
            if holder is None and eliminate:
                candidates = [h for h, p in holders if p is None and h != label]
                candidates = [h for h in candidates if h not in by_label]
                if len(candidates) == 1:
                    holder = candidates[0]
                    known[b], by_label[holder] = holder, b
                    named.learned[holder] = b
                else:
                    unnamed = True
                    pids.append(b)
                    continue
            if holder is not None:
                names.add(holder)
                pids.append(b)
        if names or unnamed:
            by = tuple(sorted(names, key=lambda h: order.get(h, len(order))))
            named.waits[label] = Waiting(by + ((UNNAMED,) if unnamed else ()), tuple(pids), pid)
    return named


__all__ = ["UNNAMED", "AppWaits", "Named", "Waiting", "blocking_pids", "name_waits"]
