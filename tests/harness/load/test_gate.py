"""payrace/harness/load/gate.py: the settings handed to Locust, the tallies workers send and
the master merges, the little history the gate's checkers read, setup mistakes, and that it
stays light enough for Locust's workers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Service

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.infra.provider import Database
from payrace.harness.load.gate import GATE_CHECKERS, LoadRun, settle_deadlocks
from payrace.harness.load.worker import (
    ENV_GATEWAY_URL,
    ENV_TARGET_DSN,
    RUNNING_TARGET_SETTLE_S,
    LoadSettings,
    LoadTally,
)
from payrace.harness.model import checker
from payrace.harness.model import profile as profile_module
from payrace.harness.model.gates import Gate
from payrace.harness.model.oracle import AuditRow, Observation, PaymentState
from payrace.harness.model.profile import Profile
from payrace.harness.model.watched import OracleConfig
from payrace.harness.runner import reconcile as reconcile_module
from payrace.harness.runner.config import EXTERNAL_SETTLE_S

# -- settings -----------------------------------------------------------------------------


def test_settings_survive_the_trip_through_the_environment(tmp_path: Path) -> None:
    settings = LoadSettings(
        gateway_url="http://127.0.0.1:9411",
        database_url="postgresql://payrace@127.0.0.1:5432/payrace",
        report_dir=tmp_path,
        run_id="20240101-000000-load-naive-race_pairs",
        command="payrace load --strategy naive",
        seed=-7,
    )
    assert LoadSettings.from_env(settings.to_env()) == settings


def _shop_profile(tmp_path: Path) -> Path:
    text = (Path(profile_module.__file__).parent.parent / "profiles/reference.toml").read_text()
    path = tmp_path / "shop.toml"
    path.write_text(text.replace('name = "reference"', 'name = "shop"'), encoding="utf-8")
    return path


def test_a_profile_run_reaches_every_locust_process_with_its_expectation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _shop_profile(tmp_path)
    settings = LoadSettings(
        gateway_url="http://127.0.0.1:9411",
        database_url="postgresql://shop@127.0.0.1:5432/shop",
        report_dir=tmp_path,
        run_id="20240101-000000-load-shop-race_pairs",
        command="payrace load --profile shop.toml",
        seed=None,
        profile=Path("shop.toml"),
        expect="violated",
        settle_s=0.5,
    )
    env = settings.to_env()
    assert env["PAYRACE_PROFILE"] == str(tmp_path / "shop.toml")  # workers may start elsewhere
    back = LoadSettings.from_env(env)
    assert (back.profile, back.expect, back.settle_s) == (tmp_path / "shop.toml", "violated", 0.5)
    assert back.target_profile().name == "shop" and back.settle_timeout_s() == 0.5


def test_the_reference_service_is_the_target_without_a_profile() -> None:
    settings = LoadSettings.from_env({"PAYRACE_SETTLE_S": "soon"})  # not a number: the default
    assert settings.target_profile() == Profile.reference()
    assert settings.settle_s is None and settings.settle_timeout_s() == 2.0


def test_a_running_target_waits_out_the_flush_as_payrace_run_does(tmp_path: Path) -> None:
    settings = LoadSettings.from_env({"PAYRACE_PROFILE": str(_shop_profile(tmp_path))})
    assert settings.settle_timeout_s() == RUNNING_TARGET_SETTLE_S == EXTERNAL_SETTLE_S


def test_settings_set_by_hand_need_only_the_gateway() -> None:
    settings = LoadSettings.from_env({"PAYRACE_GATEWAY_URL": "http://gw:9411/"})
    assert settings.gateway_url == "http://gw:9411"
    assert settings.database_url is None and settings.seed is None
    assert settings.run_id.endswith("-locust")
    assert settings.report_dir == Path("reports") / settings.run_id


# -- tallies: workers -> master -----------------------------------------------------------


def _tally(
    requests: int, payments: list[tuple[int, str | None]], lock_ms: list[float]
) -> dict[str, Any]:
    tally = LoadTally()
    for n in range(requests):
        tally.request(failed=n == 0)
    for payment_id, gateway_id in payments:
        tally.payment(payment_id, gateway_id)
    for ms in lock_ms:
        tally.timing("lock", "client", ms)
    return tally.drain()


def test_drain_hands_over_and_starts_afresh() -> None:
    tally = LoadTally()
    tally.request(failed=False)
    tally.timing("lock", "webhook", 1.5)
    tally.confirm(7, "verify", None)
    first = tally.drain()
    assert first["requests"] == 1 and first["pid"] == os.getpid()
    assert first["confirmed"] == [[7, "verify", None]]
    tally.confirm(7, "webhook", "payment.captured")  # old news about payment 7
    second = tally.drain()
    assert second["requests"] == 0 and second["confirmed"] == [] and second["hdr"] == {}


def test_master_merges_every_workers_reports() -> None:
    run = LoadRun(LoadSettings.from_env({}))
    run.absorb("w1", _tally(3, [(1, "pay_a")], [1.0, 2.0]))
    run.absorb("w2", _tally(5, [(2, "pay_b"), (3, None)], [3.0]))
    run.absorb("w1", _tally(2, [], [4.0]))
    assert {cid: w.requests for cid, w in run.workers.items()} == {"w1": 5, "w2": 5}
    assert {cid: w.failures for cid, w in run.workers.items()} == {"w1": 2, "w2": 1}
    assert run.workers["w1"].reports == 2
    assert run.payments == {1: "pay_a", 2: "pay_b", 3: None}
    lock = run.hist.get("lock", "client")
    assert lock.count == 4 and lock.summary()["max"] == pytest.approx(4.0, abs=0.01)


# -- what the gate's checkers read --------------------------------------------------------


def _observation(states: dict[int, str], accepted: dict[str, int]) -> Observation:
    at = datetime.now(UTC)
    audit = tuple(
        AuditRow(n, "payments", pid, pid, "UPDATE", "pending", status, 100 + n, 1, at)
        for n, (pid, status) in enumerate(states.items())
        if status == "captured"
    )
    return Observation(
        audit=audit,
        payments={pid: PaymentState(pid, s, None, None, None) for pid, s in states.items()},
        gateway_captures=dict(accepted),
        gateway_accepted=dict(accepted),
        deadlocks=0,
        config=OracleConfig.reference(),
    )


def test_synthesised_ops_let_no_lost_capture_see_confirmations_and_gateway_owners() -> None:
    """Payment 1 was confirmed to the client, payment 2's capture was accepted by the gateway,
    and both end pending: two lost captures. The database never recorded pay_b's owner, so
    only the history the master synthesises can tie the gateway capture to payment 2."""
    run = LoadRun(LoadSettings.from_env({}))
    data = _tally(1, [(1, "pay_a"), (2, "pay_b"), (3, "pay_c")], [])
    data["confirmed"] = [[1, "verify", None], [3, "webhook", "payment.captured"]]
    run.absorb("w", data)
    obs = _observation({1: "pending", 2: "pending", 3: "captured"}, {"pay_b": 1})
    result = checker.no_lost_capture(run.ops(), obs)
    assert result.valid is False
    assert result.payments == frozenset({1, 2})


# -- the target's 5xx answers: no_5xx in the gate -----------------------------------------


def _answers(*answers: tuple[str, int, str | None, int | None]) -> dict[str, Any]:
    tally = LoadTally()
    for f, status, code, payment_id in answers:
        tally.answer(f, status, code, payment_id)
    return tally.drain()


def _gate_5xx(run: LoadRun) -> checker.CheckResult:
    obs = _observation({1: "captured"}, {})
    verdict = checker.check(run.ops(), obs, checkers=GATE_CHECKERS)
    return run._no_5xx_in_full(verdict.results["no_5xx"])


def test_a_crash_under_load_violates_the_gate() -> None:
    run = LoadRun(LoadSettings.from_env({}))
    run.absorb("w1", _answers(("verify", 200, None, 1), ("webhook", 200, None, 1)))
    run.absorb("w2", _answers(("webhook", 500, "internal", 1), ("create_order", 201, None, None)))
    result = _gate_5xx(run)
    assert result.valid is False and result.count == 1 and result.checked == 4
    assert result.first is not None and result.first["f"] == "webhook"
    assert "4 answer(s) from the target, 1 of them 5xx, 1 crash(es)" in result.note


def test_handled_faults_under_load_leave_the_gate_valid() -> None:
    run = LoadRun(LoadSettings.from_env({}))
    run.absorb("w1", _answers(("verify", 503, "database_unavailable", 1), ("verify", 200, None, 1)))
    run.absorb("w2", _answers(("verify", 502, "gateway_error", 1), ("read", 404, "not_found", 9)))
    result = _gate_5xx(run)
    assert result.valid is True and result.count == 0 and result.checked == 4
    assert "2 of them 5xx, 0 crash(es)" in result.note


def test_a_flood_of_handled_faults_does_not_crowd_out_the_crash() -> None:
    """Examples are capped; the crash that decides the gate is kept, and the counts are whole."""
    flood = [("verify", 503, "database_unavailable", n) for n in range(200)]
    data = _answers(*flood, ("webhook", 502, None, 7))  # a 502 without a code: a crash
    assert data["server_errors"] == 201 and data["crashes"] == 1
    assert len(data["server_error_examples"]) < 201
    run = LoadRun(LoadSettings.from_env({}))
    run.absorb("w", data)
    run.absorb("w", _answers(*flood))
    result = _gate_5xx(run)
    assert result.valid is False and result.count == 1 and result.payments == frozenset({7})
    assert "401 of them 5xx" in result.note and "kept as examples" in result.note


def test_a_worker_without_answers_in_its_report_is_still_merged() -> None:
    """A worker running an older locustfile: the gate judges what it has."""
    run = LoadRun(LoadSettings.from_env({}))
    data = _tally(2, [(1, "pay_a")], [])
    for key in ("answered", "server_errors", "crashes", "server_error_examples"):
        data.pop(key)
    run.absorb("old", data)
    assert run.answered == 0 and run.payments == {1: "pay_a"}


def test_409s_and_attempts_the_target_re_ran_are_counted_and_merged(tmp_path: Path) -> None:
    """What `payrace compare` shows for a load run: the 409 answers (nowait, skip_locked),
    and the attempts the service aborted and re-ran (its Server-Timing counts)."""
    tally = LoadTally()
    tally.answer("verify", 409, "retry_later", 1)
    tally.answer("webhook", 200, None, 1)
    tally.aborted({"lock": 3.5, "serialization": 2, "deadlock": 1})
    tally.aborted({"lock": 1.0})  # most answers re-ran nothing
    data = tally.drain()
    assert (data["conflicts"], data["serialization_failures"], data["deadlocks_retried"]) == (
        1, 2, 1,
    )  # fmt: skip
    again = tally.drain()
    assert again["conflicts"] == again["serialization_failures"] == 0
    run = LoadRun(replace(LoadSettings.from_env({}), report_dir=tmp_path))
    run.absorb("w1", data)
    run.absorb("w2", _answers(("webhook", 409, "retry_later", 2)))
    old = _tally(1, [], [])
    for key in ("conflicts", "serialization_failures", "deadlocks_retried"):
        old.pop(key)  # a worker running an older locustfile
    run.absorb("old", old)
    assert (run.conflicts, run.serialization_failures, run.deadlocks_retried) == (2, 2, 1)
    summary = run.finish(host="http://127.0.0.1:9", locust={}, window_s=1.0)
    [result] = summary["strategies"].values()
    assert result["conflicts"] == {
        "answered_409": 2, "retried": 0, "serialization_failures": 2, "deadlocks_retried": 1,
    }  # fmt: skip


# -- the deadlock counter, read again after the service stopped ---------------------------


def _judged_summary(valid: object = True, deadlocks: object = None) -> dict[str, Any]:
    checks = {"single_capture_write": {"name": "single_capture_write", "valid": valid}}
    result: dict[str, Any] = {"valid": valid, "checks": checks}
    if deadlocks is not None:
        result["deadlocks"] = deadlocks
    return {"strategies": {"for_update": result}, "verdict": "valid", "exit_code": 0}


def test_a_deadlock_found_after_the_service_stopped_violates_the_run() -> None:
    summary = _judged_summary(deadlocks={"delta": 0, "settled": False})
    settle_deadlocks(summary, 2, True, "")
    result = summary["strategies"]["for_update"]
    assert result["checks"]["no_deadlock"]["valid"] is False
    assert result["checks"]["no_deadlock"]["count"] == 2
    assert result["deadlocks"]["delta"] == 2 and result["valid"] is False
    assert (summary["verdict"], summary["exit_code"]) == ("violated", 1)


def test_a_settled_zero_joins_the_checks_and_keeps_the_run_valid() -> None:
    summary = _judged_summary(deadlocks={"delta": 0, "settled": False})
    settle_deadlocks(summary, 0, True, "")
    result = summary["strategies"]["for_update"]
    assert result["checks"]["no_deadlock"]["valid"] is True
    assert result["deadlocks"]["settled"] is True
    assert (summary["verdict"], summary["exit_code"]) == ("valid", 0)


def test_a_reading_that_still_did_not_settle_changes_nothing() -> None:
    summary = _judged_summary(deadlocks={"delta": 0, "settled": False})
    before = json.loads(json.dumps(summary))
    settle_deadlocks(summary, 0, False, "1 client backend(s) active")
    assert summary == before


def test_a_run_the_gate_never_judged_is_not_made_valid_by_the_deadlock_reading() -> None:
    summary = _judged_summary(valid="unknown")  # no "deadlocks": the oracle never observed
    summary["verdict"], summary["exit_code"] = "unknown", 2
    settle_deadlocks(summary, 0, True, "")
    assert (summary["verdict"], summary["exit_code"]) == ("unknown", 2)
    assert "no_deadlock" not in summary["strategies"]["for_update"]["checks"]


# -- gates (`payrace load --gate`) ---------------------------------------------------------


def _measured(summary: dict[str, Any], lock_p99: float, hold_p99: float) -> dict[str, Any]:
    result = summary["strategies"]["for_update"]
    result["violating_trials"] = 0
    result["latency_ms"] = {
        "lock": {"all": {"count": 40, "p99": lock_p99}},
        "hold": {"all": {"count": 40, "p99": hold_p99}},
    }
    return summary


@pytest.mark.parametrize(
    ("lock_p99", "verdict", "code"), [(11.0, "valid", 0), (13.0, "gate_breached", 1)]
)
def test_gates_are_judged_again_with_the_settled_reading(
    lock_p99: float, verdict: str, code: int
) -> None:
    summary = _measured(_judged_summary(deadlocks={"delta": 0, "settled": False}), lock_p99, 4.0)
    settle_deadlocks(summary, 0, True, "", gates=[Gate.parse("lock_p99_ms<=3*hold_p99_ms")])
    (gate,) = summary["gates"]
    assert (gate["value"], gate["threshold"]) == (lock_p99, 12.0)
    assert (summary["verdict"], summary["exit_code"]) == (verdict, code)


def test_the_violations_gate_counts_the_deadlocks_read_after_the_service_stopped() -> None:
    summary = _measured(_judged_summary(deadlocks={"delta": 0, "settled": False}), 1.0, 1.0)
    settle_deadlocks(summary, 2, True, "", gates=[Gate.parse("violations<=0")])
    assert summary["gates"][0]["value"] == 2.0 and summary["gates"][0]["passed"] is False


def test_gates_judged_by_the_master_stand_when_the_reading_brings_none() -> None:
    summary = _measured(_judged_summary(deadlocks={"delta": 0, "settled": False}), 13.0, 4.0)
    judged = Gate.parse("lock_p99_ms<=3*hold_p99_ms").judge(
        "for_update", summary["strategies"]["for_update"]
    )
    summary["gates"] = [judged]
    settle_deadlocks(summary, 0, True, "")
    assert summary["gates"] == [judged]
    assert (summary["verdict"], summary["exit_code"]) == ("gate_breached", 1)


def test_the_master_judges_the_gates_from_the_environment(tmp_path: Path) -> None:
    env = {"PAYRACE_REPORT_DIR": str(tmp_path), "PAYRACE_GATES": "lock_p99_ms<=5\nviolations<=0"}
    settings = LoadSettings.from_env(env)
    assert settings.gates == ("lock_p99_ms<=5", "violations<=0")
    # No database: nothing observed, no latency measured; the gates say so, never "passed".
    summary = LoadRun(settings).finish(host="http://127.0.0.1:1", locust={}, window_s=1.0)
    assert [(g["expr"], g["value"], g["passed"]) for g in summary["gates"]] == [
        ("lock_p99_ms<=5", None, False),
        ("violations<=0", 0.0, True),
    ]
    assert (summary["verdict"], summary["exit_code"]) == ("unknown", 2)


def test_a_gate_mistake_set_by_hand_is_a_setup_error(tmp_path: Path) -> None:
    env = {"PAYRACE_REPORT_DIR": str(tmp_path), "PAYRACE_GATES": "lock_p99<=5"}
    summary = LoadRun(LoadSettings.from_env(env)).finish(host="http://127.0.0.1:1", locust={},
                                                         window_s=1.0)  # fmt: skip
    assert (summary["verdict"], summary["exit_code"]) == ("setup_error", 2)
    assert "did you mean 'lock_p99_ms'" in summary["setup_errors"][0]
    missing = {**env, "PAYRACE_GATES": "lock_p99_ms<=baseline", "PAYRACE_BASELINE": "/no/b.json"}
    summary = LoadRun(LoadSettings.from_env(missing)).finish(host="http://127.0.0.1:1", locust={},
                                                             window_s=1.0)  # fmt: skip
    assert summary["verdict"] == "setup_error" and "no such file" in summary["setup_errors"][0]


# -- setup mistakes: exit 2, not a verdict about the target --------------------------------


def test_setup_mistakes_travel_to_the_master_once_each_and_a_few_at_most() -> None:
    run = LoadRun(LoadSettings.from_env({}))
    for worker, messages in (("w1", ["route 404", "route 404"]), ("w2", ["route 404", "a", "b"])):
        tally = LoadTally()
        for message in messages:
            tally.setup(message)
        run.absorb(worker, tally.drain())
        assert tally.drain()["setup_errors"] == []  # handed over, not sent again
    assert run.setup_errors == ["route 404", "a", "b"]
    run.absorb("w3", {**_tally(1, [], []), "setup_errors": ["c"]})
    assert len(run.setup_errors) == 3  # enough to fix it; the rest is the same story


def test_a_run_with_a_setup_mistake_exits_2_naming_it(tmp_path: Path) -> None:
    settings = LoadSettings.from_env(
        {"PAYRACE_PROFILE": str(_shop_profile(tmp_path)), "PAYRACE_REPORT_DIR": str(tmp_path)}
    )
    run = LoadRun(settings)
    run.absorb("local", _tally(2, [(1, "pay_a")], []))
    run.setup_errors.append("the target answered POST /payment/verify with HTTP 404")
    summary = run.finish(host="http://127.0.0.1:1", locust={}, window_s=1.0)
    assert (summary["verdict"], summary["exit_code"]) == ("setup_error", 2)
    assert summary["problems"][0] == summary["setup_errors"][0]
    result = summary["strategies"]["shop"]  # named after the profile, no request to the target
    assert result["valid"] == "unknown" and result["checks"] == {}
    assert result["expected"] == "valid"  # a running target is expected valid unless told
    assert json.loads((tmp_path / "summary.json").read_text())["verdict"] == "setup_error"


def test_a_run_without_setup_mistakes_is_no_setup_error(tmp_path: Path) -> None:
    settings = LoadSettings.from_env(
        {
            "PAYRACE_PROFILE": str(_shop_profile(tmp_path)),
            "PAYRACE_REPORT_DIR": str(tmp_path),
            "PAYRACE_EXPECT": "violated",
        }
    )
    summary = LoadRun(settings).finish(host="http://127.0.0.1:1", locust={}, window_s=1.0)
    assert summary["setup_errors"] == [] and summary["verdict"] != "setup_error"
    assert summary["strategies"]["shop"]["expected"] == "violated"


# -- light enough for Locust's workers ------------------------------------------------------

# What a Locust worker must never import: the web stack and the service's ORM and driver.
HEAVY = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "asyncpg", "razorpay", "pydantic")


def imported_by(module: str) -> set[str]:
    """Top-level packages importing `module` loads in a fresh interpreter (-X importtime)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = [line.split("|")[-1] for line in done.stderr.splitlines() if "|" in line]
    return {row.strip().split(".")[0] for row in rows[1:]}


@pytest.mark.parametrize("module", ["payrace.harness.load.gate", "payrace.harness.model.profile"])
def test_the_gate_and_the_profile_import_no_web_stack(module: str) -> None:
    loaded = imported_by(module)
    assert "payrace" in loaded  # the measurement saw the import at all
    assert loaded & set(HEAVY) == set()


# -- the target's reconciliation window, before the gate judges -------------------------


async def test_a_capture_whose_answer_was_lost_gets_the_reconcilers_window(
    service: Service,
    pg: Database,
    gateway_url: str,
    fake_gateway: FakeRazorpay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway accepted the service's capture, the database still says pending (40001
    retries used up after the gateway said yes): the gate waits, boundedly, for the target's
    reconciler. One recorded within the window is reconciled; one never recorded is still
    pending when the window closes, and no_lost_capture then judges it lost."""
    monkeypatch.setattr(reconcile_module, "OWN_WINDOW_S", 3.0)
    run = LoadRun(LoadSettings.from_env({ENV_TARGET_DSN: pg.url, ENV_GATEWAY_URL: gateway_url}))
    lost: dict[int, str] = {}
    for _ in range(2):
        order = (await service.client.post("/orders", json={"amount": 50000})).json()
        payment = fake_gateway.authorize_payment(order["gateway_order_id"])
        fake_gateway.capture(payment["id"], {"amount": 50000, "currency": "INR"})
        lost[order["payment_id"]] = payment["id"]
    run.payments = dict(lost)
    recorded, never = sorted(lost)
    # The sweeper writes only once the gate has looked once: on a loaded machine the gate's
    # first look (gateway counters, the target's statuses) can take longer than any fixed
    # delay, and would then find one payment already reconciled.
    looked = threading.Event()
    real_pending = reconcile_module.pending

    def pending_then_told(*args: Any, **kwargs: Any) -> list[int]:
        found = real_pending(*args, **kwargs)
        looked.set()
        return found

    monkeypatch.setattr(reconcile_module, "pending", pending_then_told)

    def reconciler() -> None:  # what the service's sweeper writes, after the gate's first look
        assert looked.wait(30), "the gate never looked at the pending payments"
        time.sleep(0.3)
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(
                "UPDATE payments SET status = 'captured', captured_at = now(), "
                "gateway_payment_id = %s WHERE id = %s",
                (lost[recorded], recorded),
            )

    sweeper = threading.Thread(target=reconciler)
    sweeper.start()
    try:
        waited = await asyncio.to_thread(run._await_reconciled, pg.url, gateway_url)
    finally:
        sweeper.join()
    assert (waited["pending_before"], waited["reconciled"], waited["pending_after"]) == (2, 1, 1)
    assert waited["first_pending"] == [never]
    assert 2.5 <= waited["waited_s"] < 10, waited
