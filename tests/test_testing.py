"""payrace/testing.py without a database: RaceResult's one assertion and its words, and the
process-wide defaults the pytest plugin sets (the races themselves: tests/harness/runner/
test_capture_race.py and tests/harness/test_pytest_plugin.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from report_summaries import check, measured, strategy

from payrace import testing
from payrace.testing import RaceResult


def summary(valid: object, verdict: str, **checks: dict[str, Any]) -> dict[str, Any]:
    result = strategy("valid", valid, measured(1, 1.0, 5), checks=checks)
    return {"strategies": {"for_update": result}, "gates": [], "verdict": verdict}


def test_a_valid_race_passes_the_assertion() -> None:
    passed = RaceResult(summary(True, "valid", no_5xx=check("no_5xx", True, 0, 10)))
    passed.assert_exactly_once()
    assert (passed.valid, passed.verdict) == (True, "valid")


def test_an_unknown_verdict_fails_saying_what_could_not_be_decided(tmp_path: Path) -> None:
    note = "1 client backend(s) stayed active"
    unknown = check("no_deadlock", "unknown", 0, 10, note=note)
    result = RaceResult(summary("unknown", "unknown", no_deadlock=unknown), tmp_path / "r.html")
    with pytest.raises(pytest.fail.Exception) as failed:
        result.assert_exactly_once()  # not proven is not passed, as the CLI's exit 1
    said = str(failed.value)
    assert said.startswith("exactly once could not be proven (verdict unknown)")
    assert f"for_update: no_deadlock: unknown: {note}" in said
    assert f"report: {tmp_path / 'r.html'}" in said


def test_a_failed_checker_is_named_with_its_count_in_words() -> None:
    doubled = check("gateway_capture_once", False, 2, 10)
    result = RaceResult(summary(False, "violated", gateway_capture_once=doubled))
    with pytest.raises(pytest.fail.Exception) as failed:
        result.assert_exactly_once()
    said = str(failed.value)
    assert "gateway_capture_once: 2 of " in said
    assert "captured at the gateway more than once" in said
    assert "report:" not in said  # no report written, none named


def test_outside_pytest_a_failure_is_an_assertion_error() -> None:
    probe = "from payrace.testing import fail\nfail('capture was not exactly once')\n"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert "AssertionError: capture was not exactly once" in done.stderr


def test_reports_go_where_the_plugin_says_else_where_the_cli_puts_them(tmp_path: Path) -> None:
    before = dict(testing._session)
    try:
        testing.configure(reports=lambda: tmp_path / "payrace")
        assert testing.reports_dir(None) == tmp_path / "payrace"
        assert testing.reports_dir(tmp_path / "mine") == tmp_path / "mine"
        testing.configure()
        assert testing.reports_dir(None) == Path("reports")
    finally:
        testing._session.update(before)


def test_two_races_in_one_second_never_share_a_report_directory() -> None:
    ids = {testing.new_run_id(["naive"], "forced") for _ in range(50)}
    assert len(ids) == 50
