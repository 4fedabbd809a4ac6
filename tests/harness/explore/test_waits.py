"""explore.waits: who waits for whom, by pid where a request said it, by elimination where not.

name_waits() is a pure function of PostgreSQL's answer; AppWaits reads that answer from a real
PostgreSQL (a row lock held on one connection, waited for on another). The Scheduler using
both is tested in test_scheduler.py, and against an app in test_app.py and
tests/examples/test_starlette_shop.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from payrace.harness.explore.scenario import parse_requests
from payrace.harness.explore.scheduler import ScheduledRequest, Scheduler
from payrace.harness.explore.steps import opaque
from payrace.harness.explore.waits import UNNAMED, AppWaits, Waiting, name_waits
from payrace.harness.infra.provider import Database
from payrace.harness.model.client import Prepared, Reply
from payrace.pausing import pause

# -- naming ---------------------------------------------------------------------------------


def test_known_pids_name_waiter_and_holder() -> None:
    found = name_waits(
        [("webhook-1", 202)], [("client", 101), ("webhook-1", 202)], {202: [101]}, eliminate=False
    )
    assert found.waits == {"webhook-1": Waiting(("client",), (101,), 202)}
    assert found.learned == {}


def test_without_elimination_a_blocker_outside_the_schedule_is_no_wait() -> None:
    """The reference service: a lock held by a backend none of its requests named (another
    client of the database) is not a wait on another request; the step is still running."""
    found = name_waits(
        [("webhook-1", 202)], [("client", 101), ("webhook-1", 202)], {202: [999]}, eliminate=False
    )
    assert found.waits == {}


def test_the_only_unnamed_released_request_owns_the_only_unnamed_waiting_backend() -> None:
    """An app that never says its pid: the released request waits, the paused one holds."""
    found = name_waits(
        [("webhook-1", None)],
        [("client", None), ("webhook-1", None)],
        {202: [101]},
        eliminate=True,
    )
    assert found.waits == {"webhook-1": Waiting(("client",), (101,), 202)}
    assert found.learned == {"webhook-1": 202, "client": 101}


def test_learned_pids_are_used_like_said_ones() -> None:
    found = name_waits(
        [("client", 101)],
        [("client", 101), ("webhook-1", 202)],
        {101: [202]},
        eliminate=True,
    )
    assert found.waits["client"].by == ("webhook-1",)


def test_a_holder_elimination_cannot_single_out_stays_unnamed() -> None:
    """Three requests, none said its pid: the waiter is known (the only released one), but
    two paused requests could hold the lock. Guessing could draw a deadlock that never was."""
    found = name_waits(
        [("webhook-2", None)],
        [("client", None), ("webhook-1", None), ("webhook-2", None)],
        {303: [101]},
        eliminate=True,
    )
    assert found.waits == {"webhook-2": Waiting((UNNAMED,), (101,), 303)}
    assert found.learned == {"webhook-2": 303}


def test_two_unnamed_released_requests_are_not_guessed_at() -> None:
    found = name_waits(
        [("client", None), ("webhook-1", None)],
        [("client", None), ("webhook-1", None)],
        {101: [202]},
        eliminate=True,
    )
    assert found.waits == {} and found.learned == {}


# -- reading PostgreSQL -----------------------------------------------------------------------


@pytest.fixture
async def table(explore_db: Database) -> AsyncIterator[str]:
    conn = await asyncpg.connect(explore_db.url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS waits_probe (id int PRIMARY KEY, n int)")
        await conn.execute("INSERT INTO waits_probe VALUES (1, 0) ON CONFLICT DO NOTHING")
        yield explore_db.url
    finally:
        await conn.close()


async def test_app_waits_reports_a_row_lock_wait_with_its_holder_and_statement(table: str) -> None:
    holder = await asyncpg.connect(table)
    waiter = await asyncpg.connect(table)
    ours = await asyncpg.connect(table, server_settings={"application_name": "payrace-test"})
    holder_tx = holder.transaction()
    await holder_tx.start()
    update = None
    try:
        await holder.execute("UPDATE waits_probe SET n = n + 1 WHERE id = 1")
        update = asyncio.create_task(
            waiter.execute("UPDATE waits_probe SET n = n + 10 WHERE id = 1")
        )
        waits = AppWaits(ours)
        found: dict[int, list[int]] = {}
        for _ in range(500):  # until PostgreSQL shows the wait: bounded, no sleep-as-sync
            found = await waits([])
            if found.get(waiter.get_server_pid()):
                break
            await asyncio.sleep(0.01)
        assert found[waiter.get_server_pid()] == [holder.get_server_pid()]
        assert holder.get_server_pid() not in found and ours.get_server_pid() not in found
        statement = waits.statement(waiter.get_server_pid())
        assert statement is not None and "n + 10" in statement
        # A pid asked for by name is answered even when it does not wait.
        assert (await waits([holder.get_server_pid()]))[holder.get_server_pid()] == []
    finally:
        await holder_tx.rollback()
        if update is not None:
            await update
        for conn in (holder, waiter, ours):
            await conn.close()


# -- the Scheduler naming an app's waits --------------------------------------------------------


@pytest.mark.parametrize("say_pid", [True, False], ids=["pids said", "pids found"])
async def test_the_scheduler_names_an_apps_waiters_with_or_without_their_pids(
    table: str, say_pid: bool
) -> None:
    """Three requests queue for one row. Whether they pass `backend_pid=` or not, each wait
    is named after the request that holds the lock: said, or found by elimination since the
    steps release one request at a time."""
    specs = parse_requests(["client", "webhook", "webhook"])
    reqs = [
        ScheduledRequest(i, s, Prepared("POST", "/", b"", {}, s.step.kind))
        for i, s in enumerate(specs)
    ]

    async def send(r: ScheduledRequest) -> Reply:
        conn = await asyncpg.connect(table)
        try:
            async with conn.transaction():
                pid = conn.get_server_pid() if say_pid else None
                await pause("begun", backend_pid=pid)
                await conn.execute(f"UPDATE waits_probe SET n = n + {r.index + 1} WHERE id = 1")
                await pause("written")
        finally:
            await conn.close()
        return Reply(200, {"status": "captured"}, {})

    observer = await asyncpg.connect(table, server_settings={"application_name": "payrace-t"})
    waits = AppWaits(observer)
    sched = Scheduler(
        reqs,
        send=send,
        blockers=waits,
        isolation="app",
        lock_rows=True,
        reduce=False,
        bound_s=30.0,
        poll_s=0.002,
        model=opaque,
        exact_pids=False,
        statement_of=waits.statement,
    )
    try:
        for index in (0, 0, 1, 1):  # client holds the row; webhook-1 queues for it
            await sched.step(index)
        assert [(w.label, w.blocked_by, w.what) for w in sched.waits] == [
            ("webhook-1", ("client",), "update waits_probe")
        ]
        await sched.step(2)
        await sched.step(2)  # webhook-2 queues too, behind client or webhook-1
        assert sched.waits[-1].label == "webhook-2"
        assert set(sched.waits[-1].blocked_by) <= {"client", "webhook-1"}
        assert UNNAMED not in sched.waits[-1].blocked_by
        await sched.step(0)  # client commits: the queue moves on
        assert sched.reqs[0].state == "done" and not sched.stuck and not sched.deadlocks
    finally:
        await sched.close()
        await observer.close()
    assert all(r.state == "done" for r in sched.reqs)
