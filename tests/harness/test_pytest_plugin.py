"""The pytest plugin as a team would use it: the `race` fixture in a plain test."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from report_summaries import DEADLOCK_STATEMENTS, deadlocked_summary

from payrace.harness.pytest_plugin import RaceResult


def test_capture_is_exactly_once(race: Callable[..., RaceResult]) -> None:
    race(strategy="for_update", trials=10, mode="forced").assert_exactly_once()


def test_the_plugin_fails_a_test_when_capture_is_doubled(race: Callable[..., RaceResult]) -> None:
    result = race(strategy="naive", trials=5, mode="forced")
    assert result.violating_trials == 5
    with pytest.raises(pytest.fail.Exception, match="read payment"):
        result.assert_exactly_once()


def test_gates_pass_through(race: Callable[..., RaceResult]) -> None:
    result = race(strategy="for_update", trials=3, gates=["lock_max_ms<0"])
    assert result.summary["exit_code"] == 1
    assert result.valid is True


def test_a_deadlocked_trial_fails_with_its_statements() -> None:
    result = RaceResult(deadlocked_summary())
    with pytest.raises(pytest.fail.Exception) as failed:
        result.assert_exactly_once()
    said = str(failed.value)
    assert "first violating trial 3:" in said
    assert all(statement in said for statement in DEADLOCK_STATEMENTS)
    assert "2 could not be tied to a trial" in said
