"""The deterministic interleaving explorer: every schedule of the capture path's pause points.

    StepClass       LOCAL < READ < WRITE < END: what the code between two pause points may do
    predict()       the class of a request's next step, read off service/capture.py; every
                    executed step is checked against it (ScheduleRun.guard)
    dependent()     may two steps of different requests not be swapped?
    Scheduler       the PauseController: parks every request at its pause points, releases one
                    at a time and settles: each request paused, answered, or waiting for a
                    lock that pg_blocking_pids() says another request holds; mutual waits are
                    reported as deadlocks, a step that does neither within the bound is
                    cancelled and reported as stuck
    ScheduleRun     one executed schedule: id, choices, timeline, replies, waits, races,
                    verdict
    Explorer        an in-process service + oracle for one strategy / isolation / requests
    ├── exhaustive()    every schedule (depth-first, re-executing from a fresh payment)
    ├── pct()           PCT: random priorities, d-1 change points, seeded
    ├── run_steps()     an explicit schedule ("client:payment_read", "webhook-1:end", ...)
    ├── replay()        exactly the schedule an id names
    └── judge()         oracle + checkers (harness.oracle, harness.checker), per schedule too
    ExploreResult   counts, outcomes, shortest violating schedule; golden text, console,
                    summary.json for harness.report, an HTML timeline fragment
    PctBound        n, k, d -> p = 1/(n*k^(d-1)) and the runs a confidence needs
    explore_main()  `payrace explore`: provision PostgreSQL and the fake gateway, run, report
    pause_overhead()  what a pause point costs without a controller (python -m harness.explore)

Steps. A step releases one request from one pause point to its next (or to its answer).
Steps whose code cannot affect or be affected by another request — LOCAL in the table of
predict() — are run at once, folded into the step before them (VeriSoft's "invisible"
operations); only the others are schedule choices. This is sound because a LOCAL step
commutes with every step of every other request, so every schedule is equivalent to one in
which LOCAL steps run as early as possible.

Equivalent schedules (exhaustive mode, `reduce`). Two adjacent steps of different requests
commute when `dependent()` says no: plain reads (READ) commute with each other, and at READ
COMMITTED and REPEATABLE READ with writes that are not committed yet (MVCC: a plain SELECT
neither sees an uncommitted row nor waits for its lock, and a WRITE step never commits: at
worst it rolls back, which no reader can see); END (commit and answer) and WRITE-WRITE pairs
never commute (WRITE-WRITE conservatively, whatever the rows). At SERIALIZABLE a read and a
write of a concurrent transaction form the same rw-conflict in either order, but the order
decides which transaction SSI rolls back, so they do not commute either.
Of each class of equivalent schedules the explorer runs the lexicographically least, using
the two-process characterisation of that normal form: after a step of request j, request
i < j is released next only if its step depends on j's step (or j cannot move). Pruning is
skipped whenever it could leave no choice, so it only ever drops schedules that have an
equivalent one that is explored. Blocked variants are never collapsed into unblocked ones:
a step that waits for a lock is WRITE, and END (which releases locks) depends on it.

The table is checked while running: a LOCAL or READ step that wrote, locked, committed or
waited, or a WRITE step that committed, makes the run fail with exit code 2 and a message
naming the step (the reduction would no longer be sound for this capture path).

Waiting is read from PostgreSQL, never from the clock: after a release the scheduler polls
(poll_s) until every request is paused, answered, or waiting on a backend of another
request according to pg_blocking_pids() on its own connection; only then does it choose
again, and it reads waits at that settled state, where no lock can change hands.

Races inside PostgreSQL. When one step releases two waiters of the same row (side by side,
or one queued behind the other), which of them locks the row's new version first is decided
inside the server (both re-lock it through EvalPlanQual; there is no pause point between).
Such steps are marked <race>; what follows them may differ from one run to the next, so
golden output shows those schedules only up to the race, and replaying one may take the
other branch (the run then says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import html
import math
import random
import re
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import asyncpg
from rich.console import Console
from rich.panel import Panel
from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext

from harness import checker, oracle
from harness.client import AsgiClient, PaymentContext, Prepared, Reply, prepare
from harness.gateway import FakeRazorpay, GatewayKeys, GatewayServer
from harness.history import History, Operation, classify
from harness.provider import Database, ProviderError, provide_postgres
from harness.runner import DECLARED, machine
from harness.scenario import (
    ExplicitSchedule,
    RequestSpec,
    Scenario,
    ScenarioError,
    ScheduleRef,
    StepSpec,
    load_scenario,
    normalise_isolation,
    parse_requests,
    parse_schedule_id,
)
from harness.timeline import TimelineEvent, phrase, render_html, render_text
from service import probes
from service.app import Runtime, create_app
from service.capture import STRATEGIES
from service.probes import ProbeContext
from service.settings import Settings

EXIT_OK, EXIT_VIOLATED, EXIT_ERROR = 0, 1, 2
APPLICATION_NAME = "payrace-explore"  # oracle.observe() does not wait for harness connections
_BLOCKERS = "SELECT pid, pg_blocking_pids(pid) AS blockers FROM unnest($1::int[]) AS pid"


class StepClass(enum.IntEnum):
    LOCAL = 0  # commutes with everything: no statement, or reads of columns nobody changes
    READ = 1  # plain SELECTs only (includes taking the REPEATABLE READ snapshot)
    WRITE = 2  # takes row locks or writes, may wait, may fail and roll back
    END = 3  # commit (publishes writes, releases locks) and the answer


def predict(
    spec: RequestSpec, point: str | None, detail: str | None, *, isolation: str, lock_rows: bool
) -> StepClass:
    """The class of the code service/capture.py runs after `point` (None: not started yet).

    Read off the capture path; ScheduleRun.guard checks every executed step against it."""
    if point is None:
        # The webhook route looks the payment up by gateway order id (immutable columns);
        # then BEGIN and SELECT pg_backend_pid(). That first statement takes the snapshot
        # at REPEATABLE READ / SERIALIZABLE, which orders it against other commits.
        return StepClass.LOCAL if isolation == "READ COMMITTED" else StepClass.READ
    if point == "txn_begun":
        # The payment read: FOR UPDATE (or an advisory lock first) locks, a plain SELECT not.
        return StepClass.WRITE if lock_rows else StepClass.READ
    if point == "payment_read":
        if detail == "missing" or spec.kind.is_webhook:
            # Webhooks insert their event id here (dedupe; its foreign key takes FOR KEY
            # SHARE on the payment row); a missing payment rolls back and answers 404.
            return StepClass.WRITE
        # session.get(Order): a plain read of id / amount / currency, which never change.
        return StepClass.READ if isolation == "SERIALIZABLE" else StepClass.LOCAL
    if point == "status_checked":
        if detail == "repeat":
            return StepClass.READ  # _states(): reads invoice and order status
        if spec.captures_at_gateway and not spec.marks_failed:
            return StepClass.LOCAL  # straight to pause("gateway_called")
        return StepClass.WRITE
    if point == "payment_written":
        return StepClass.READ if spec.marks_failed else StepClass.WRITE
    if point in ("gateway_called", "invoice_written"):
        return StepClass.WRITE
    if point == "order_written":
        return StepClass.LOCAL  # returns from _write_capture to pause("before_commit")
    return StepClass.END  # before_commit, or a point this table does not know: the worst


def dependent(a: StepClass, b: StepClass, isolation: str) -> bool:
    if StepClass.LOCAL in (a, b) or (a is StepClass.READ and b is StepClass.READ):
        return False
    if isolation == "SERIALIZABLE" or StepClass.END in (a, b):
        return True
    return a is StepClass.WRITE and b is StepClass.WRITE


_FOR_LOCK = re.compile(r"\bFOR\s+(UPDATE|SHARE|NO\s+KEY\s+UPDATE|KEY\s+SHARE)\b", re.IGNORECASE)
_ADVISORY = re.compile(r"\bpg_advisory(_xact)?_lock(_shared)?\s*\(", re.IGNORECASE)


def statement_class(statement: str) -> StepClass:
    text = statement.lstrip().upper()
    if text.startswith(("SELECT", "WITH")) and not (
        _FOR_LOCK.search(statement) or _ADVISORY.search(statement)
    ):
        return StepClass.READ
    return StepClass.WRITE


_TABLE_WORD = {"payments": "payment", "invoices": "invoice", "orders": "order"}


def describe_statement(statement: str) -> str:
    """ "UPDATE payments SET ..." -> "update payment": what a waiting request waits to do."""
    text = " ".join(statement.split())
    if m := re.match(r"(?i)UPDATE\s+(\w+)", text):
        return f"update {_TABLE_WORD.get(m[1], m[1])}"
    if m := re.match(r"(?i)INSERT\s+INTO\s+(\w+)", text):
        return "record event id" if m[1] == "webhook_events" else f"insert {m[1]}"
    if _ADVISORY.search(text):
        return "advisory lock"
    if m := re.search(r"(?i)\bFROM\s+(\w+)", text):
        verb = "lock" if _FOR_LOCK.search(text) else "read"
        return f"{verb} {_TABLE_WORD.get(m[1], m[1])}"
    return text[:40]


class ScheduleError(RuntimeError):
    """An explicit schedule or id cannot be followed by this service (says where and why)."""


# -- one schedule ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    label: str
    blocked_by: tuple[str, ...]
    what: str  # the statement it waits to run, described
    blocker_pids: tuple[int, ...] = ()  # what pg_blocking_pids() answered


@dataclass
class _Req:
    index: int
    spec: RequestSpec
    prepared: Prepared
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    state: str = "new"  # new | parked | running | blocked | done
    point: str | None = None
    detail: str | None = None
    probe: ProbeContext | None = None
    task: asyncio.Task[None] | None = None
    reply: Reply | None = None
    invoke: Operation | None = None
    blocked_by: tuple[str, ...] = ()
    blocker_pids: tuple[int, ...] = ()
    trail: list[str] = field(default_factory=list)  # pause points passed, in order
    # The step in flight: what it was predicted to do and what it did.
    predicted: StepClass = StepClass.LOCAL
    step_from: str | None = None
    statements: list[str] = field(default_factory=list)
    committed: bool = False
    waited: bool = False
    errors: list[str] = field(default_factory=list)
    observed: StepClass = StepClass.LOCAL  # of the last completed step

    @property
    def label(self) -> str:
        return self.spec.label


@dataclass
class ScheduleRun:
    number: int
    ref: ScheduleRef
    payment_id: int
    gateway_payment_id: str
    name: str | None = None
    decisions: list[tuple[tuple[int, ...], int]] = field(default_factory=list)
    events: list[TimelineEvent] = field(default_factory=list)
    replies: dict[str, Reply] = field(default_factory=dict)
    waits: list[Wait] = field(default_factory=list)
    deadlocks: list[tuple[str, ...]] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    guard: list[str] = field(default_factory=list)
    error: str | None = None
    pruned: int = 0
    expect: str | None = None
    # (step, requests): one step released several waiters at once; who locked first was
    # PostgreSQL's choice, so what follows may differ between runs (see Scheduler.step).
    races: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)
    note: str | None = None
    # Filled by Explorer.judge():
    valid: checker.Validity = "unknown"
    violated: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.ref.id

    @property
    def choices(self) -> tuple[int, ...]:
        return self.ref.choices

    def switches(self) -> int:
        return sum(1 for a, b in zip(self.choices, self.choices[1:], strict=False) if a != b)

    def outcome(self) -> str:
        return " · ".join(f"{label} {answer_text(reply)}" for label, reply in self.replies.items())


def answer_text(reply: Reply | None) -> str:
    if reply is None or reply.status is None:
        return "no answer" + (f" ({reply.error})" if reply and reply.error else "")
    body = reply.body
    if 200 <= reply.status < 300:
        words = [str(body.get("status", "ok"))]
        if body.get("duplicate_event"):
            words.append("(duplicate event)")
        elif body.get("idempotent"):
            words.append("(idempotent)")
        return f"{reply.status} {' '.join(words)}"
    error = body.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return f"{reply.status} {code or 'error'}"


class Policy(Protocol):
    def choose(
        self, runnable: Sequence[int], candidates: Sequence[int], reqs: Sequence[_Req]
    ) -> int: ...


class Scheduler:
    """The explorer's PauseController for one schedule (one payment, fresh state)."""

    def __init__(
        self,
        reqs: list[_Req],
        *,
        send: Callable[[_Req], Any],
        blockers: Callable[[list[int]], Any],
        isolation: str,
        lock_rows: bool,
        reduce: bool,
        bound_s: float,
        poll_s: float,
    ) -> None:
        self.reqs = reqs
        self._by_label = {r.label: r for r in reqs}
        self._send = send
        self._blockers = blockers
        self.isolation = isolation
        self.lock_rows = lock_rows
        self.reduce = reduce
        self.bound_s = bound_s
        self.poll_s = poll_s
        self._changed = asyncio.Event()
        self._free = False  # after a give-up: let everything run to its end
        self._seq = 0
        self._pending: list[tuple[int, int, str, str]] = []
        self._released: _Req | None = None
        self.events: list[TimelineEvent] = []
        self.choices: list[int] = []
        self.decisions: list[tuple[tuple[int, ...], int]] = []
        self.waits: list[Wait] = []
        self.deadlocks: list[tuple[str, ...]] = []
        self.stuck: list[str] = []
        self.guard: list[str] = []
        self.pruned = 0
        self.races: list[tuple[int, tuple[str, ...]]] = []

    # -- PauseController --------------------------------------------------------------------

    async def reached(self, point: str, probe: ProbeContext) -> None:
        r = self._by_label.get(probe.label)
        if r is None or self._free:
            return
        r.point, r.detail = point, probe.points[-1][2] if probe.points else None
        r.trail.append(point)
        # The commit runs in the step *after* this pause: it is drawn there, with the answer.
        self._arrive(r, None if point == "before_commit" else phrase(point, r.detail))
        r.state = "parked"
        self._changed.set()
        await r.gate.wait()
        r.gate.clear()

    def finished(self, probe: ProbeContext) -> None:
        """Nothing to do: a request counts as done when its answer is back (task end)."""

    # -- what the service's engine tells us (SQLAlchemy events, per request) ---------------

    def on_statement(self, label: str, statement: str) -> None:
        if (r := self._by_label.get(label)) is not None:
            r.statements.append(statement)

    def on_commit(self, label: str) -> None:
        if (r := self._by_label.get(label)) is not None:
            r.committed = True

    def on_error(self, label: str, message: str) -> None:
        if (r := self._by_label.get(label)) is not None:
            r.errors.append(message)

    # -- timeline ---------------------------------------------------------------------------

    def _log(self, r: _Req, text: str) -> None:
        # Requests that move at the same time (a commit wakes a waiter while the committer
        # answers) log in a fixed order: the released request first, then by index.
        key = -1 if r is self._released else r.index
        self._pending.append((key, len(self._pending), r.label, text))

    def _flush(self) -> None:
        for _, _, label, text in sorted(self._pending):
            self.events.append(TimelineEvent(self._seq, label, text))
            self._seq += 1
        self._pending.clear()

    def _arrive(self, r: _Req, text: str | None) -> None:
        """A request's step ended: log it and check it against its predicted class."""
        lines = [f"{message}: rollback" for message in r.errors]
        if r.errors and r.point == "txn_begun" and r.state != "done":
            text = "retry: begin"
        if text is not None:
            lines.append(f"commit {text}" if r.committed and text.startswith("→") else text)
        if r.waited and lines:  # isolation tester style: the step that waited ends here
            lines[0] = f"<completed> {lines[0]}"
        for line in lines:
            self._log(r, line)
        observed = StepClass.LOCAL
        for statement in r.statements:
            observed = max(observed, statement_class(statement))
        if r.waited:
            observed = max(observed, StepClass.WRITE)
        if r.committed:
            observed = StepClass.END
        allowed = StepClass.READ if r.predicted <= StepClass.READ else r.predicted
        if observed > allowed and not self._free:
            what = "; ".join(describe_statement(s) for s in r.statements) or "no statement"
            self.guard.append(
                f"{r.label}: the step after {r.step_from or 'the start'} was assumed "
                f"{r.predicted.name} but did {observed.name} ({what}"
                f"{', waited for a lock' if r.waited else ''}"
                f"{', committed' if r.committed else ''})"
            )
        r.observed = max(observed, r.predicted)
        r.statements, r.errors, r.committed, r.waited = [], [], False, False

    # -- releasing and settling --------------------------------------------------------------

    def runnable(self) -> list[int]:
        return [r.index for r in self.reqs if r.state in ("new", "parked")]

    def done(self) -> bool:
        return all(r.state == "done" for r in self.reqs)

    def predicted(self, r: _Req) -> StepClass:
        return predict(
            r.spec, r.point, r.detail, isolation=self.isolation, lock_rows=self.lock_rows
        )

    async def step(self, index: int) -> None:
        r = self.reqs[index]
        before = {q.label: q.blocked_by for q in self.reqs if q.state == "blocked"}
        r.predicted, r.step_from = self.predicted(r), r.point
        r.statements, r.errors, r.committed, r.waited = [], [], False, False
        self._released = r
        if r.state == "new":
            r.state = "running"
            r.task = asyncio.create_task(self._request(r), name=f"explore-{r.label}")
        else:
            r.state = "running"
            r.gate.set()
        await self._settle()
        # Waits are read at the settled state only: there no lock can change hands. In
        # between, a waiter woken by a commit may be seen running for a moment before it
        # queues for its next lock; whether a poll lands there is timing, not behaviour.
        for q in self.reqs:
            if q.state == "blocked" and before.get(q.label) != q.blocked_by:
                what = describe_statement(q.statements[-1]) if q.statements else "lock"
                self.waits.append(Wait(q.label, q.blocked_by, what, q.blocker_pids))
                self._log(q, f"{what} <waiting>")
                q.waited = True
        # A step that releases two waiters of the released request (side by side, or one
        # queued behind the other on the tuple lock) starts a race inside PostgreSQL: each
        # re-locks the row's new version (EvalPlanQual) and the first to get there wins. No
        # pause point lies in between, so no schedule orders them. Whether a race was
        # possible is read from the state before the step, so that it is reported the same
        # way whichever waiter won.
        behind = self._waiting_on(r.label, before)
        if len(behind) > 1 and any(
            q.state != "blocked" or q.blocked_by != before[q.label]
            for q in self.reqs
            if q.label in behind
        ):
            self.races.append((len(self.choices), behind))
            self._log(
                self._by_label[behind[0]],
                f"<race> {' and '.join(behind)} released together: PostgreSQL picks who "
                "locks first",
            )
        self._flush()

    async def _request(self, r: _Req) -> None:
        try:
            with probes.controlled(self, r.label) as probe:
                r.probe = probe
                r.reply = await self._send(r)
        except asyncio.CancelledError:
            # Ours (a stuck step) or the run's end: either way the request has no answer.
            r.reply = Reply(None, {}, {}, "cancelled by the explorer")
        finally:
            if r.state != "done":
                self._arrive(r, f"→ {answer_text(r.reply)}")
            r.state = "done"
            self._changed.set()

    async def _settle(self) -> None:
        """Until every request is paused, answered or waiting for another one's lock."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.bound_s
        while True:
            self._changed.clear()
            active = [r for r in self.reqs if r.state in ("running", "blocked")]
            if not active:
                return
            if any(r.state == "running" for r in active):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_s):
                        await self._changed.wait()
                if self._changed.is_set():
                    continue
            pids = {
                r.label: r.probe.backend_pid
                for r in active
                if r.probe is not None and r.probe.backend_pid is not None
            }
            ours = {
                r.probe.backend_pid: r.label
                for r in self.reqs
                if r.state != "done" and r.probe is not None and r.probe.backend_pid is not None
            }
            answer: dict[int, list[int]] = await self._blockers(sorted(set(pids.values())))
            if self._changed.is_set():
                continue  # someone moved while we asked: the answer may be stale
            all_blocked = True
            for r in active:
                pid = pids.get(r.label)
                named = tuple(b for b in answer.get(pid or -1, []) if b in ours)
                by = tuple(
                    sorted(
                        {
                            ours[b]
                            for b in answer.get(pid or -1, [])
                            if ours.get(b, r.label) != r.label
                        },
                        key=lambda label: self._by_label[label].index,
                    )
                )
                if not by:
                    all_blocked = False
                    if r.state == "blocked":
                        r.state = "running"  # the holder committed: it runs again
                    continue
                r.state, r.blocked_by, r.blocker_pids = "blocked", by, named
            if all_blocked:
                cycle = self._cycle(active)
                if cycle is None:
                    return
                if cycle not in self.deadlocks:
                    # PostgreSQL breaks it after deadlock_timeout; the victim's 40P01 is
                    # retried by the service. Report it, and wait for that to happen.
                    self.deadlocks.append(cycle)
                    self._log(self._by_label[cycle[0]], f"deadlock: {' ⇄ '.join(cycle)}")
            if loop.time() > deadline:
                await self._give_up(active)
                return
            if all_blocked or not any(r.state == "running" for r in active):
                await asyncio.sleep(self.poll_s)

    def _waiting_on(self, label: str, graph: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
        """The requests that wait, directly or through others, for `label` in `graph`."""
        found: set[str] = set()
        frontier = {label}
        while frontier:
            frontier = {w for w, by in graph.items() if set(by) & frontier} - found
            found |= frontier
        found.discard(label)
        return tuple(sorted(found, key=lambda name: self._by_label[name].index))

    def _cycle(self, active: Sequence[_Req]) -> tuple[str, ...] | None:
        graph = {r.label: r.blocked_by for r in active if r.state == "blocked"}
        for start in graph:
            path = [start]
            while True:
                nxt = next((b for b in graph.get(path[-1], ()) if b in graph), None)
                if nxt is None:
                    break
                if nxt in path:
                    loop_ = path[path.index(nxt) :]
                    first = min(range(len(loop_)), key=lambda i: self._by_label[loop_[i]].index)
                    return tuple(loop_[first:] + loop_[:first])
                path.append(nxt)
        return None

    async def _give_up(self, active: Sequence[_Req]) -> None:
        for r in active:
            self.stuck.append(r.label)
            how = (
                f"waiting for {', '.join(r.blocked_by)}"
                if r.blocked_by
                else "neither paused nor waiting"
            )
            self._log(r, f"<stuck> {how} after {self.bound_s:g} s: cancelled")
            if r.task is not None:
                r.task.cancel()
        await self.close()

    async def close(self) -> None:
        """Let every request finish (no more pauses); cancel what the bound cannot wait for."""
        tasks = [r.task for r in self.reqs if r.task is not None and not r.task.done()]
        if not tasks:
            self._flush()
            return
        self._free = True
        for r in self.reqs:
            r.gate.set()
        _, pending = await asyncio.wait(tasks, timeout=self.bound_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=self.bound_s)
        self._flush()

    async def run_local(self) -> None:
        """Fold LOCAL steps into the step before them (see the module docstring)."""
        progressed = True
        while progressed and not self._free:
            progressed = False
            for r in self.reqs:
                if r.state in ("new", "parked") and self.predicted(r) is StepClass.LOCAL:
                    await self.step(r.index)
                    progressed = True

    async def drive(self, policy: Policy) -> None:
        await self.run_local()
        previous: tuple[int, StepClass, frozenset[int]] | None = None
        while not self.done() and not self._free:
            runnable = self.runnable()
            if not runnable:
                # Only waiting requests left, none of ours holding what they wait for.
                await self._give_up([r for r in self.reqs if r.state != "done"])
                return
            candidates = self._prune(runnable, previous)
            try:
                choice = policy.choose(runnable, candidates, self.reqs)
            except ScheduleError as exc:
                if self.races:
                    step, who = self.races[0]
                    raise ScheduleError(
                        f"{exc} — PostgreSQL decided the race between {' and '.join(who)} "
                        f"at step {step} the other way this time; run it again"
                    ) from exc
                raise
            if choice not in runnable:
                raise ScheduleError(f"step {len(self.choices) + 1}: request {choice} cannot move")
            self.decisions.append((tuple(candidates), choice))
            self.choices.append(choice)
            await self.step(choice)
            await self.run_local()
            previous = (choice, self.reqs[choice].observed, frozenset(runnable))

    def _prune(
        self, runnable: list[int], previous: tuple[int, StepClass, frozenset[int]] | None
    ) -> list[int]:
        """Keep the lexicographic normal form: after j's step, i < j only if they conflict."""
        if not self.reduce or previous is None:
            return runnable
        j, j_class, before = previous
        if j not in runnable:
            return runnable  # j waits or answered: no choice may be dropped
        keep = []
        for i in runnable:
            if (
                i < j
                and i in before
                and not dependent(self.predicted(self.reqs[i]), j_class, self.isolation)
            ):
                self.pruned += 1
                continue
            keep.append(i)
        return keep


# -- policies -------------------------------------------------------------------------------


class Prefix:
    """Follow `choices`, then always the lowest candidate (the depth-first order)."""

    def __init__(self, choices: Sequence[int], *, exact: bool = False) -> None:
        self.choices = list(choices)
        self.exact = exact
        self.position = 0
        self.notes: list[str] = []
        self.diverged_at: int | None = None

    def choose(
        self, runnable: Sequence[int], candidates: Sequence[int], reqs: Sequence[_Req]
    ) -> int:
        pool = runnable if self.exact else candidates
        if self.position < len(self.choices):
            want = self.choices[self.position]
            self.position += 1
            if want in pool:
                return want
            if self.exact:
                r = reqs[want]
                state = {"blocked": f"waits for {', '.join(r.blocked_by)}", "done": "has answered"}
                raise ScheduleError(
                    f"step {self.position}: the id releases {r.label}, but it "
                    f"{state.get(r.state, r.state)}; this service no longer runs that schedule"
                )
            self.notes.append(f"step {self.position}: {want} not among {list(pool)}")
            self.diverged_at = self.diverged_at or self.position
        elif self.exact and self.position == len(self.choices):
            self.position += 1
            self.notes.append("the id ended before every request answered")
            self.diverged_at = self.diverged_at or self.position
        return min(pool)


class Steps:
    """An explicit schedule: `label` = one step, `label:point` = until paused at point."""

    def __init__(self, steps: Sequence[StepSpec]) -> None:
        self.queue = list(steps)
        self.moved = 0  # steps released for queue[0]
        self.mark = 0  # len(trail) when queue[0] began: LOCAL steps may run past its point

    def choose(
        self, runnable: Sequence[int], candidates: Sequence[int], reqs: Sequence[_Req]
    ) -> int:
        by_label = {r.label: r for r in reqs}
        while self.queue:
            spec = self.queue[0]
            r = by_label[spec.label]
            if not self.moved:
                self.mark = len(r.trail)
            if self.moved and self._met(spec, r, self.mark):
                self.queue.pop(0)
                self.moved = 0
                continue
            if r.state == "done":
                if spec.until not in (None, "end"):
                    raise ScheduleError(
                        f"{spec}: {r.label} answered without pausing at {spec.until} "
                        f"(it went {r.step_from or 'from the start'} -> answer)"
                    )
                self.queue.pop(0)
                self.moved = 0
                continue
            if r.state == "blocked":
                if not self.moved:
                    raise ScheduleError(
                        f"{spec}: {r.label} is waiting for a lock held by "
                        f"{', '.join(r.blocked_by)}; release that request first"
                    )
                self.queue.pop(0)  # waiting on the way: go on, as the isolation tester does
                self.moved = 0
                continue
            self.moved += 1
            return r.index
        return min(runnable)

    @staticmethod
    def _met(spec: StepSpec, r: _Req, mark: int) -> bool:
        if spec.until is None:
            return True
        if spec.until == "end":
            return r.state == "done"
        return spec.until in r.trail[mark:]


class Pct:
    """Probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010): distinct random
    priorities d..d+n-1, d-1 change points drawn from 1..k; at the i-th change point the
    request about to run drops to priority d-i; always run the highest-priority runnable."""

    def __init__(self, n: int, k: int, d: int, rng: random.Random) -> None:
        self.priority = dict(enumerate(rng.sample(range(d, d + n), n)))
        points = rng.sample(range(1, k + 1), min(d - 1, k))
        self.changes = {step: d - i for i, step in enumerate(sorted(points), start=1)}
        self.steps = 0

    def choose(
        self, runnable: Sequence[int], candidates: Sequence[int], reqs: Sequence[_Req]
    ) -> int:
        self.steps += 1
        best = max(runnable, key=lambda i: self.priority[i])
        if self.steps in self.changes:
            self.priority[best] = self.changes[self.steps]
            best = max(runnable, key=lambda i: self.priority[i])
        return best


@dataclass(frozen=True)
class PctBound:
    n: int  # requests
    k: int  # steps of one run (estimated from each request running alone)
    d: int  # bug depth

    @property
    def p(self) -> float:
        return 1.0 / (self.n * float(self.k) ** (self.d - 1))

    def runs_for(self, confidence: float) -> int:
        if self.p >= 1.0:
            return 1
        return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - self.p))

    def confidence(self, runs: int) -> float:
        return 1.0 - (1.0 - self.p) ** runs

    def describe(self, runs: int, confidence: float = 0.95) -> str:
        return (
            f"PCT: n={self.n} requests, k={self.k} steps, depth d={self.d}: a run finds a given "
            f"depth-{self.d} bug with p >= 1/(n·k^(d-1)) = 1/{round(1 / self.p)} "
            f"({self.p:.3%}); {confidence:.0%} confidence needs {self.runs_for(confidence)} "
            f"runs; {runs} runs give {self.confidence(runs):.1%}"
        )


# -- the explorer -----------------------------------------------------------------------------


class Explorer:
    """One in-process reference service (strategy, isolation) and the oracle, for many
    schedules of one list of requests; every schedule gets a new order and payment."""

    def __init__(
        self,
        db: Database,
        fake: FakeRazorpay,
        gateway_url: str,
        *,
        strategy: str,
        isolation: str,
        requests: Sequence[RequestSpec],
        bound_s: float = 5.0,
        poll_s: float = 0.002,
        reduce: bool = True,
        amount: int = 50_000,
        keys: GatewayKeys = GatewayKeys(),
    ) -> None:
        if strategy not in STRATEGIES:
            raise ScenarioError(
                f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}"
            )
        self.db = db
        self.fake = fake
        self.gateway_url = gateway_url
        self.strategy = strategy
        self.isolation = normalise_isolation(isolation)
        self.specs = tuple(requests)
        self.bound_s = bound_s
        self.poll_s = poll_s
        self.reduce = reduce
        self.amount = amount
        self.keys = keys
        self.history = History(strategy=strategy)
        self.runs: list[ScheduleRun] = []
        # Whether the payment read takes a lock: FOR UPDATE, or the advisory lock before it.
        # A strategy this table does not know is assumed to lock (the guard tells if not).
        chosen = STRATEGIES[strategy]
        self.lock_rows = bool(
            getattr(chosen, "lock_rows", True) or getattr(chosen, "advisory", False)
        )
        self._active: Scheduler | None = None
        self._stock: list[PaymentContext] = []
        self._runtime: Runtime | None = None
        self._client: AsgiClient | None = None
        self._conn: Any = None
        self._baseline: oracle.Baseline | None = None
        self.observation: oracle.Observation | None = None

    async def __aenter__(self) -> Explorer:
        settings = Settings(
            database_url=self.db.asyncpg_url(),
            capture_strategy=self.strategy,
            isolation_level=self.isolation,
            razorpay_key_id=self.keys.key_id,
            razorpay_key_secret=self.keys.key_secret,
            razorpay_webhook_secret=self.keys.webhook_secret,
            razorpay_base_url=self.gateway_url,
            db_pool_size=10,
        )
        app = create_app(settings)
        self._runtime = app.state.runtime
        try:
            await self._runtime.startup()
            self._client = AsgiClient(app)
            # The oracle needs the tables, which startup() just created.
            await asyncio.to_thread(oracle.install, self.db.url)
            self._baseline = await asyncio.to_thread(oracle.baseline, self.db.url)
            self._conn = await asyncpg.connect(
                self.db.url, server_settings={"application_name": APPLICATION_NAME}
            )
            engine = self._runtime.engine.sync_engine
            event.listen(engine, "before_cursor_execute", self._on_statement)
            event.listen(engine, "commit", self._on_commit)
            event.listen(engine, "handle_error", self._on_error)
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
        if self._active is not None:
            await self._active.close()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._runtime is not None:
            # Closing the pool ends the service's backends, which flushes their deadlock
            # counters: the oracle's reading settles at once (see harness.oracle).
            await self._runtime.shutdown()
            self._runtime = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    # -- engine events, routed to the schedule that runs now -------------------------------

    def _label(self) -> str | None:
        probe = probes.current_probe()
        return probe.label if probe is not None and self._active is not None else None

    def _on_statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if (label := self._label()) is not None and self._active is not None:
            self._active.on_statement(label, statement)

    def _on_commit(self, conn: Any) -> None:
        if (label := self._label()) is not None and self._active is not None:
            self._active.on_commit(label)

    def _on_error(self, context: ExceptionContext) -> None:
        if (label := self._label()) is None or self._active is None:
            return
        exc: BaseException | None = context.original_exception
        cause = exc.__cause__ if exc is not None and exc.__cause__ is not None else exc
        message = str(getattr(cause, "message", None) or cause or "error").splitlines()[0]
        self._active.on_error(label, message)

    # -- running schedules -------------------------------------------------------------------

    async def _fresh(self) -> PaymentContext:
        """A new order and an authorized gateway payment (created a batch at a time)."""
        if not self._stock:
            assert self._client is not None
            orders = await asyncio.gather(
                *(self._client.create_order(self.amount, "INR") for _ in range(16))
            )
            for order in orders:
                payment = self.fake.authorize_payment(order["gateway_order_id"])
                self._stock.append(
                    PaymentContext(order["payment_id"], order["gateway_order_id"], payment)
                )
        return self._stock.pop(0)

    async def _blockers(self, pids: list[int]) -> dict[int, list[int]]:
        if not pids:
            return {}
        rows = await self._conn.fetch(_BLOCKERS, pids)
        return {int(row["pid"]): [int(p) for p in row["blockers"]] for row in rows}

    async def run(
        self, policy: Policy, *, name: str | None = None, expect: str | None = None
    ) -> ScheduleRun:
        ctx = await self._fresh()
        number = len(self.runs) + 1
        assert self._client is not None
        client = self._client
        reqs = [
            _Req(i, spec, prepare(spec.step, i, ctx, self.keys))
            for i, spec in enumerate(self.specs)
        ]

        async def send(r: _Req) -> Reply:
            r.invoke = self.history.invoke(
                r.prepared.f, r.label, number, ctx.payment_id, r.prepared.value
            )
            return await client.send(r.prepared)

        sched = Scheduler(
            reqs,
            send=send,
            blockers=self._blockers,
            isolation=self.isolation,
            lock_rows=self.lock_rows,
            reduce=self.reduce,
            bound_s=self.bound_s,
            poll_s=self.poll_s,
        )
        self._active = sched
        error = None
        try:
            await sched.drive(policy)
        except ScheduleError as exc:
            error = str(exc)
        finally:
            await sched.close()
            self._active = None
        for r in reqs:
            if r.invoke is not None:
                reply = r.reply or Reply(None, {}, {}, "no answer")
                self.history.complete(
                    r.invoke,
                    classify(reply.status),
                    value=reply.body,
                    status=reply.status,
                    error=reply.error,
                    server=reply.server(),
                )
        run = ScheduleRun(
            number=number,
            ref=ScheduleRef(
                self.strategy,
                self.isolation,
                tuple(s.kind.token for s in self.specs),
                tuple(sched.choices),
            ),
            payment_id=ctx.payment_id,
            gateway_payment_id=str(ctx.gateway_payment["id"]),
            name=name,
            decisions=sched.decisions,
            events=sched.events,
            replies={r.label: r.reply for r in reqs if r.reply is not None},
            waits=sched.waits,
            deadlocks=sched.deadlocks,
            stuck=sched.stuck,
            guard=sched.guard,
            error=error,
            pruned=sched.pruned,
            expect=expect,
            races=sched.races,
        )
        if isinstance(policy, Prefix) and policy.diverged_at is not None and not error:
            if sched.races and sched.races[0][0] < policy.diverged_at:
                run.note = (
                    f"went its own way at step {policy.diverged_at}, after PostgreSQL decided "
                    f"the race at step {sched.races[0][0]}"
                )
            else:
                run.error = "not deterministic: " + "; ".join(policy.notes)
        self.runs.append(run)
        return run

    async def exhaustive(
        self, *, limit: int = 5000, on_run: Callable[[ScheduleRun], None] = lambda r: None
    ) -> bool:
        """Every schedule, depth-first; True when the search finished within `limit`."""
        prefix: list[int] = []
        count = 0
        while True:
            run = await self.run(Prefix(prefix))
            count += 1
            on_run(run)
            if run.guard or (run.error and run.error.startswith("not deterministic")):
                return False
            nxt = next_prefix(run.decisions)
            if nxt is None:
                return True
            if count >= limit:
                return False
            prefix = nxt

    async def pilot(self, on_run: Callable[[ScheduleRun], None] = lambda r: None) -> int:
        """k for PCT: the steps each request takes when it runs alone first, summed."""
        k = 0
        for spec in self.specs:
            run = await self.run(
                Steps([StepSpec(spec.label, "end")]), name=f"pilot: {spec.label} first"
            )
            on_run(run)
            k += sum(1 for c in run.choices if self.specs[c].label == spec.label)
        return max(k, 1)

    async def pct(
        self,
        runs: int,
        depth: int,
        seed: int,
        *,
        k: int | None = None,
        on_run: Callable[[ScheduleRun], None] = lambda r: None,
    ) -> PctBound:
        if k is None:
            k = await self.pilot(on_run)
        bound = PctBound(len(self.specs), k, depth)
        for i in range(runs):
            rng = random.Random(seed * 1_000_003 + i)
            on_run(await self.run(Pct(len(self.specs), k, depth, rng), name=f"pct run {i + 1}"))
        return bound

    async def run_steps(
        self, steps: Sequence[StepSpec], *, name: str | None = None, expect: str | None = None
    ) -> ScheduleRun:
        return await self.run(Steps(steps), name=name, expect=expect)

    async def replay(
        self, ref: ScheduleRef, *, name: str | None = None, expect: str | None = None
    ) -> ScheduleRun:
        return await self.run(Prefix(ref.choices, exact=True), name=name, expect=expect)

    # -- judging -------------------------------------------------------------------------------

    def judge(self) -> checker.Verdict:
        """Observe every schedule's payment with the oracle; judge all, then each schedule.

        Call after the `async with` block: the service's pool must be closed first so the
        deadlock counter has settled. Per schedule, no_deadlock reads the mutual waits the
        scheduler saw for that schedule's requests (pg_blocking_pids), since the counter
        is one number for the whole database."""
        assert self._baseline is not None
        obs = oracle.observe(
            self.db.url,
            oracle.OracleConfig.reference(),
            since=self._baseline,
            payment_ids=[r.payment_id for r in self.runs],
            gateway_counters=self.fake.counters(),
            gateway_payment_ids=[r.gateway_payment_id for r in self.runs],
        )
        self.observation = obs
        ops = self.history.ops()
        verdict = checker.check(ops, obs)
        by_trial: dict[int, list[Operation]] = {}
        for op in ops:
            by_trial.setdefault(op.trial, []).append(op)
        for run in self.runs:
            gid = run.gateway_payment_id
            state = obs.payments.get(run.payment_id)
            sub = replace(
                obs,
                audit=tuple(a for a in obs.audit if a.payment_id == run.payment_id),
                payments={run.payment_id: state} if state is not None else {},
                gateway_captures={gid: obs.gateway_captures[gid]}
                if gid in obs.gateway_captures
                else {},
                gateway_accepted={gid: obs.gateway_accepted[gid]}
                if gid in obs.gateway_accepted
                else {},
                deadlocks=len(run.deadlocks),
                deadlocks_settled=True,
                deadlock_note="",
            )
            v = checker.check(by_trial.get(run.number, []), sub)
            run.valid = v.valid
            run.violated = tuple(n for n, r in v.results.items() if r.valid is False)
            run.unknown = tuple(n for n, r in v.results.items() if r.valid == "unknown")
        return verdict


def next_prefix(decisions: Sequence[tuple[tuple[int, ...], int]]) -> list[int] | None:
    """The next branch of the depth-first search, or None when every branch was taken."""
    for i in range(len(decisions) - 1, -1, -1):
        candidates, chosen = decisions[i]
        later = [c for c in candidates if c > chosen]
        if later:
            return [c for _, c in decisions[:i]] + [later[0]]
    return None


# -- results ---------------------------------------------------------------------------------


@dataclass
class ExploreResult:
    title: str
    strategy: str
    isolation: str
    specs: tuple[RequestSpec, ...]
    mode: str
    runs: list[ScheduleRun]
    verdict: checker.Verdict
    duration_s: float
    complete: bool = True
    bound: PctBound | None = None
    confidence: float = 0.95
    scenario: Scenario | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def schedules_per_s(self) -> float:
        return len(self.runs) / self.duration_s if self.duration_s > 0 else 0.0

    def violating(self) -> list[ScheduleRun]:
        return [r for r in self.runs if r.valid is False]

    def waiting(self) -> list[ScheduleRun]:
        return [r for r in self.runs if r.waits]

    def by_checker(self, runs: Sequence[ScheduleRun] | None = None) -> dict[str, int]:
        counts = {name: 0 for name in self.verdict.results}
        for run in self.runs if runs is None else runs:
            for name in run.violated:
                counts[name] = counts.get(name, 0) + 1
        return counts

    def shortest_violation(self) -> ScheduleRun | None:
        """Fewest timeline rows, then fewest switches between requests (easiest to read);
        one that PostgreSQL's own race did not decide, when there is one."""
        runs = self.violating()
        if not runs:
            return None
        return min(runs, key=lambda r: (bool(r.races), len(r.events), r.switches(), r.number))

    def shown(self) -> tuple[str, ScheduleRun] | None:
        """The schedule worth drawing: the shortest violation, else the first that waited."""
        if (run := self.shortest_violation()) is not None:
            return "shortest violating schedule", run
        if waited := sorted(self.waiting(), key=lambda r: (bool(r.races), r.number)):
            run = waited[0]
            who = ", ".join(
                sorted({f"{w.label} waited for {'+'.join(w.blocked_by)}" for w in run.waits})
            )
            return f"a schedule where {who}", run
        return None

    def outcomes(
        self, runs: Sequence[ScheduleRun] | None = None
    ) -> list[tuple[str, tuple[str, ...], list[ScheduleRun]]]:
        groups: dict[tuple[str, tuple[str, ...]], list[ScheduleRun]] = {}
        for run in self.runs if runs is None else runs:
            groups.setdefault((run.outcome(), run.violated), []).append(run)
        return [(o, v, runs) for (o, v), runs in groups.items()]

    def mismatches(self) -> list[str]:
        """Where the result differs from what the scenario (or the schedules) expected."""
        problems = []
        for run in self.runs:
            if run.expect is not None and _word(run.valid) != run.expect:
                problems.append(
                    f"{run.name or run.id}: expected {run.expect}, got {_word(run.valid)}"
                )
        sc = self.scenario
        if sc is not None and sc.expect is not None and _word(self.verdict.valid) != sc.expect:
            problems.append(
                f"scenario {sc.name}: expected {sc.expect}, got {_word(self.verdict.valid)}"
            )
        if sc is not None and sc.expect_checks is not None:
            got = tuple(sorted(n for n, c in self.by_checker().items() if c))
            if got != sc.expect_checks:
                problems.append(
                    f"scenario {sc.name}: expected violations of {list(sc.expect_checks)}, "
                    f"got {list(got)}"
                )
        return problems

    def problems(self) -> list[str]:
        """Reasons the run itself cannot be trusted (exit 2)."""
        out = [f"schedule {r.id}: {g}" for r in self.runs for g in r.guard]
        if out:
            out.append(
                "the explorer's step table (harness.explore.predict) no longer matches the "
                "capture path; update it before trusting collapsed schedules"
            )
        out += [f"schedule {r.name or r.id}: {r.error}" for r in self.runs if r.error]
        return out

    def exit_code(self) -> int:
        if self.problems():
            return EXIT_ERROR
        if self.scenario is not None and (
            self.scenario.expect or self.scenario.expect_checks or any(r.expect for r in self.runs)
        ):
            return EXIT_VIOLATED if self.mismatches() else EXIT_OK
        return EXIT_OK if self.verdict.valid is True else EXIT_VIOLATED

    # -- renderings ------------------------------------------------------------------------

    def header(self) -> list[str]:
        requests = ", ".join(f"{s.label} ({s.describe()})" for s in self.specs)
        lines = [
            f"{self.title}",
            f"strategy {self.strategy} · {self.isolation} · requests {requests}",
        ]
        if self.mode == "exhaustive":
            pruned = sum(r.pruned for r in self.runs)
            lines.append(
                f"mode exhaustive: {len(self.runs)} schedules "
                f"({'every schedule' if self.complete else 'INCOMPLETE'}; "
                f"{pruned} equivalent branch{'es' if pruned != 1 else ''} collapsed)"
            )
        elif self.mode == "pct" and self.bound is not None:
            lines.append(self.bound.describe(len(self.runs) - self.bound.n, self.confidence))
        else:
            lines.append(f"mode {self.mode}: {len(self.runs)} schedules")
        return lines

    def counts(self, runs: Sequence[ScheduleRun] | None = None) -> list[str]:
        runs = self.runs if runs is None else runs
        lines = [
            f"schedules: {len(runs)} · with a lock wait: {sum(1 for r in runs if r.waits)} · "
            f"deadlocks: {sum(1 for r in runs if r.deadlocks)} · stuck: "
            f"{sum(1 for r in runs if r.stuck)} · violating: "
            f"{sum(1 for r in runs if r.valid is False)}"
        ]
        for name, count in self.by_checker(runs).items():
            if count:
                lines.append(f"  {name}: {count} schedule(s)")
        return lines

    def raced(self) -> list[ScheduleRun]:
        return [r for r in self.runs if r.races]

    def golden(self) -> str:
        """Deterministic text (no times, pids or row ids): the golden files' content.

        A schedule in which PostgreSQL decided a race between waiters is shown up to that
        step only; what came after was the server's choice and may differ next time."""
        stable = [r for r in self.runs if not r.races]
        lines = [*self.header(), *self.counts(stable)]
        if raced := self.raced():
            lines.append(
                f"decided by a race inside PostgreSQL after a step of theirs: {len(raced)} "
                "more schedule(s), not counted above"
            )
        lines.append("outcomes:")
        for outcome, violated, runs in self.outcomes(stable):
            tail = f"  [{', '.join(violated)}]" if violated else ""
            lines.append(f"  {len(runs):>3} x {outcome}{tail}")
        lines.append("schedules:")
        for run in self.runs:
            label = f"{run.name}: " if run.name else ""
            if run.races:
                step, who = run.races[0]
                ref = replace(run.ref, choices=run.choices[:step])
                lines.append(f"  {label}{ref.id}…  race: {' and '.join(who)}")
                continue
            waits = "; ".join(
                f"{w.label} waited for {'+'.join(w.blocked_by)} ({w.what})" for w in run.waits
            )
            lines.append(
                f"  {label}{run.id}  {_word(run.valid)}" + (f"  waits: {waits}" if waits else "")
            )
        if (shown := self.shown()) is not None:
            what, run = shown
            lines += ["", f"{what}: {run.id}", render_text(run.events)]
        for problem in self.mismatches() + self.problems():
            lines.append(f"! {problem}")
        return "\n".join(lines) + "\n"

    def html_fragment(self) -> str:
        shown = self.shown()
        if shown is None:
            return '<p class="meta">no schedule violated a checker or waited for a lock</p>'
        what, run = shown
        title = f"<h3>{html.escape(what)}: <code>{html.escape(run.id)}</code></h3>"
        return title + render_html(run.events)

    def render(self, console: Console, out: Path | None = None) -> None:
        for line in self.header():
            console.print(Text(line))
        if self.scenario is not None and self.scenario.path is not None:
            console.print(Text(f"from {self.scenario.path}", style="dim"))
        table = Table(title="schedules by outcome")
        for column in ("schedules", "outcome", "violated checkers", "first id"):
            table.add_column(column, justify="right" if column == "schedules" else "left")
        for outcome, violated, runs in self.outcomes():
            table.add_row(
                str(len(runs)),
                outcome,
                Text(", ".join(violated) or "none", style="bold red" if violated else "green"),
                runs[0].id,
            )
        console.print(table)
        for line in self.counts():
            console.print(Text(line))
        if raced := self.raced():
            console.print(
                Text(
                    f"{len(raced)} schedule(s) released two waiters of one row with one commit: "
                    "which of them locked first was PostgreSQL's choice (marked <race>)",
                    style="yellow",
                )
            )
        if (shown := self.shown()) is not None:
            what, run = shown
            console.print(
                Panel(Text(render_text(run.events)), title=Text(f"{what}: {run.id}"), expand=False)
            )
            console.print(Text(f"replay it: payrace explore --replay {run.id}"))
        console.print(
            Text(
                f"{len(self.runs)} schedules in {self.duration_s:.2f} s "
                f"({self.schedules_per_s:.1f} schedules/s)"
            )
        )
        for note in self.notes:
            console.print(Text(note, style="yellow"))
        for problem in self.mismatches():
            console.print(Text(f"unexpected: {problem}", style="bold red"))
        for problem in self.problems():
            console.print(Text(problem, style="bold red"))
        word = {EXIT_OK: "as expected" if self.scenario else "valid", EXIT_VIOLATED: "violated"}
        code = self.exit_code()
        console.print(Text(f"verdict: {word.get(code, 'error')} (exit code {code})",
                           style="green" if code == EXIT_OK else "bold red"))  # fmt: skip
        if out is not None:
            console.print(Text(f"reports: {out}"))

    def summary(
        self, *, command: str, run_id: str, database: dict[str, Any], started_at: str
    ) -> dict[str, Any]:
        """summary.json in the shape harness.report reads (contracts.md), mode "explore"."""
        shown = self.shortest_violation()
        first = None
        if shown is not None:
            first = {
                "trial": shown.number,
                "payment": shown.payment_id,
                "schedule_id": shown.id,
                "checks": list(shown.violated),
                "timeline": [e.to_json() for e in shown.events],
            }
        expected = (
            self.scenario.expect
            if self.scenario and self.scenario.expect
            else DECLARED.get(self.strategy)
        )
        code = self.exit_code()
        strategy = {
            "expected": expected,
            "valid": self.verdict.valid,
            "trials": len(self.runs),
            "violating_trials": len(self.violating()),
            "trials_per_second": round(self.schedules_per_s, 2),
            "duration_s": round(self.duration_s, 3),
            "checks": {name: r.to_json() for name, r in self.verdict.results.items()},
            "latency_ms": {},
            "plots": {},
            "first_violation": first,
            "explore": {
                "mode": self.mode,
                "isolation_level": self.isolation,
                "requests": [s.kind.token for s in self.specs],
                "complete": self.complete,
                "schedules": len(self.runs),
                "waiting": len(self.waiting()),
                "deadlocks": sum(1 for r in self.runs if r.deadlocks),
                "stuck": sum(1 for r in self.runs if r.stuck),
                "races": len(self.raced()),
                "violations_by_checker": self.by_checker(),
                "pct": None
                if self.bound is None
                else {
                    "n": self.bound.n,
                    "k": self.bound.k,
                    "d": self.bound.d,
                    "p": self.bound.p,
                    "runs_for_confidence": self.bound.runs_for(self.confidence),
                    "confidence": self.confidence,
                },
                "timeline_html": self.html_fragment(),
                "runs": [_run_json(r) for r in self.runs],
            },
        }
        return {
            "run_id": run_id,
            "command": command,
            "started_at": started_at,
            "duration_s": round(self.duration_s, 3),
            "machine": machine(),
            "database": database,
            "target": "inproc",
            "mode": "explore",
            "trials": len(self.runs),
            "isolation_level": self.isolation,
            "strategies": {self.strategy: strategy},
            "gates": [],
            "verdict": "valid"
            if code == EXIT_OK
            else ("violated" if code == EXIT_VIOLATED else "error"),
            "exit_code": code,
        }


def _word(valid: checker.Validity) -> str:
    if valid is True:
        return "valid"
    return "violated" if valid is False else "unknown"


def _run_json(run: ScheduleRun) -> dict[str, Any]:
    return {
        "number": run.number,
        "id": run.id,
        "name": run.name,
        "payment": run.payment_id,
        "valid": run.valid,
        "violated": list(run.violated),
        "unknown": list(run.unknown),
        "outcome": run.outcome(),
        "waits": [
            {"label": w.label, "blocked_by": list(w.blocked_by), "what": w.what} for w in run.waits
        ],
        "deadlocks": [list(c) for c in run.deadlocks],
        "stuck": run.stuck,
        "races": [{"step": step, "requests": list(who)} for step, who in run.races],
        "note": run.note,
        "error": run.error,
        "timeline": [e.to_json() for e in run.events],
    }


# -- what a command asks for ----------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One exploration: a scenario file, a replay id, or the command line's words."""

    scenario: Scenario
    replay: ScheduleRef | None = None


def make_plan(
    *,
    strategy: str,
    requests: Sequence[str],
    isolation: str,
    pct_runs: int | None,
    depth: int,
    seed: int,
    replay: str | None,
    scenario: Path | None,
) -> Plan:
    if replay and scenario:
        raise ScenarioError("give either --replay ID or --scenario FILE, not both")
    if scenario is not None:
        return Plan(load_scenario(scenario, strategies=list(STRATEGIES)))
    if replay:
        ref = parse_schedule_id(replay)
        strategy, isolation, requests = ref.strategy, ref.isolation, list(ref.requests)
    if strategy not in STRATEGIES:
        raise ScenarioError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if depth < 1 or depth > 10:
        raise ScenarioError("--depth must be between 1 and 10")
    if pct_runs is not None and not 1 <= pct_runs <= 1_000_000:
        raise ScenarioError("--pct must be between 1 and 1000000 runs")
    specs = parse_requests(requests)
    mode = (
        "schedules"
        if replay
        else ("pct" if pct_runs is not None or len(specs) > 2 else "exhaustive")
    )
    sc = Scenario(
        name=f"{strategy} at {normalise_isolation(isolation)}",
        strategy=strategy,
        isolation=normalise_isolation(isolation),
        requests=tuple(s.kind.token for s in specs),
        mode=mode,  # type: ignore[arg-type]
        pct_runs=pct_runs or 0,
        depth=depth,
        seed=seed,
        specs=specs,
    )
    return Plan(sc, parse_schedule_id(replay) if replay else None)


async def execute(
    plan: Plan,
    db: Database,
    fake: FakeRazorpay,
    gateway_url: str,
    *,
    on_start: Callable[[str, int | None], None] = lambda text, total: None,
    on_run: Callable[[ScheduleRun], None] = lambda r: None,
    poll_s: float = 0.002,
) -> ExploreResult:
    sc = plan.scenario
    explorer = Explorer(
        db,
        fake,
        gateway_url,
        strategy=sc.strategy,
        isolation=sc.isolation,
        requests=sc.specs,
        bound_s=sc.bound_s,
        poll_s=poll_s,
        reduce=sc.reduce,
    )
    complete = True
    bound = None
    notes: list[str] = []
    async with explorer:
        started = time.perf_counter()  # the exploration itself: service start excluded
        if plan.replay is not None:
            on_start("replay", 1)
            on_run(await explorer.replay(plan.replay, name="replay"))
        elif sc.mode == "schedules":
            on_start("explicit schedules", len(sc.schedules))
            for schedule in sc.schedules:
                on_run(await _explicit(explorer, schedule))
        elif sc.mode == "exhaustive":
            on_start("every schedule", None)
            complete = await explorer.exhaustive(limit=sc.max_schedules, on_run=on_run)
            if not complete:
                notes.append(f"stopped after {len(explorer.runs)} schedules (max_schedules)")
        else:
            on_start("PCT pilot runs", None)
            k = await explorer.pilot(on_run)
            probe = PctBound(len(sc.specs), k, sc.depth)
            runs = sc.pct_runs or min(probe.runs_for(sc.confidence), 2000)
            if not sc.pct_runs:
                notes.append(
                    f"--pct not given: running {runs} runs "
                    f"({probe.runs_for(sc.confidence)} needed for {sc.confidence:.0%} confidence)"
                )
            on_start("PCT runs", runs)
            bound = await explorer.pct(runs, sc.depth, sc.seed, k=k, on_run=on_run)
            biggest = max((len(r.choices) for r in explorer.runs), default=0)
            if biggest > k:
                notes.append(
                    f"a run took {biggest} steps, more than k={k}: the bound is approximate"
                )
        duration = time.perf_counter() - started
    verdict = await asyncio.to_thread(explorer.judge)
    return ExploreResult(
        title=f"scenario {sc.name}" + (f": {sc.description}" if sc.description else ""),
        strategy=sc.strategy,
        isolation=sc.isolation,
        specs=sc.specs,
        mode="replay" if plan.replay else sc.mode,
        runs=explorer.runs,
        verdict=verdict,
        duration_s=duration,
        complete=complete,
        bound=bound,
        confidence=sc.confidence,
        scenario=sc if sc.path is not None else None,
        notes=notes,
    )


async def _explicit(explorer: Explorer, schedule: ExplicitSchedule) -> ScheduleRun:
    if schedule.id is not None:
        return await explorer.replay(
            parse_schedule_id(schedule.id), name=schedule.name, expect=schedule.expect
        )
    return await explorer.run_steps(schedule.steps, name=schedule.name, expect=schedule.expect)


def explore_main(
    strategy: str,
    requests: list[str],
    isolation: str,
    pct_runs: int | None,
    depth: int,
    seed: int,
    replay: str | None,
    scenario: Path | None,
    dsn: str | None,
    out_dir: Path,
    console: Console,
) -> int:
    """`payrace explore`: 0 clean (or as the scenario expects), 1 violation, 2 usage or
    infrastructure error (the message says what to do)."""
    try:
        plan = make_plan(
            strategy=strategy,
            requests=requests,
            isolation=isolation,
            pct_runs=pct_runs,
            depth=depth,
            seed=seed,
            replay=replay,
            scenario=scenario,
        )
    except ScenarioError as exc:
        console.print(Text(f"payrace explore: {exc}", style="bold red"))
        return EXIT_ERROR
    command = shlex.join(["payrace", *sys.argv[1:]]) if sys.argv[1:] else "payrace explore"
    started_at = datetime.now(UTC)
    sc = plan.scenario
    run_id = f"{started_at:%Y%m%d-%H%M%S}-{sc.strategy}-explore"
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        MofNCompleteColumn(),
        TextColumn("{task.fields[found]}"),
        console=console,
        transient=True,
    )
    task = progress.add_task("starting", total=None, found="")
    found = Counter[str]()

    def on_start(text: str, total: int | None) -> None:
        progress.update(task, description=text, total=total, completed=0)

    def on_run(run: ScheduleRun) -> None:
        found["waiting"] += bool(run.waits)
        progress.update(task, advance=1, found=f"{found['waiting']} waited")

    try:
        with provide_postgres(dsn, announce=lambda line: console.print(Text(line))) as db:
            fake = FakeRazorpay(GatewayKeys(), seed=seed)
            with GatewayServer(fake) as server, progress:
                result = asyncio.run(
                    execute(plan, db, fake, server.url, on_start=on_start, on_run=on_run)
                )
            database = {
                "route": db.route,
                "server_version": db.server_version,
                "fast": db.fast,
                "describe": db.describe(),
            }
    except KeyboardInterrupt:
        console.print(
            Text(
                "payrace explore: interrupted; everything it started was stopped", style="bold red"
            )
        )
        return EXIT_ERROR
    except ProviderError as exc:
        console.print(Text(f"payrace explore: {exc}", style="bold red"))
        return EXIT_ERROR
    except ScenarioError as exc:
        console.print(Text(f"payrace explore: {exc}", style="bold red"))
        return EXIT_ERROR
    except (OSError, TimeoutError, RuntimeError, oracle.OracleError, asyncpg.PostgresError) as exc:
        console.print(
            Text(
                f"payrace explore: infrastructure error: {type(exc).__name__}: {exc}; check that "
                "PostgreSQL is reachable (--dsn) and that nothing else holds the tables' locks",
                style="bold red",
            )
        )
        return EXIT_ERROR
    out = out_dir / run_id
    write_reports(result, out, command=command, run_id=run_id, database=database,
                  started_at=started_at.isoformat(timespec="seconds"))  # fmt: skip
    result.render(console, out)
    return result.exit_code()


def write_reports(
    result: ExploreResult,
    out: Path,
    *,
    command: str,
    run_id: str,
    database: dict[str, Any],
    started_at: str,
    history: History | None = None,
) -> dict[str, Path]:
    """summary.json / junit.xml / report.html (harness.report), explore.txt, timeline.html."""
    from harness import report

    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary(
        command=command, run_id=run_id, database=database, started_at=started_at
    )
    written = report.write_all(summary, out)
    (out / "explore.txt").write_text(result.golden(), encoding="utf-8")
    (out / "timeline.html").write_text(result.html_fragment() + "\n", encoding="utf-8")
    written |= {"explore": out / "explore.txt", "timeline": out / "timeline.html"}
    if history is not None:
        history.to_jsonl(out / "history.jsonl")
    return written


# -- the pause point's price -----------------------------------------------------------------


def pause_overhead(iterations: int = 200_000) -> dict[str, float]:
    """ns per `await pause(point)` without a controller, against not calling it at all and
    against awaiting an empty coroutine (what any call point in async code costs)."""

    async def empty() -> None:
        return None

    async def timed(kind: str) -> float:
        started = time.perf_counter_ns()
        if kind == "pause":
            for _ in range(iterations):
                await probes.pause("payment_read", "pending")
        elif kind == "empty":
            for _ in range(iterations):
                await empty()
        else:
            for _ in range(iterations):
                pass
        return (time.perf_counter_ns() - started) / iterations

    async def best() -> dict[str, float]:
        # Best of five: what the call costs, not what else the machine was doing meanwhile.
        return {
            kind: min([await timed(kind) for _ in range(5)]) for kind in ("pause", "empty", "loop")
        }

    ns = asyncio.run(best())
    return {
        "pause_ns": ns["pause"],
        "empty_coroutine_ns": ns["empty"],
        "loop_ns": ns["loop"],
        "overhead_ns": ns["pause"] - ns["loop"],
    }


def _bench(argv: Sequence[str]) -> int:
    """python -m harness.explore [pause-overhead | bench [--dsn DSN]]

    bench: every schedule of a client callback + payment.captured webhook pair at READ
    COMMITTED, for naive and for_update, collapsed and not."""
    if not argv or argv[0] == "pause-overhead":
        figures = pause_overhead()
        print(
            f"await pause() without a controller: {figures['pause_ns']:.0f} ns/call; "
            f"await of an empty coroutine: {figures['empty_coroutine_ns']:.0f} ns; loop without "
            f"either: {figures['loop_ns']:.0f} ns/iteration; pause() costs "
            f"{figures['overhead_ns']:.0f} ns/call more than not calling it"
        )
        return 0
    if argv[0] == "bench":
        dsn = argv[2] if len(argv) > 2 and argv[1] == "--dsn" else None
        with provide_postgres(dsn) as db:
            fake = FakeRazorpay(GatewayKeys())
            with GatewayServer(fake) as server:
                for strategy in ("naive", "for_update"):
                    for reduce in (True, False):
                        plan = make_plan(strategy=strategy, requests=["client", "webhook"],
                                         isolation="READ COMMITTED", pct_runs=None, depth=2,
                                         seed=1, replay=None, scenario=None)  # fmt: skip
                        plan = Plan(replace(plan.scenario, reduce=reduce))
                        started = time.perf_counter()
                        result = asyncio.run(execute(plan, db, fake, server.url))
                        total = time.perf_counter() - started
                        print(
                            f"{strategy:<10} {'collapsed' if reduce else 'every interleaving'}: "
                            f"{len(result.runs)} schedules in {result.duration_s:.2f} s = "
                            f"{result.schedules_per_s:.1f} schedules/s ({total:.2f} s with "
                            f"service start and judging); {len(result.violating())} violating, "
                            f"{len(result.waiting())} with a lock wait"
                        )
        return 0
    print(_bench.__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(_bench(sys.argv[1:]))


__all__ = [
    "ExploreResult",
    "Explorer",
    "PctBound",
    "ScheduleRun",
    "Scheduler",
    "StepClass",
    "dependent",
    "execute",
    "explore_main",
    "make_plan",
    "pause_overhead",
    "predict",
]
