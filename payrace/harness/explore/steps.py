"""The step model: what the code between two pause points may do, and which steps commute.

    StepClass       LOCAL < READ < WRITE < END: what the code between two pause points may do
    predict()       the class of a request's next step, read off service/capture.py; every
                    executed step is checked against it (explore.scheduler, Scheduler._arrive)
    StepModel       what the Scheduler asks: (request, point, detail) -> the next step's class
    opaque()        the model of an app payrace has not read (`payrace explore --app`): END
    dependent()     may two steps of different requests not be swapped?
    statement_class()     what an executed SQL statement did: READ or WRITE
    describe_statement()  how a timeline names it ("lock payment", "record event id")

Used by explore.scheduler, which folds LOCAL steps, prunes equivalent schedules with
dependent() and checks each executed step against predict().

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
Of each class of equivalent schedules the explorer (Scheduler._prune in explore.scheduler)
runs the lexicographically least, using
the two-process characterisation of that normal form: after a step of request j, request
i < j is released next only if its step depends on j's step (or j cannot move). Pruning is
skipped whenever it could leave no choice, so it only ever drops schedules that have an
equivalent one that is explored. Blocked variants are never collapsed into unblocked ones:
a step that waits for a lock is WRITE, and END (which releases locks) depends on it.

An app's code is not read, so every one of its steps is END (opaque()): nothing is folded,
no two steps commute, and the explorer runs every interleaving of the app's pause points —
more schedules than needed, never fewer. Its pause points are whatever names its requests
reach: the model asks no name.

The table is checked while running: a LOCAL or READ step that wrote, locked, committed or
waited, or a WRITE step that committed, makes the run fail with exit code 2 and a message
naming the step (the reduction would no longer be sound for this capture path).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

from payrace.harness.explore.scenario import RequestSpec


class StepClass(enum.IntEnum):
    LOCAL = 0  # commutes with everything: no statement, or reads of columns nobody changes
    READ = 1  # plain SELECTs only (includes taking the REPEATABLE READ snapshot)
    WRITE = 2  # takes row locks or writes, may wait, may fail and roll back
    END = 3  # commit (publishes writes, releases locks) and the answer


def predict(
    spec: RequestSpec, point: str | None, detail: str | None, *, isolation: str, lock_rows: bool
) -> StepClass:
    """The class of the code service/capture.py runs after `point` (None: not started yet).

    Read off the capture path; the Scheduler checks every executed step against it."""
    if point is None:
        # The webhook route looks the payment up by gateway order id (immutable columns, a
        # transaction of its own); then BEGIN, the backend pid read from the driver (no
        # statement). READ at REPEATABLE READ / SERIALIZABLE is conservative since the
        # probes stopped running SELECT pg_backend_pid() here (it took the snapshot); LOCAL
        # would be sound, but would renumber every rr/sr schedule id and golden file.
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


StepModel = Callable[[RequestSpec, str | None, str | None], StepClass]


def opaque(spec: RequestSpec, point: str | None, detail: str | None) -> StepClass:
    """Any step of code payrace has not read may write, wait and commit: END."""
    return StepClass.END


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
    """ "UPDATE payments SET ..." -> "update payment": what a waiting request waits to do
    (a schema-qualified table keeps its schema: "lock store.charges")."""
    text = " ".join(statement.split())
    if m := re.match(r"(?i)UPDATE\s+([\w.]+)", text):
        return f"update {_TABLE_WORD.get(m[1], m[1])}"
    if m := re.match(r"(?i)INSERT\s+INTO\s+([\w.]+)", text):
        return "record event id" if m[1] == "webhook_events" else f"insert {m[1]}"
    if _ADVISORY.search(text):
        return "advisory lock"
    if m := re.search(r"(?i)\bFROM\s+([\w.]+)", text):
        verb = "lock" if _FOR_LOCK.search(text) else "read"
        return f"{verb} {_TABLE_WORD.get(m[1], m[1])}"
    return text[:40]


__all__ = [
    "StepClass",
    "StepModel",
    "dependent",
    "describe_statement",
    "opaque",
    "predict",
    "statement_class",
]
