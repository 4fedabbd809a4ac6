"""The scheduler: parks every request at its pause points and releases one step at a time.

    ScheduleError     an explicit schedule or id this service cannot follow
    Wait              a lock wait PostgreSQL reported
    ScheduledRequest  one request within a schedule: its gate, pause point, step in flight
    answer_text()     "200 captured (idempotent)": a reply as the timeline shows it
    blocking_pids()   pg_blocking_pids() for the requests' backends (explore.waits)
    Scheduler         the PauseController for one schedule:
    ├── reached()         a request arrived at a pause point: park it until released
    ├── on_statement(), on_commit(), on_error()
    │                     what the service's engine did for a request (SQLAlchemy events)
    ├── step()            release one request and settle: each request paused, answered, or
    │                     waiting for a lock that pg_blocking_pids() says another request
    │                     holds (explore.waits names who waits for whom); mutual waits
    │                     are reported as deadlocks, a step that does neither within the
    │                     bound is cancelled and reported as stuck
    ├── run_local()       fold LOCAL steps into the step before them
    ├── drive()           ask a policy (explore.policies) which runnable request goes next,
    │                     until every request answered; equivalent schedules are pruned
    └── close()           let every request finish without pauses

The step model it applies — step classes, the table it checks every executed step against,
which steps commute — is explore.steps: the reference service's table, or opaque() for an
app whose code payrace has not read. explore.engine runs a Scheduler per schedule against
the in-process service and judges the outcome; explore.findings adds the schedules up and
draws them.

Waiting is read from PostgreSQL, never from the clock: after a release the scheduler polls
(every poll_s at first, less often while nothing moves) until every request is paused,
answered, or waiting on a backend of another request according to pg_blocking_pids() on its
own connection; only then does it choose again, and it reads waits at that settled state,
where no lock can change hands.

Races inside PostgreSQL. When one step releases two waiters of the same row (side by side,
or one queued behind the other), which of them locks the row's new version first is decided
inside the server (both re-lock it through EvalPlanQual; there is no pause point between).
Such steps are marked <race>; what follows them may differ from one run to the next, so
golden output shows those schedules only up to the race, and replaying one may take the
other branch (the run then says so).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from payrace.harness.explore.scenario import RequestSpec
from payrace.harness.explore.steps import (
    StepClass,
    StepModel,
    dependent,
    describe_statement,
    predict,
    statement_class,
)
from payrace.harness.explore.waits import blocking_pids, name_waits
from payrace.harness.model.client import Prepared, Reply
from payrace.harness.model.history import Operation
from payrace.harness.reports.timeline import TimelineEvent, phrase
from payrace.pausing import ProbeContext, controlled

if TYPE_CHECKING:
    # Policies read ScheduledRequest: importing them at run time would be a cycle.
    from payrace.harness.explore.policies import Policy


class ScheduleError(RuntimeError):
    """An explicit schedule or id cannot be followed by this service (says where and why)."""


# -- one request in a schedule --------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    label: str
    blocked_by: tuple[str, ...]
    what: str  # the statement it waits to run, described
    blocker_pids: tuple[int, ...] = ()  # what pg_blocking_pids() answered


@dataclass
class ScheduledRequest:
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


# The longest the scheduler lets running requests be before it asks PostgreSQL again.
_QUIET_CAP_S = 0.025


def _wake(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)


class Scheduler:
    """The explorer's PauseController for one schedule (one payment, fresh state)."""

    def __init__(
        self,
        reqs: list[ScheduledRequest],
        *,
        send: Callable[[ScheduledRequest], Any],
        blockers: Callable[[list[int]], Any],
        isolation: str,
        lock_rows: bool,
        reduce: bool,
        bound_s: float,
        poll_s: float,
        model: StepModel | None = None,
        exact_pids: bool = True,
        statement_of: Callable[[int], str | None] | None = None,
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
        # The step table (explore.steps): the reference service's by default; an app's code
        # is not read, so its model is opaque() (nothing folded, nothing pruned).
        self._model = model
        # False for an app: its requests need not name their backends (explore.waits).
        self.exact_pids = exact_pids
        self._statement_of = statement_of
        self._learned: dict[str, int] = {}  # label -> backend pid found by elimination
        # Set when a request parks or answers; _pause() returns early on it.
        self._changed = False
        self._waker: asyncio.Future[None] | None = None
        self._free = False  # after a give-up: let everything run to its end
        self._seq = 0
        self._pending: list[tuple[int, int, str, str]] = []
        self._released: ScheduledRequest | None = None
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
        self._notify()
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

    def _log(self, r: ScheduledRequest, text: str) -> None:
        # Requests that move at the same time (a commit wakes a waiter while the committer
        # answers) log in a fixed order: the released request first, then by index.
        key = -1 if r is self._released else r.index
        self._pending.append((key, len(self._pending), r.label, text))

    def _flush(self) -> None:
        for _, _, label, text in sorted(self._pending):
            self.events.append(TimelineEvent(self._seq, label, text))
            self._seq += 1
        self._pending.clear()

    def _arrive(self, r: ScheduledRequest, text: str | None) -> None:
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

    def predicted(self, r: ScheduledRequest) -> StepClass:
        if self._model is not None:
            return self._model(r.spec, r.point, r.detail)
        return predict(
            r.spec, r.point, r.detail, isolation=self.isolation, lock_rows=self.lock_rows
        )

    def _pid(self, r: ScheduledRequest) -> int | None:
        if r.probe is not None and r.probe.backend_pid is not None:
            return r.probe.backend_pid
        return self._learned.get(r.label)

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

    async def _request(self, r: ScheduledRequest) -> None:
        try:
            with controlled(self, r.label) as probe:
                r.probe = probe
                r.reply = await self._send(r)
        except asyncio.CancelledError:
            # Ours (a stuck step) or the run's end: either way the request has no answer.
            r.reply = Reply(None, {}, {}, "cancelled by the explorer")
        finally:
            if r.state != "done":
                self._arrive(r, f"→ {answer_text(r.reply)}")
            r.state = "done"
            self._notify()

    def _notify(self) -> None:
        self._changed = True
        if self._waker is not None and not self._waker.done():
            self._waker.set_result(None)

    async def _pause(self, seconds: float) -> None:
        """Until a request parks or answers, or `seconds` pass: one timer and one future,
        where asyncio.timeout() around Event.wait() cost a third of the scheduler's time."""
        if self._changed:
            return
        loop = asyncio.get_running_loop()
        waker = self._waker = loop.create_future()
        timer = loop.call_later(seconds, _wake, waker)
        try:
            await waker
        finally:
            timer.cancel()
            self._waker = None

    async def _settle(self) -> None:
        """Until every request is paused, answered or waiting for another one's lock."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.bound_s
        # How long to let a running request be before asking PostgreSQL (again) whether it
        # waits: poll_s at first, doubling while nothing moves, up to _QUIET_CAP_S. A request
        # that runs a while without waiting (a gateway call, a deadlock PostgreSQL breaks
        # only after deadlock_timeout) is then not asked about every poll_s, each question
        # a round trip that competes with the requests for the same CPU. Only when the
        # scheduler looks changes, never what it concludes: waits are read from PostgreSQL.
        quiet = self.poll_s
        while True:
            self._changed = False
            active = [r for r in self.reqs if r.state in ("running", "blocked")]
            if not active:
                return
            if any(r.state == "running" for r in active):
                await self._pause(quiet)
                if self._changed:
                    quiet = self.poll_s
                    continue
            pid_of = {r.label: self._pid(r) for r in self.reqs if r.state != "done"}
            asked = sorted({p for r in active if (p := pid_of[r.label]) is not None})
            answer: dict[int, list[int]] = await self._blockers(asked)
            if self._changed:
                quiet = self.poll_s
                continue  # someone moved while we asked: the answer may be stale
            found = name_waits(
                [(r.label, pid_of[r.label]) for r in active],
                [(r.label, pid_of[r.label]) for r in self.reqs if r.state not in ("new", "done")],
                answer,
                eliminate=not self.exact_pids,
            )
            self._learned.update(found.learned)
            all_blocked = True
            for r in active:
                waiting = found.waits.get(r.label)
                if waiting is None:
                    all_blocked = False
                    if r.state == "blocked":
                        r.state = "running"  # the holder committed: it runs again
                    continue
                r.state, r.blocked_by, r.blocker_pids = "blocked", waiting.by, waiting.pids
                # No engine events from an app: what it waits in, as PostgreSQL shows it.
                statement = (
                    self._statement_of(waiting.pid)
                    if self._statement_of is not None and waiting.pid is not None
                    else None
                )
                if statement is not None and not r.statements:
                    r.statements.append(statement)
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
                await self._pause(quiet)
            quiet = min(quiet * 2, max(self.poll_s, _QUIET_CAP_S))

    def _waiting_on(self, label: str, graph: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
        """The requests that wait, directly or through others, for `label` in `graph`."""
        found: set[str] = set()
        frontier = {label}
        while frontier:
            frontier = {w for w, by in graph.items() if set(by) & frontier} - found
            found |= frontier
        found.discard(label)
        return tuple(sorted(found, key=lambda name: self._by_label[name].index))

    def _cycle(self, active: Sequence[ScheduledRequest]) -> tuple[str, ...] | None:
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

    async def _give_up(self, active: Sequence[ScheduledRequest]) -> None:
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
        """Fold LOCAL steps into the step before them (why that is sound: explore.steps)."""
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


__all__ = [
    "ScheduleError",
    "ScheduledRequest",
    "Scheduler",
    "Wait",
    "answer_text",
    "blocking_pids",
]
