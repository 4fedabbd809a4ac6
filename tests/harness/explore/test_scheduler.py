"""harness.explore.scheduler: the step table, the reduction, the policies and the Scheduler alone.

No database here: the Scheduler is driven by requests that pause and hang as if waiting for
a lock, and by a stand-in for pg_blocking_pids(). That it reads real waits from PostgreSQL
is tested against the service in tests/harness/explore/test_engine.py.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from payrace.harness.explore.scenario import RequestSpec, parse_requests
from payrace.harness.explore.scheduler import (
    Pct,
    PctBound,
    Prefix,
    ScheduledRequest,
    ScheduleError,
    Scheduler,
    StepClass,
    answer_text,
    dependent,
    describe_statement,
    next_prefix,
    predict,
    statement_class,
)
from payrace.harness.model.client import Prepared, Reply
from payrace.service.instrument import probes

RC, RR, SR = "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"


# -- the step table and the reduction (no database) ---------------------------------------


def test_the_step_table_reads_the_capture_path() -> None:
    client, webhook, failed = parse_requests(["client", "webhook", "payment.failed"])
    S = StepClass

    def p(spec: RequestSpec, point: str | None, detail: str | None = None, iso: str = RC,
          lock: bool = True) -> StepClass:  # fmt: skip
        return predict(spec, point, detail, isolation=iso, lock_rows=lock)

    assert p(client, None) is S.LOCAL  # nothing shared happens before BEGIN...
    assert p(client, None, iso=RR) is S.READ  # ...except taking the snapshot
    assert p(client, "txn_begun") is S.WRITE  # FOR UPDATE
    assert p(client, "txn_begun", lock=False) is S.READ  # the incident's plain read
    assert p(client, "payment_read", "pending") is S.LOCAL
    assert p(client, "payment_read", "pending", iso=SR) is S.READ
    assert p(webhook, "payment_read", "pending") is S.WRITE  # records the event id
    assert p(client, "status_checked", "pending") is S.LOCAL  # on to gateway_called
    assert p(webhook, "status_checked", "pending") is S.WRITE  # update payment
    assert p(webhook, "status_checked", "repeat") is S.READ
    assert p(failed, "payment_written") is S.READ
    assert p(client, "order_written") is S.LOCAL
    assert p(client, "before_commit") is S.END
    assert p(client, "a_point_added_later") is S.END


def test_only_conflicting_steps_are_dependent() -> None:
    local, read, write, end = StepClass
    for level in (RC, RR, SR):
        assert not dependent(local, end, level)
        assert not dependent(read, read, level)
        assert dependent(write, write, level)
        assert dependent(read, end, level) and dependent(end, write, level)
    # MVCC: a plain read neither sees an uncommitted write nor waits for its lock...
    assert not dependent(read, write, RC) and not dependent(write, read, RR)
    # ...but at SERIALIZABLE the order decides which transaction SSI rolls back.
    assert dependent(read, write, SR)


def test_statements_are_classified_by_what_they_lock() -> None:
    assert statement_class("SELECT payments.id FROM payments WHERE id = $1") is StepClass.READ
    assert statement_class("SELECT * FROM payments WHERE id = $1 FOR UPDATE") is StepClass.WRITE
    assert statement_class("select 1 for no key update") is StepClass.WRITE
    assert statement_class("UPDATE payments SET status=$1") is StepClass.WRITE
    assert statement_class("INSERT INTO webhook_events (event_id) VALUES ($1)") is StepClass.WRITE
    assert (
        describe_statement("SELECT p.id FROM payments p WHERE p.id=$1 FOR UPDATE") == "lock payment"
    )
    assert describe_statement("UPDATE invoices SET status=$1") == "update invoice"
    assert describe_statement("INSERT INTO webhook_events (a) VALUES (1)") == "record event id"


def test_depth_first_search_takes_every_branch_once() -> None:
    # A tree where each decision offers (0, 1) for three steps: 8 leaves, each once.
    seen = []
    prefix: list[int] | None = []
    while prefix is not None:
        choices = list(prefix) + [0] * (3 - len(prefix))
        seen.append(tuple(choices))
        prefix = next_prefix([((0, 1), c) for c in choices])
    assert sorted(seen) == sorted({tuple((n >> i) & 1 for i in (2, 1, 0)) for n in range(8)})
    assert len(seen) == 8


def test_pct_bound_is_one_over_n_k_to_the_d_minus_one() -> None:
    bound = PctBound(n=3, k=20, d=3)
    assert bound.p == pytest.approx(1 / 1200)
    runs = bound.runs_for(0.95)
    assert bound.confidence(runs) >= 0.95 > bound.confidence(runs - 1)
    assert "1/1200" in bound.describe(100)
    assert PctBound(n=1, k=5, d=1).runs_for(0.99) == 1


def test_pct_is_seeded_and_changes_priority_at_its_change_points() -> None:
    def walk(seed: int) -> list[int]:
        pct = Pct(3, 12, 3, random.Random(seed))
        return [pct.choose([0, 1, 2], [0, 1, 2], []) for _ in range(12)]

    assert walk(5) == walk(5)
    pct = Pct(3, 12, 3, random.Random(5))
    assert sorted(pct.priority.values()) == [3, 4, 5]  # d .. d+n-1
    assert sorted(pct.changes.values()) == [1, 2]  # d-1 change points, below every start
    assert len({tuple(walk(s)) for s in range(20)}) > 1


# -- the scheduler alone: waits, deadlocks and the bound (no database) ----------------------


def _synthetic(bound_s: float, waits: dict[int, list[int]]) -> tuple[Scheduler, set[int]]:
    """Two requests that pause once at txn_begun, then hang forever once released, as if
    waiting for a lock; `waits` is what pg_blocking_pids would answer for a hanging one."""
    pids = {"client": 101, "webhook-1": 102}
    hanging: set[int] = set()
    specs = parse_requests(["client", "webhook"])
    reqs = [
        ScheduledRequest(i, s, Prepared("POST", "/", b"", {}, s.step.kind))
        for i, s in enumerate(specs)
    ]

    async def send(r: ScheduledRequest) -> Reply:
        probes.set_backend_pid(pids[r.label])
        await probes.pause("txn_begun")
        hanging.add(pids[r.label])
        await asyncio.Event().wait()
        return Reply(200, {}, {})

    async def blockers(asked: list[int]) -> dict[int, list[int]]:
        return {pid: waits.get(pid, []) for pid in asked if pid in hanging}

    sched = Scheduler(
        reqs,
        send=send,
        blockers=blockers,
        isolation=RC,
        lock_rows=True,
        reduce=True,
        bound_s=bound_s,
        poll_s=0.002,
    )
    return sched, hanging


async def test_a_mutual_wait_is_reported_as_a_deadlock_and_the_run_ends() -> None:
    sched, _ = _synthetic(0.3, {101: [102], 102: [101]})
    started = time.monotonic()
    await sched.step(0)
    await sched.step(1)
    await sched.step(0)  # client waits for webhook-1, which is paused: a plain wait
    assert [(w.label, w.blocked_by) for w in sched.waits] == [("client", ("webhook-1",))]
    assert not sched.deadlocks and not sched.stuck
    await sched.step(1)  # webhook-1 now waits for client: a cycle
    await sched.close()
    assert sched.deadlocks == [("client", "webhook-1")]
    assert sorted(sched.stuck) == ["client", "webhook-1"]  # nobody broke it within the bound
    assert time.monotonic() - started < 3
    texts = [e.text for e in sched.events]
    assert "deadlock: client ⇄ webhook-1" in texts
    assert any(t.startswith("<stuck> waiting for") for t in texts)
    assert all(r.state == "done" and r.reply and r.reply.status is None for r in sched.reqs)


async def test_a_step_that_neither_finishes_nor_waits_is_cancelled_at_the_bound() -> None:
    sched, hanging = _synthetic(0.2, {})
    await sched.step(0)
    started = time.monotonic()
    await sched.step(0)
    assert 0.2 <= time.monotonic() - started < 2
    assert hanging == {101} and sched.stuck == ["client"] and not sched.waits
    assert any("neither paused nor waiting after 0.2 s: cancelled" in e.text for e in sched.events)
    await sched.close()


# -- the policies and the timeline's words (no database) ------------------------------------


def _requests(*states: str) -> list[ScheduledRequest]:
    specs = parse_requests(["client", "webhook"])
    reqs = [
        ScheduledRequest(i, s, Prepared("POST", "/", b"", {}, s.step.kind))
        for i, s in enumerate(specs)
    ]
    for r, state in zip(reqs, states, strict=True):
        r.state = state
    return reqs


def test_a_prefix_follows_its_choices_then_takes_the_lowest_candidate() -> None:
    reqs = _requests("parked", "parked")
    prefix = Prefix([1, 1])
    assert [prefix.choose([0, 1], [0, 1], reqs) for _ in range(3)] == [1, 1, 0]
    assert prefix.notes == [] and prefix.diverged_at is None
    drifting = Prefix([1])
    assert drifting.choose([0, 1], [0], reqs) == 0  # 1 was pruned: note where it diverged
    assert drifting.diverged_at == 1 and drifting.notes == ["step 1: 1 not among [0]"]


def test_a_replayed_id_that_releases_a_waiting_request_is_an_error() -> None:
    reqs = _requests("parked", "blocked")
    reqs[1].blocked_by = ("client",)
    with pytest.raises(ScheduleError, match="releases webhook-1, but it waits for client"):
        Prefix([1], exact=True).choose([0], [0], reqs)


def test_an_answer_is_drawn_by_status_and_what_the_service_said() -> None:
    assert answer_text(Reply(200, {"status": "captured", "idempotent": True}, {})) == (
        "200 captured (idempotent)"
    )
    assert answer_text(Reply(409, {"error": {"code": "retryable"}}, {})) == "409 retryable"
    assert answer_text(Reply(None, {}, {}, "cancelled")) == "no answer (cancelled)"
    assert answer_text(None) == "no answer"
