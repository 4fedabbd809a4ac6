"""reports.summary: the verdict every report shares, and summary.json."""

from __future__ import annotations

from pathlib import Path

import pytest
from report_summaries import realistic_summary

from payrace.harness.reports.summary import forced_text, outcome, write_json


@pytest.mark.parametrize(
    ("expected", "valid", "passed"),
    [
        ("violated", False, True),
        ("violated", True, False),
        ("valid", False, False),
        ("valid", True, True),
        (None, False, False),
        ("valid", "unknown", None),
        ("violated", "unknown", None),
    ],
)
def test_outcome_judges_against_the_declaration(
    expected: str | None, valid: object, passed: bool | None
) -> None:
    assert outcome({"expected": expected, "valid": valid}).passed is passed


def test_json_refuses_nan_rather_than_writing_invalid_json(tmp_path: Path) -> None:
    summary = realistic_summary()
    summary["duration_s"] = float("nan")
    with pytest.raises(ValueError):
        write_json(summary, tmp_path / "summary.json")


def test_forced_text_says_how_many_trials_were_forced_and_by_what() -> None:
    forced = {"by": "locks", "trials": 200, "forced": 200, "timeouts": 0}
    assert forced_text({"forced": forced}) == "200/200 by locks"
    forced = {"by": "pause", "trials": 200, "forced": 199, "timeouts": 1}
    assert forced_text({"forced": forced}) == "199/200 by pause, 1 timeout"
    assert forced_text({"forced": None}) == forced_text({}) == "-"  # aligned, jitter
