"""reports.writers: summary.json, junit.xml and report.html written together."""

from __future__ import annotations

import json
from pathlib import Path

from report_summaries import realistic_summary

from payrace.harness.reports.writers import write_all


def test_write_all_writes_three_files_and_json_round_trips(tmp_path: Path) -> None:
    summary = realistic_summary()
    written = write_all(summary, tmp_path / "run")
    assert set(written) == {"summary", "junit", "html"}
    assert [p.name for p in written.values()] == ["summary.json", "junit.xml", "report.html"]
    assert json.loads(written["summary"].read_text()) == summary
    assert not list((tmp_path / "run").glob(".*"))  # no temp files left behind
