"""reports.matrix: the grid's cells, and the console, matrix.html and matrix.md all carrying
the summary's one verdict."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from payrace.harness.explore import matrix
from payrace.harness.explore.matrix import Cell
from payrace.harness.reports.matrix import build_html, build_markdown, cell_text, render_table
from payrace.harness.reports.matrix import write as write_matrix

RC, SR = "READ COMMITTED", "SERIALIZABLE"


def _cell(strategy: str, isolation: str, found: str, **changes: object) -> Cell:
    cell = Cell(strategy=strategy, isolation=isolation, runs_at=isolation,
                declared=matrix.declared(strategy, isolation), found=found, schedules=9,
                violating=0 if found == "valid" else 7, database=0 if found == "valid" else 7,
                gateway=0 if found == "valid" else 5, other=0, waiting=3, complete=True,
                first_violation=None if found == "valid" else f"{strategy}.rc.ca.ab6a4",
                checks={}, duration_s=0.5)  # fmt: skip
    return replace(cell, **changes)  # type: ignore[arg-type]


def _summary(*cells: Cell) -> dict[str, object]:
    return matrix.summary(cells, run_id="m<1>", command="payrace matrix", database={},
                          requests=matrix.REQUESTS, started=0.0)  # fmt: skip


def test_a_cell_gives_both_sides_its_declaration_and_the_level_it_ran_at() -> None:
    caught = _cell("naive", RC, "violated").to_json()
    assert cell_text(caught) == "violated 7/9 (db 7, gw 5) (declared violated)"
    pinned = _cell("serializable", RC, "violated", runs_at=SR, database=0).to_json()
    assert cell_text(pinned) == "VIOLATED 7/9 (db 0, gw 5) (declared valid) [runs at SERIALIZABLE]"
    broken = _cell("for_update", SR, "violated").to_json()
    assert cell_text(broken).startswith("VIOLATED 7/9")  # not as declared: shouted


def test_every_view_says_the_summarys_verdict(tmp_path: Path) -> None:
    for cells, line in (
        ((_cell("naive", RC, "violated"), _cell("for_update", RC, "valid")), "as declared"),
        ((_cell("for_update", SR, "violated"),), "not as declared"),
    ):
        summary = _summary(*cells)
        page = build_html(summary)
        assert f"verdict: {line} (exit code" in page and "<script" not in page
        assert "m&lt;1&gt;" in page  # escaped
        console = Console(record=True, width=250)
        render_table(summary, console)
        assert f"verdict: {line} (exit code" in console.export_text()
        assert f"Verdict: {line} (exit code" in build_markdown(summary)
        write_matrix(summary, tmp_path)
        assert json.loads((tmp_path / "summary.json").read_text())["verdict"] == summary["verdict"]
    assert 'class="bad"' in page and "for_update.rc.ca.ab6a4" in page
