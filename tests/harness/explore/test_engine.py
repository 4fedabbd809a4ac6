"""explore.engine: the Explorer against PostgreSQL: blocking detection, slow and stuck steps.

The step table is tested in test_steps.py, the policies in test_policies.py and the
Scheduler alone in test_scheduler.py; plans, golden scenarios, replays and the command in
test_plan.py, all beside this file. explore_db and gateway come from conftest.py beside it.
"""

from __future__ import annotations

import asyncio
import time

from payrace.harness.explore.engine import Explorer
from payrace.harness.explore.scenario import StepSpec, parse_requests
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.infra.provider import Database

RC = "READ COMMITTED"


def _explorer(
    db: Database, gateway: tuple[FakeRazorpay, str], strategy: str, **kw: object
) -> Explorer:
    fake, url = gateway
    requests = kw.pop("requests", ("client", "webhook"))
    return Explorer(
        db,
        fake,
        url,
        strategy=strategy,
        isolation=str(kw.pop("isolation", RC)),
        requests=parse_requests(list(requests)),  # type: ignore[call-overload]
        **kw,  # type: ignore[arg-type]
    )


# -- against PostgreSQL ---------------------------------------------------------------------


async def test_blocking_detection_reads_pg_blocking_pids_not_the_clock(
    explore_db: Database, gateway: tuple[FakeRazorpay, str]
) -> None:
    """The webhook is released while the client holds the payment's row lock: it must be
    reported as waiting because PostgreSQL says so. The bound is a minute, so a timeout
    cannot stand in for the answer, and the pid PostgreSQL named is the backend the oracle
    saw write the client's capture."""
    explorer = _explorer(explore_db, gateway, "for_update", bound_s=60.0)
    async with explorer:
        run = await explorer.run_steps(
            [
                StepSpec("client", "payment_read"),
                StepSpec("webhook-1", "payment_read"),
                StepSpec("client", "end"),
            ],
        )
    await asyncio.to_thread(explorer.judge)
    assert not run.stuck and not run.error and run.valid is True
    [wait] = run.waits
    assert (wait.label, wait.blocked_by, wait.what) == ("webhook-1", ("client",), "lock payment")
    obs = explorer.observation
    assert obs is not None
    captures = [
        a
        for a in obs.audit
        if a.payment_id == run.payment_id and a.table == "payments" and a.new_status == "captured"
    ]
    assert [a.backend_pid for a in captures] == list(wait.blocker_pids)  # one: the client's
    texts = [(e.process, e.text) for e in run.events]
    waiting = texts.index(("webhook-1", "lock payment <waiting>"))
    committed = texts.index(("client", "commit → 200 captured"))
    completed = texts.index(("webhook-1", "<completed> read payment (captured)"))
    assert waiting < committed < completed
    assert run.replies["webhook-1"].body["idempotent"] is True


async def test_a_plain_read_does_not_wait(
    explore_db: Database, gateway: tuple[FakeRazorpay, str]
) -> None:
    """The control: the same schedule without FOR UPDATE reads `pending` at once."""
    async with _explorer(explore_db, gateway, "naive", bound_s=60.0) as explorer:
        run = await explorer.run_steps(
            [StepSpec("client", "payment_read"), StepSpec("webhook-1", "payment_read")]
        )
    assert ("webhook-1", "read payment (pending)") in [(e.process, e.text) for e in run.events]
    assert not any(w.what == "lock payment" for w in run.waits)


async def test_a_slow_gateway_is_neither_a_wait_nor_stuck(
    explore_db: Database, gateway: tuple[FakeRazorpay, str]
) -> None:
    fake, _ = gateway
    fake.set_knobs(capture_latency_s=0.3)
    try:
        async with _explorer(explore_db, gateway, "naive", bound_s=5.0) as explorer:
            run = await explorer.run_steps([StepSpec("client", "end")])
    finally:
        fake.set_knobs(capture_latency_s=0.0)
    assert not run.waits and not run.stuck
    assert run.replies["client"].status == 200


async def test_a_step_stuck_outside_postgres_is_cancelled_and_the_rest_finish(
    explore_db: Database, gateway: tuple[FakeRazorpay, str]
) -> None:
    fake, _ = gateway
    fake.set_knobs(capture_latency_s=1.5)
    started = time.monotonic()
    try:
        async with _explorer(explore_db, gateway, "naive", bound_s=0.3) as explorer:
            run = await explorer.run_steps([StepSpec("client", "end")])
    finally:
        fake.set_knobs(capture_latency_s=0.0)
    assert run.stuck == ["client"]
    assert run.replies["client"].status is None  # cancelled: no answer, "info" in the history
    assert run.replies["webhook-1"].status == 200  # released without pauses after the give-up
    assert time.monotonic() - started < 5
