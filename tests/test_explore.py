"""harness.explore: the scheduler, the search, blocking detection, replay, golden scenarios.

Golden files: tests/golden/<scenario>.txt is what tests/scenarios/<scenario>.toml explores
(ExploreResult.golden(): schedules, waits, verdicts, the timeline drawn). A change in the
service's behaviour shows as a diff; after checking it is intended, rewrite them with
`PAYRACE_UPDATE_GOLDEN=1 pytest tests/test_explore.py -k golden`.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from harness.client import Prepared, Reply
from harness.explore import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_VIOLATED,
    Explorer,
    Pct,
    PctBound,
    Plan,
    Scheduler,
    StepClass,
    _Req,
    dependent,
    describe_statement,
    execute,
    explore_main,
    make_plan,
    next_prefix,
    pause_overhead,
    predict,
    statement_class,
)
from harness.gateway import FakeRazorpay, GatewayKeys, GatewayServer
from harness.provider import Database, provide_postgres
from harness.scenario import RequestSpec, StepSpec, parse_requests, parse_schedule_id
from service import probes

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
SCENARIOS = sorted((HERE / "scenarios").glob("*.toml"))
RC, RR, SR = "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"


@pytest.fixture(scope="module")
def explore_db(pg: Database) -> Iterator[Database]:
    """A database of its own: the oracle's deadlock reading must not see other tests."""
    with provide_postgres(pg.url, announce=lambda line: None) as db:
        yield db


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[FakeRazorpay, str]]:
    """A fake gateway of its own, so its latency knobs can be turned here."""
    fake = FakeRazorpay(GatewayKeys())
    with GatewayServer(fake) as server:
        yield fake, server.url


def _plan(
    strategy: str, isolation: str = RC, requests: tuple[str, ...] = ("client", "webhook")
) -> Plan:
    return make_plan(
        strategy=strategy,
        requests=list(requests),
        isolation=isolation,
        pct_runs=None,
        depth=2,
        seed=1,
        replay=None,
        scenario=None,
    )


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


def test_a_pause_point_costs_little_without_a_controller() -> None:
    """The micro-benchmark: `await pause()` with no controller against not calling it."""
    figures = pause_overhead(50_000)
    print(
        f"\nawait pause() without a controller: {figures['pause_ns']:.0f} ns/call, await of an "
        f"empty coroutine {figures['empty_coroutine_ns']:.0f} ns, empty loop "
        f"{figures['loop_ns']:.0f} ns: {figures['overhead_ns']:.0f} ns more than not calling it"
    )
    # One ContextVar.get() and a comparison inside a coroutine call: well under a microsecond
    # on any machine that runs this suite; a regression (say, a lock or a log line) is not.
    assert figures["overhead_ns"] < 2_000


# -- the scheduler alone: waits, deadlocks and the bound (no database) ----------------------


def _synthetic(bound_s: float, waits: dict[int, list[int]]) -> tuple[Scheduler, set[int]]:
    """Two requests that pause once at txn_begun, then hang forever once released, as if
    waiting for a lock; `waits` is what pg_blocking_pids would answer for a hanging one."""
    pids = {"client": 101, "webhook-1": 102}
    hanging: set[int] = set()
    specs = parse_requests(["client", "webhook"])
    reqs = [_Req(i, s, Prepared("POST", "/", b"", {}, s.step.kind)) for i, s in enumerate(specs)]

    async def send(r: _Req) -> Reply:
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


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
async def test_golden_scenario(
    path: Path, explore_db: Database, gateway: tuple[FakeRazorpay, str]
) -> None:
    fake, url = gateway
    plan = make_plan(strategy="", requests=[], isolation="", pct_runs=None, depth=2, seed=1,
                     replay=None, scenario=path)  # fmt: skip
    result = await execute(plan, explore_db, fake, url)
    text = result.golden()
    golden = GOLDEN / f"{path.stem}.txt"
    if os.environ.get("PAYRACE_UPDATE_GOLDEN"):
        golden.write_text(text, encoding="utf-8")
    assert golden.exists(), f"no {golden}; create it with PAYRACE_UPDATE_GOLDEN=1"
    expected = golden.read_text(encoding="utf-8")
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(True), text.splitlines(True), str(golden), "this run"
        )
    )
    assert text == expected, f"behaviour changed:\n{diff}"
    assert result.mismatches() == [] and result.problems() == []
    assert result.exit_code() == EXIT_OK


async def test_a_replay_reruns_exactly_the_schedule(
    explore_db: Database, gateway: tuple[FakeRazorpay, str]
) -> None:
    fake, url = gateway
    found = await execute(_plan("naive"), explore_db, fake, url)
    shortest = found.shortest_violation()
    assert shortest is not None
    ref = parse_schedule_id(shortest.id)
    replayed = await execute(Plan(_plan("naive").scenario, ref), explore_db, fake, url)
    [again] = replayed.runs
    assert again.id == shortest.id
    assert [(e.process, e.text) for e in again.events] == [
        (e.process, e.text) for e in shortest.events
    ]
    assert again.violated == shortest.violated != ()


async def test_an_id_this_service_cannot_follow_is_an_error_not_a_verdict(
    explore_db: Database, gateway: tuple[FakeRazorpay, str]
) -> None:
    fake, url = gateway
    # The webhook waits for the client's lock after its first step; a second webhook step
    # right away cannot be taken.
    ref = parse_schedule_id("for_update.rc.cw.ab2a5")
    result = await execute(Plan(_plan("for_update").scenario, ref), explore_db, fake, url)
    [run] = result.runs
    assert run.error is not None and "releases webhook-1, but it waits for client" in run.error
    assert result.exit_code() == EXIT_ERROR


async def test_collapsing_keeps_every_outcome(
    explore_db: Database, gateway: tuple[FakeRazorpay, str]
) -> None:
    """The reduction drops only schedules equivalent to explored ones: the full search
    (every interleaving of the non-local steps) reaches no outcome the reduced one misses."""
    fake, url = gateway
    plan = _plan("naive")
    reduced = await execute(plan, explore_db, fake, url)
    full = await execute(Plan(replace(plan.scenario, reduce=False)), explore_db, fake, url)
    assert len(full.runs) > 2 * len(reduced.runs)
    outcomes = {(o, v) for o, v, _ in reduced.outcomes()}
    assert outcomes == {(o, v) for o, v, _ in full.outcomes()}
    assert {r.id for r in reduced.runs} <= {r.id for r in full.runs}
    assert reduced.complete and full.complete


# -- the command ----------------------------------------------------------------------------


def _main(pg: Database, out: Path, **kw: object) -> tuple[int, str]:
    console = Console(record=True, width=110, force_terminal=False)
    args: dict[str, object] = {
        "strategy": "naive",
        "requests": ["client", "webhook"],
        "isolation": RC,
        "pct_runs": None,
        "depth": 2,
        "seed": 1,
        "replay": None,
        "scenario": None,
        "dsn": pg.url,
        "out_dir": out,
        "console": console,
    }
    args.update(kw)
    code = explore_main(**args)  # type: ignore[arg-type]
    return code, console.export_text()


def test_explore_naive_finds_the_double_capture_and_prints_the_schedule(
    pg: Database, tmp_path: Path
) -> None:
    code, text = _main(pg, tmp_path)
    assert code == EXIT_VIOLATED
    assert "shortest violating schedule: naive.rc.cw." in text
    assert text.count("read payment (pending)") >= 2
    assert "single_capture_write: 8 schedule(s)" in text
    assert "replay it: payrace explore --replay naive.rc.cw." in text
    [run_dir] = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    result = summary["strategies"]["naive"]
    assert summary["mode"] == "explore" and summary["exit_code"] == EXIT_VIOLATED
    assert result["valid"] is False and result["violating_trials"] == 8
    assert result["explore"]["schedules"] == 10 and result["explore"]["complete"] is True
    assert "read payment (pending)" in (run_dir / "report.html").read_text()
    assert '<table class="timeline">' in (run_dir / "timeline.html").read_text()
    assert (run_dir / "junit.xml").exists() and (run_dir / "explore.txt").exists()

    shortest = result["first_violation"]["schedule_id"]
    code, replayed = _main(pg, tmp_path / "replay", replay=shortest, strategy="ignored")
    assert code == EXIT_VIOLATED
    assert f"shortest violating schedule: {shortest}" in replayed


def test_explore_for_update_is_valid_and_shows_the_webhook_waiting(
    pg: Database, tmp_path: Path
) -> None:
    code, text = _main(pg, tmp_path, strategy="for_update")
    assert code == EXIT_OK
    assert "with a lock wait: 8" in text and "violating: 0" in text
    assert "a schedule where webhook-1 waited for client" in text
    assert "lock payment <waiting>" in text and "<completed> read payment (captured)" in text


def test_explore_with_a_scenario_exits_zero_when_it_goes_as_expected(
    pg: Database, tmp_path: Path
) -> None:
    code, text = _main(pg, tmp_path, scenario=HERE / "scenarios" / "seed.toml")
    assert code == EXIT_OK
    assert "record event id <waiting>" in text and "verdict: as expected" in text


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"strategy": "optimistic"}, "unknown strategy 'optimistic'"),
        ({"requests": ["client"]}, "at least two requests"),
        ({"replay": "not-an-id"}, "not a schedule id"),
        ({"replay": "naive.rc.cw.a5b4", "scenario": Path("x.toml")}, "either --replay"),
        ({"scenario": Path("/nonexistent/x.toml")}, "cannot read scenario"),
        ({"dsn": "mysql://nope"}, "is not a PostgreSQL URL"),
    ],
)
def test_usage_errors_exit_two_and_say_what_to_do(
    pg: Database, tmp_path: Path, kw: dict[str, object], message: str
) -> None:
    code, text = _main(pg, tmp_path, **kw)
    assert code == EXIT_ERROR
    assert message in " ".join(text.split())
