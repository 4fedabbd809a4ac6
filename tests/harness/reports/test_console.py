"""reports.console: the terminal tables, schedules, gates and verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from report_summaries import empty_summary, realistic_summary
from rich.console import Console

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
    assert "violated (caught)" in text
    assert "single_capture_write" in text
    assert "first violation: naive, trial 3" in text
    assert "read payment (pending)" in text and "T7" in text
    assert "update invoice = paid <dup>" in text  # rich markup not interpreted
    assert "gate lock_p99_ms<=100 on for_update: measured 9.1 passed" in text
    assert str(written["html"]) in text
    assert "verdict: valid (exit code 0)" in text
    assert "48/50 by locks, 2" in text  # how many trials forced mode forced
