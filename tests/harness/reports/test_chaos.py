"""The chaos table: rows from a merged campaign, the README's copy, and the README itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from payrace.harness.errors import UsageError
from payrace.harness.model.nemesis import FAULTS
from payrace.harness.reports import chaos as chaos_report
from payrace.harness.reports.chaos import COLUMNS, COUNTED, END, START

README = Path(__file__).resolve().parents[3] / "README.md"


def _result(strategy: str, fault: str, counts: dict[str, int], valid: Any) -> dict[str, Any]:
    checks = {checker: {"count": counts.get(checker, 0)} for checker in COUNTED.values()}
    return {
        "strategy": strategy, "fault": fault, "valid": valid, "trials_done": 10,
        "as_declared": valid is (strategy == "for_update"), "checks": checks,
        "reconciliation": {"reconciled": 2},
    }  # fmt: skip


def _summary() -> dict[str, Any]:
    return {
        "command": "payrace chaos", "verdict": "as_declared", "exit_code": 0,
        "duration_s": 12.0, "started_at": "2026-11-30T15:00:00+00:00",
        "machine": {"cpus": 2}, "database": {},
        "strategies": {
            "for_update.kill-backends": _result("for_update", "kill-backends:0.05", {}, True),
            "naive.kill-backends": _result(
                "naive", "kill-backends:0.05", {"single_capture_write": 3}, False
            ),
            "for_update.gateway-errors": _result("for_update", "gateway-errors:0.2", {}, True),
            "naive.gateway-errors": _result(
                "naive", "gateway-errors:0.2", {"single_capture_write": 4, "no_5xx": 1}, False
            ),
        },
    }  # fmt: skip


def test_rows_count_each_checkers_violations_and_total_them_per_strategy() -> None:
    rows = chaos_report.rows(_summary())
    assert [r[:2] for r in rows] == [
        ["kill-backends:0.05", "for_update"], ["kill-backends:0.05", "naive"],
        ["gateway-errors:0.2", "for_update"], ["gateway-errors:0.2", "naive"],
        ["all faults", "for_update"], ["all faults", "naive"],
    ]  # fmt: skip
    at = {col: i for i, col in enumerate(COLUMNS)}
    naive_total = rows[-1]
    assert naive_total[at["payments"]] == "20"
    assert naive_total[at["double capture"]] == "7" and naive_total[at["5xx"]] == "1"
    assert naive_total[at["reconciled"]] == "4"
    assert naive_total[at["verdict"]] == "violated" and naive_total[at["as declared"]] == "yes"
    assert rows[-2][at["double capture"]] == "0" and rows[-2][at["verdict"]] == "valid"


def test_a_strategy_not_as_declared_under_one_fault_says_NO_in_its_total() -> None:
    summary = _summary()
    summary["strategies"]["naive.kill-backends"].update(valid=True, as_declared=False)
    rows = chaos_report.rows(summary)
    assert rows[1][-1] == "NO" and rows[-1][-1] == "NO" and rows[-1][-2] == "mixed"


def test_the_readme_is_rewritten_between_its_markers_only(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nstale table\n{END}\noutro\n")
    chaos_report.rewrite_readme(readme, _summary())
    text = readme.read_text()
    assert text.startswith(f"intro\n{START}\n") and text.endswith(f"{END}\noutro\n")
    assert "stale table" not in text
    table = chaos_report.readme_table(text)
    assert table[0] == list(COLUMNS) and len(table) == 2 + 6
    assert "`payrace chaos`: verdict as_declared (exit code 0)" in text


@pytest.mark.parametrize("text", ["no markers", f"{END}\n{START}\n", f"{START} only"])
def test_a_readme_without_the_markers_is_refused_before_anything_runs(
    tmp_path: Path, text: str
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(UsageError, match="no chaos table markers"):
        chaos_report.check_readme(readme)
    with pytest.raises(UsageError, match="--readme"):
        chaos_report.check_readme(tmp_path / "missing.md")


def test_the_projects_readme_holds_the_table_in_the_commands_format() -> None:
    """README.md's chaos table is what `payrace chaos --readme README.md` writes: its header,
    a row per (fault, strategy) of registered faults, the totals, every cell in place."""
    table = chaos_report.readme_table(README.read_text(encoding="utf-8"))
    header, align, *rows = table
    assert header == list(COLUMNS)
    assert len(align) == len(COLUMNS) and all(set(a) <= set("-:") for a in align)
    faults = {r[0].split(":")[0] for r in rows if r[0] != "all faults"}
    assert faults and faults <= set(FAULTS), faults
    assert {r[1] for r in rows} == {"for_update", "naive"}
    for row in rows:
        assert len(row) == len(COLUMNS), row
        for col, cell in zip(COLUMNS, row, strict=True):
            if col in COUNTED or col in ("payments", "reconciled"):
                assert cell.isdigit(), (col, row)
    totals = {r[1]: r for r in rows if r[0] == "all faults"}
    assert int(totals["for_update"][COLUMNS.index("payments")]) >= 2000
    assert all(totals["for_update"][COLUMNS.index(c)] == "0" for c in COUNTED)
    assert totals["for_update"][-1] == totals["naive"][-1] == "yes"
    assert totals["naive"][COLUMNS.index("verdict")] == "violated"
