"""reports.writers: summary.json, junit.xml and report.html written together, each run in a
directory of its own, as readable as history.jsonl."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from report_summaries import realistic_summary

from payrace.harness.reports.writers import claim_run_dir, write_all


def test_write_all_writes_three_files_and_json_round_trips(tmp_path: Path) -> None:
    summary = realistic_summary()
    written = write_all(summary, tmp_path / "run")
    assert set(written) == {"summary", "junit", "html"}
    assert [p.name for p in written.values()] == ["summary.json", "junit.xml", "report.html"]
    assert json.loads(written["summary"].read_text()) == summary
    assert not list((tmp_path / "run").glob(".*"))  # no temp files left behind


def test_two_runs_of_the_same_second_never_share_a_directory(tmp_path: Path) -> None:
    first = claim_run_dir(tmp_path / "reports", "20261130-113242-naive-forced")
    (first / "summary.json").write_text("{}")
    second = claim_run_dir(tmp_path / "reports", "20261130-113242-naive-forced")
    third = claim_run_dir(tmp_path / "reports", "20261130-113242-naive-forced")
    assert [p.name for p in (first, second, third)] == [
        "20261130-113242-naive-forced",
        "20261130-113242-naive-forced-2",
        "20261130-113242-naive-forced-3",
    ]
    assert (first / "summary.json").read_text() == "{}"  # never overwritten


def test_report_files_get_the_permissions_history_jsonl_gets(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        written = write_all(realistic_summary(), tmp_path / "run")
        (tmp_path / "run" / "history.jsonl").write_text("")  # as the runner writes it
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    assert modes["history.jsonl"] == 0o640
    assert {modes[p.name] for p in written.values()} == {0o640}
