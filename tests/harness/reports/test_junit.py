"""reports.junit: junit.xml is red exactly when the exit code is not 0, says why in words,
and a run that checked nothing is not green."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from report_summaries import (
    DEADLOCK_STATEMENTS,
    check,
    deadlocked_summary,
    empty_summary,
    race_summary,
    realistic_summary,
)

from payrace.harness.model.gates import Gate
from payrace.harness.reports.junit import write_junit


def cases(root: ET.Element) -> dict[str, ET.Element]:
    return {f"{c.get('classname')}/{c.get('name')}": c for c in root.iter("testcase")}


def red(root: ET.Element) -> int:
    return int(root.get("failures", "0")) + int(root.get("errors", "0"))


def test_junit_of_a_run_fails_naive_like_its_exit_code_in_words(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    write_junit(realistic_summary(), path)  # `payrace run`: naive violated, exit 1
    root = ET.parse(path).getroot()
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert set(suites) == {"payrace.naive", "payrace.for_update"}
    found = cases(root)
    failure = found["payrace.naive/single_capture_write"].find("failure")
    assert failure is not None
    message = failure.get("message", "")
    assert message == (
        "single_capture_write: 50 of 50 payments captured by more than one transaction; "
        "first: payment 17 (trial 3): 2 transactions set its payments row to captured "
        "(txids 811, 812), by verify from client (request #12, answered 200) and webhook from "
        "webhook-1 (request #13, answered 200)"
    )
    assert "{" not in (failure.text or "") and "'" not in message  # no JSON, no repr
    assert found["payrace.naive/single_invoice_paid"].find("failure") is not None
    assert (root.get("failures"), root.get("errors")) == ("2", "0")
    assert suites["payrace.naive"].get("failures") == "2"
    assert suites["payrace.for_update"].get("failures") == "0"
    # real times: the strategy's measured duration, shared by its checkers
    assert {c.get("time") for c in suites["payrace.naive"].iter("testcase")} == {"1.200"}
    assert suites["payrace.naive"].get("time") == "1.200" and root.get("time") == "3.400"
    # the schedule that did it travels with the run and with the failing case
    suite_out = suites["payrace.naive"].find("system-out")
    assert suite_out is not None and "T7" in (suite_out.text or "")
    case_out = found["payrace.naive/single_capture_write"].find("system-out")
    assert case_out is not None and "update invoice = paid <dup>" in (case_out.text or "")


def test_junit_of_a_race_passes_naive_caught_as_declared(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    write_junit(race_summary(), path)  # `payrace race`: every strategy as declared, exit 0
    root = ET.parse(path).getroot()
    found = cases(root)
    assert red(root) == 0
    assert root.get("tests") == str(len(found)) == "7"
    caught = found["payrace.naive/single_capture_write"]
    out = caught.find("system-out")
    assert out is not None and (out.text or "").startswith("violated, as declared: ")


def test_junit_of_a_race_fails_a_violated_fix_and_a_missed_race(tmp_path: Path) -> None:
    summary = race_summary()
    naive, fixed = summary["strategies"]["naive"], summary["strategies"]["for_update"]
    # the "fix" double-captured, and the bug went unprovoked
    fixed.update(valid=False, as_declared=False)
    fixed["checks"]["single_capture_write"] = check(
        "single_capture_write", False, 2, 50, first={"payment": 9, "table": "payments", "writes": 0}
    )
    fixed["checks"]["no_deadlock"] = check("no_deadlock", "unknown", 0, 0, note="no counter")
    naive.update(valid=True, as_declared=False, first_violation=None)
    for name in ("single_capture_write", "single_invoice_paid"):
        naive["checks"][name] = check(name, True, 0, 50)
    summary.update(verdict="not_as_declared", exit_code=1)
    summary["gates"] = [
        {"expr": "lock_p99_ms<=1", "strategy": "for_update", "value": 9.1, "passed": False},
        {"expr": "hold_p99_ms<=5", "strategy": "missing", "value": None, "passed": False},
    ]
    path = tmp_path / "junit.xml"
    write_junit(summary, path)
    root = ET.parse(path).getroot()
    found = cases(root)

    failure = found["payrace.for_update/single_capture_write"].find("failure")
    assert failure is not None
    assert failure.get("message", "").startswith(
        "single_capture_write: 2 of 50 payments captured by more than one transaction; "
        "first: payment 9 ended captured but no transaction set its payments row to captured"
    )
    assert found["payrace.for_update/no_deadlock"].find("error") is not None
    missed = found["payrace.naive/verdict"].find("failure")
    assert missed is not None and "VALID, declared violated" in missed.get("message", "")
    assert found["payrace.for_update/gate:lock_p99_ms<=1"].find("failure") is not None
    assert found["payrace.gates/gate:hold_p99_ms<=5"].find("error") is not None

    failures = sum(1 for c in found.values() if c.find("failure") is not None)
    errors = sum(1 for c in found.values() if c.find("error") is not None)
    assert (failures, errors) == (3, 2)
    assert root.get("failures") == "3" and root.get("errors") == "2"
    assert sum(int(s.get("failures", "0")) for s in root.iter("testsuite")) == 3


def test_junit_says_why_a_run_is_red_when_no_checker_does(tmp_path: Path) -> None:
    """An explorer whose step table no longer matches (exit 2), every checker valid."""
    summary = race_summary()
    summary.update(
        verdict="error",
        exit_code=2,
        judged="invariants",
        verdict_reasons=["schedule 0.1: the step table no longer matches"],
    )
    for result in summary["strategies"].values():
        result.pop("as_declared")
        result["valid"] = True
        for c in result["checks"].values():
            c.update(valid=True, count=0)
    path = tmp_path / "junit.xml"
    write_junit(summary, path)
    root = ET.parse(path).getroot()
    error = cases(root)["payrace/verdict"].find("error")
    assert error is not None
    assert error.get("message") == (
        "error: the run cannot be trusted (exit code 2): schedule 0.1: the step table no "
        "longer matches"
    )
    assert (root.get("failures"), root.get("errors")) == ("0", "1")


def test_junit_of_a_run_that_checked_nothing_is_not_green(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    write_junit(empty_summary(), path)
    root = ET.parse(path).getroot()
    assert root.get("tests") == "1" and root.get("errors") == "1"


def test_junit_fails_a_deadlock_with_its_statements_and_the_violations_gate(
    tmp_path: Path,
) -> None:
    path = tmp_path / "junit.xml"
    write_junit(deadlocked_summary(), path)
    root = ET.parse(path).getroot()
    found = cases(root)
    failure = found["payrace.target/no_deadlock"].find("failure")
    assert failure is not None
    assert failure.get("message", "").startswith(
        "no_deadlock: 3 of 50 payments deadlocked; first: payment 17 (trial 3): 1 deadlock(s); "
        "statements: UPDATE invoices"
    )
    assert found["payrace.target/gate:violations<=0"].find("failure") is not None
    out = found["payrace.target/no_deadlock"].find("system-out")
    assert out is not None
    for statement in DEADLOCK_STATEMENTS:
        assert statement in (out.text or "")
    assert found["payrace.target/single_capture_write"].find("system-out") is None


def test_junit_gives_a_relative_gates_threshold_and_what_it_came_from(tmp_path: Path) -> None:
    summary = realistic_summary()
    fixed = summary["strategies"]["for_update"]
    unmeasured = {**fixed, "latency_ms": {"lock": fixed["latency_ms"]["lock"]}}  # no hold times
    summary["gates"] = [
        Gate.parse("lock_p99_ms<=3*hold_p99_ms").judge("for_update", fixed),
        Gate.parse("lock_p99_ms<=0.5*hold_p99_ms").judge("for_update", fixed),
        Gate.parse("lock_p95_ms<=hold_p99_ms").judge("for_update", unmeasured),
    ]
    path = tmp_path / "junit.xml"
    write_junit(summary, path)
    found = cases(ET.parse(path).getroot())
    assert list(found["payrace.for_update/gate:lock_p99_ms<=3*hold_p99_ms"]) == []
    failure = found["payrace.for_update/gate:lock_p99_ms<=0.5*hold_p99_ms"].find("failure")
    assert failure is not None
    assert failure.get("message") == (
        "gate lock_p99_ms<=0.5*hold_p99_ms: breached, measured 8.207, "
        "threshold 3.962 = 0.5 * 7.923 (hold_p99_ms)"
    )
    error = found["payrace.for_update/gate:lock_p95_ms<=hold_p99_ms"].find("error")
    assert error is not None and "hold_p99_ms was not measured" in error.get("message", "")
