"""explore.scheduler: the Scheduler alone, and the timeline's words for an answer.

No database here: the Scheduler is driven by requests that pause and hang as if waiting for
a lock, and by a stand-in for pg_blocking_pids(). That it reads real waits from PostgreSQL
is tested against the service in tests/harness/explore/test_engine.py.
"""

from __future__ import annotations

import asyncio
import time

from payrace.harness.explore.scenario import parse_requests
from payrace.harness.explore.scheduler import ScheduledRequest, Scheduler, answer_text
from payrace.harness.model.client import Prepared, Reply
from payrace.service.instrument import probes

RC = "READ COMMITTED"


# -- waits, deadlocks and the bound ----------------------------------------------------------


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


# -- the timeline's words --------------------------------------------------------------------


def test_an_answer_is_drawn_by_status_and_what_the_service_said() -> None:
    assert answer_text(Reply(200, {"status": "captured", "idempotent": True}, {})) == (
        "200 captured (idempotent)"
    )
    assert answer_text(Reply(409, {"error": {"code": "retryable"}}, {})) == "409 retryable"
    assert answer_text(Reply(None, {}, {}, "cancelled")) == "no answer (cancelled)"
    assert answer_text(None) == "no answer"
