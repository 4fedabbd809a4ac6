"""reports.junit: junit.xml mirrors the CLI verdict, and a run that checked nothing is not green."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from report_summaries import (
    DEADLOCK_STATEMENTS,
    check,
    deadlocked_summary,
    empty_summary,
    realistic_summary,
)

from payrace.harness.model.gates import Gate
from payrace.harness.reports.junit import write_junit


def cases(root: ET.Element) -> dict[str, ET.Element]:
    return {f"{c.get('classname')}/{c.get('name')}": c for c in root.iter("testcase")}


def test_junit_mirrors_the_cli_verdict(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    write_junit(realistic_summary(), path)
    root = ET.parse(path).getroot()
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert set(suites) == {"payrace.naive", "payrace.for_update"}
    found = cases(root)
    # declared unsafe and caught: passing "caught:" cases, no failures
    assert "payrace.naive/caught:violation" in found
    assert "payrace.naive/caught:single_capture_write" in found
    assert "payrace.naive/caught:single_invoice_paid" in found
    assert "payrace.naive/no_5xx" in found
    assert "payrace.for_update/gate:lock_p99_ms<=100" in found
    assert root.get("failures") == "0" and root.get("errors") == "0"
    for suite in suites.values():
        assert int(suite.get("tests", "0")) == len(suite.findall("testcase"))
        assert suite.get("failures") == "0"
    assert root.get("tests") == str(len(found)) == "8"
    # the schedule that did it travels with the run and with the catching case
    suite_out = suites["payrace.naive"].find("system-out")
    assert suite_out is not None and "T7" in (suite_out.text or "")
    case_out = found["payrace.naive/caught:single_capture_write"].find("system-out")
    assert case_out is not None and "update invoice = paid <dup>" in (case_out.text or "")


def test_junit_fails_a_violated_safe_strategy_and_a_missed_race(tmp_path: Path) -> None:
    summary = realistic_summary()
    naive, fixed = summary["strategies"]["naive"], summary["strategies"]["for_update"]
    # the "fix" double-captured, and the bug went unprovoked
    fixed["valid"] = False
    fixed["checks"]["single_capture_write"] = check(
        "single_capture_write", False, 2, 50, first={"payment": 9}
    )
    fixed["checks"]["no_deadlock"] = check("no_deadlock", "unknown", 0, 0, note="no counter")
    naive["valid"] = True
    for name in ("single_capture_write", "single_invoice_paid"):
        naive["checks"][name] = check(name, True, 0, 50)
    naive["first_violation"] = None
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
    assert "2 of 50" in failure.get("message", "") and '"payment": 9' in failure.get("message", "")
    assert found["payrace.for_update/no_deadlock"].find("error") is not None
    assert found["payrace.naive/caught:violation"].find("failure") is not None
    assert not any(name.startswith("payrace.naive/caught:single") for name in found)
    assert found["payrace.for_update/gate:lock_p99_ms<=1"].find("failure") is not None
    assert found["payrace.gates/gate:hold_p99_ms<=5"].find("error") is not None

    failures = sum(1 for c in found.values() if c.find("failure") is not None)
    errors = sum(1 for c in found.values() if c.find("error") is not None)
    assert (failures, errors) == (3, 2)
    assert root.get("failures") == "3" and root.get("errors") == "2"
    assert sum(int(s.get("failures", "0")) for s in root.iter("testsuite")) == 3


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
    assert failure is not None and "3 of 50 checked violated" in failure.get("message", "")
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
