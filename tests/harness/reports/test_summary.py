"""reports.summary: the verdict every report shares, and summary.json."""

from __future__ import annotations

from pathlib import Path

import pytest
from report_summaries import DEADLOCK_STATEMENTS, deadlocked_summary, realistic_summary

from payrace.harness.reports.summary import (
    deadlock_line,
    deadlock_lines,
    forced_text,
    nemesis_line,
    outcome,
    write_json,
)


@pytest.mark.parametrize(
    ("expected", "valid", "passed"),
    [
        ("violated", False, False),  # `payrace run` exits 1 on naive: red, as the exit code
        ("violated", True, True),
        ("valid", False, False),
        ("valid", True, True),
        (None, False, False),
        ("valid", "unknown", None),
        ("violated", "unknown", None),
    ],
)
def test_outcome_of_a_run_judged_on_its_invariants(
    expected: str | None, valid: object, passed: bool | None
) -> None:
    assert outcome({"expected": expected, "valid": valid}).passed is passed


@pytest.mark.parametrize(
    ("expected", "valid", "as_declared", "passed"),
    [
        ("violated", False, True, True),  # `payrace race`: naive caught is the pass
        ("violated", True, False, False),
        ("valid", False, False, False),
        ("valid", True, True, True),
        ("valid", "unknown", False, False),
    ],
)
def test_outcome_of_a_race_judged_against_the_declaration(
    expected: str, valid: object, as_declared: bool, passed: bool
) -> None:
    result = outcome({"expected": expected, "valid": valid, "as_declared": as_declared})
    assert result.passed is passed
    assert ("as declared" in result.label) is as_declared


def test_json_refuses_nan_rather_than_writing_invalid_json(tmp_path: Path) -> None:
    summary = realistic_summary()
    summary["duration_s"] = float("nan")
    with pytest.raises(ValueError):
        write_json(summary, tmp_path / "summary.json")


def test_deadlock_lines_give_each_backend_its_lock_fate_and_statement() -> None:
    target = deadlocked_summary()["strategies"]["target"]
    lines = deadlock_lines(target["first_violation"])
    assert lines[0] == "deadlock seen at 2026-11-26T10:15:01.5+00:00:"
    assert lines[1] == (
        "  backend 4242 (xid 812, rolled back by PostgreSQL) waits for transaction 813 "
        "(ShareLock) held by backend 4243:"
    )
    assert lines[2] == f"    {DEADLOCK_STATEMENTS[0]}"
    assert lines[4] == f"    {DEADLOCK_STATEMENTS[1]}"
    assert lines[5] == "reply #12 to verify (client), HTTP 409: deadlock detected <40P01>"
    assert deadlock_lines({"trial": 1, "payment": 2}) == []


def test_deadlock_line_says_what_could_not_be_tied_and_nothing_without_deadlocks() -> None:
    target = deadlocked_summary()["strategies"]["target"]
    assert deadlock_line(target) == (
        "deadlocks: 3 counted by PostgreSQL, 1 tied to 1 trial(s), 2 could not be tied to a "
        "trial: 2 counted by pg_stat_database were never seen as a wait-for cycle"
    )
    quiet = {"counted": 0, "attributed": 0, "unattributed": 0, "settled": True}
    assert deadlock_line({"deadlocks": quiet}) == ""
    assert deadlock_line({}) == ""  # a summary from before the block existed


def test_nemesis_line_says_what_each_fault_did_and_nothing_without_a_nemesis() -> None:
    assert nemesis_line({}) == ""
    line = nemesis_line(
        {
            "nemesis": {
                "faults": ["restart-postgres:2", "kill-after-capture:0.2"],
                "backends_killed": 0,
                "captures_killed_before_commit": 3,
                "restarts": {"restart-postgres": {"count": 2, "down_s_max": 0.81}},
            }
        }
    )
    assert line == (
        "nemesis restart-postgres:2, kill-after-capture:0.2: 3 captures whose transaction "
        "was killed; restart-postgres 2 time(s), down at most 0.81 s"
    )
    assert nemesis_line({"nemesis": {"faults": ["gateway-errors:0"]}}).endswith("nothing injected")


def test_forced_text_says_how_many_trials_were_forced_and_by_what() -> None:
    forced = {"by": "locks", "trials": 200, "forced": 200, "timeouts": 0}
    assert forced_text({"forced": forced}) == "200/200 by locks"
    forced = {"by": "pause", "trials": 200, "forced": 199, "timeouts": 1}
    assert forced_text({"forced": forced}) == "199/200 by pause, 1 timeout"
    assert forced_text({"forced": None}) == forced_text({}) == "-"  # aligned, jitter
