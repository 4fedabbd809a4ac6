"""reports.console: the terminal tables, schedules, gates and verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from report_summaries import (
    DEADLOCK_STATEMENTS,
    deadlocked_summary,
    empty_summary,
    race_summary,
    realistic_summary,
)
from rich.console import Console

from payrace.harness.model.gates import Gate
from payrace.harness.reports.console import render_console
from payrace.harness.reports.writers import write_all


def test_a_run_with_zero_trials_still_renders() -> None:
    summary = empty_summary()
    console = Console(record=True, width=160)
    render_console(summary, console)
    assert "unknown" in console.export_text()
    bare: dict[str, Any] = {"strategies": {}}
    render_console(bare, Console(record=True, width=160))


def test_console_shows_verdicts_checks_timeline_gates_and_paths(tmp_path: Path) -> None:
    summary = realistic_summary()
    console = Console(record=True, width=160)
    written = write_all(summary, tmp_path)
    render_console(summary, console, paths=written)
    text = console.export_text()
    assert "violated, as declared" in text
    assert "valid" in text
    assert "single_capture_write" in text
    # the first example in words, not JSON
    assert "payment 17 (trial 3): 2 transactions set its payments row to captured" in text
    assert '{"' not in text
    assert "first violation: naive, trial 3" in text
    assert "read payment (pending)" in text and "T7" in text
    assert "update invoice = paid <dup>" in text  # rich markup not interpreted
    assert "gate lock_p99_ms<=100 on for_update: measured 9.1 passed" in text
    assert str(written["html"]) in text
    assert "verdict: violated (exit code 1)" in text  # as `payrace run` exits
    assert "naive: violated" in text  # why
    assert "48/50 by locks, 2" in text  # how many trials forced mode forced


def test_console_of_a_race_says_as_declared() -> None:
    console = Console(record=True, width=200)
    render_console(race_summary(), console)
    text = console.export_text()
    assert "violated (as declared)" in text
    assert "verdict: as declared (exit code 0)" in text


def test_console_shows_a_deadlocked_trial_with_its_statements_and_the_untied_rest() -> None:
    console = Console(record=True, width=200)
    render_console(deadlocked_summary(), console)
    text = console.export_text()
    assert "first violation: target, trial 3, payment 17 (no_deadlock)" in text
    for statement in DEADLOCK_STATEMENTS:
        assert statement in text
    assert "rolled back by PostgreSQL" in text and "went on and committed" in text
    assert "deadlock detected <40P01>" in text  # the reply, markup not interpreted
    assert (
        "target: deadlocks: 3 counted by PostgreSQL, 1 tied to 1 trial(s), 2 could not be" in text
    )
    assert "never seen as a wait-for cycle" in text
    assert "gate violations<=0 on target: measured 3 breached" in text


def test_console_shows_a_relative_gates_resolved_threshold() -> None:
    summary = realistic_summary()
    fixed = summary["strategies"]["for_update"]
    summary["gates"] = [Gate.parse("lock_p99_ms<=0.5*hold_p99_ms").judge("for_update", fixed)]
    console = Console(record=True, width=200)
    render_console(summary, console)
    assert (
        "gate lock_p99_ms<=0.5*hold_p99_ms on for_update: measured 8.207, threshold 3.962 = "
        "0.5 * 7.923 (hold_p99_ms) breached"
    ) in console.export_text()


def test_console_says_not_measured_for_a_path_with_no_samples() -> None:
    summary = realistic_summary()
    summary["strategies"]["for_update"]["latency_ms"]["lock"]["webhook"] = {"count": 0}
    summary["strategies"]["for_update"]["latency_ms"]["hold"] = {}
    console = Console(record=True, width=200)
    render_console(summary, console)
    row = next(line for line in console.export_text().splitlines() if "for_update" in line)
    cells = [c.strip() for c in row.split("│")]
    assert cells[-3:-1] == ["not measured", "not measured"]  # lock webhook, hold p99
    assert "/" in cells[-4]  # the client path was measured: p50/p99/max
