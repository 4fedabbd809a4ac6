"""How the isolation matrix (explore.matrix) is shown: one table, three ways.

    cell_text()       one cell as a reader scans it: "valid 0/9", "VIOLATED db 7 gw 7 /9"
    render_table()    the console: a row per strategy, a column per level, then the verdict
    build_html()      matrix.html: the same grid (red where a declared cell is not as declared,
                      amber where a measured one violates), and per cell its replay id
    build_markdown()  matrix.md: the grid in Markdown with the command and the machine
    write()           summary.json, matrix.html and matrix.md into a run directory

Each cell gives the database side (schedules in which a row was written twice) beside the
gateway side (schedules in which the gateway captured twice, or the shop and the gateway
disagree). The verdict line is the summary's (model.verdict.RunOutcome.of).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from payrace.harness.model.verdict import RunOutcome
from payrace.harness.reports.summary import machine_line
from payrace.redact import redact_tree

LEGEND = (
    "each cell: the verdict over every schedule, then violating schedules / schedules, "
    "db = a payment, invoice or order row written twice, gw = captured twice at the gateway "
    "or the shop and the gateway disagree; (declared X) where the cell is judged, "
    "[runs at L] where the strategy pins its own level"
)


def cell_text(cell: Mapping[str, Any]) -> str:
    word = cell["found"] if cell["as_declared"] is not False else cell["found"].upper()
    text = f"{word} {cell['violating']}/{cell['schedules']}"
    text += f" (db {cell['database']}, gw {cell['gateway']})"
    if cell["other"]:
        text += f" other {cell['other']}"
    if cell["declared"]:
        text += f" (declared {cell['declared']})"
    if cell["runs_at"] != cell["isolation"]:
        text += f" [runs at {cell['runs_at']}]"
    return text


def _grid(summary: Mapping[str, Any]) -> list[tuple[str, list[Mapping[str, Any]]]]:
    by = {(c["strategy"], c["isolation"]): c for c in summary["cells"]}
    return [
        (s, [by[(s, level)] for level in summary["levels"] if (s, level) in by])
        for s in summary["strategies"]
    ]


def render_table(summary: Mapping[str, Any], console: Console) -> None:
    table = Table(
        title="payrace matrix: every schedule of " + ", ".join(summary["requests"]) + ", per level"
    )
    table.add_column("strategy")
    for level in summary["levels"]:
        table.add_column(level)
    for strategy, cells in _grid(summary):
        table.add_row(
            escape(strategy),
            *(
                ("[bold red]" if c["as_declared"] is False else "")
                + escape(cell_text(c))
                + ("[/]" if c["as_declared"] is False else "")
                for c in cells
            ),
        )
    console.print(table)
    console.print(LEGEND, highlight=False, markup=False)
    outcome = RunOutcome.of(summary)
    for reason in outcome.reasons:
        console.print(f"  {reason}", highlight=False, markup=False)
    console.print(f"verdict: {outcome.line()}", highlight=False, markup=False)


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _css_class(cell: Mapping[str, Any]) -> str:
    if cell["as_declared"] is False:
        return "bad"
    return "warn" if cell["found"] != "valid" else "ok"


def build_html(summary: Mapping[str, Any]) -> str:
    outcome = RunOutcome.of(summary)
    head = "<th>strategy</th>" + "".join(f"<th>{_esc(level)}</th>" for level in summary["levels"])
    rows = []
    for strategy, cells in _grid(summary):
        tds = "".join(
            f'<td class="{_css_class(c)}">{_esc(cell_text(c))}'
            + (f"<br><code>{_esc(c['first_violation'])}</code>" if c["first_violation"] else "")
            + "</td>"
            for c in cells
        )
        rows.append(f"<tr><th>{_esc(strategy)}</th>{tds}</tr>")
    reasons = "".join(f"<li>{_esc(r)}</li>" for r in outcome.reasons)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>payrace matrix {_esc(summary["run_id"])}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ddd;padding:4px 8px;text-align:left}} .meta{{color:#666}}
td.bad{{background:#fde2e0}} td.warn{{background:#fff4d6}}
.verdict{{font-size:1.2em;font-weight:600}}
</style></head><body>
<h1>payrace matrix</h1>
<p class="verdict">verdict: {_esc(outcome.line())}</p><ul>{reasons}</ul>
<p class="meta">{_esc(summary.get("command", ""))} · requests {_esc(", ".join(summary["requests"]))}
· {_esc(machine_line(summary))}</p>
<p class="meta">{_esc(LEGEND)}; under a violating cell, the id of its shortest violating
schedule (<code>payrace explore --replay ID</code>)</p>
<table><tr>{head}</tr>{"".join(rows)}</table>
</body></html>
"""


def build_markdown(summary: Mapping[str, Any]) -> str:
    lines = [
        "| strategy | " + " | ".join(summary["levels"]) + " |",
        "|---|" + "---|" * len(summary["levels"]),
        *(
            f"| {strategy} | " + " | ".join(cell_text(c) for c in cells) + " |"
            for strategy, cells in _grid(summary)
        ),
    ]
    return "\n".join(
        [
            f"Command: `{summary.get('command', 'payrace matrix')}` (requests "
            f"{', '.join(summary['requests'])}, every schedule of each cell)",
            "",
            machine_line(summary),
            "",
            f"Verdict: {RunOutcome.of(summary).line()}",
            "",
            LEGEND[0].upper() + LEGEND[1:] + ".",
            "",
            *lines,
            "",
        ]
    )


def write(summary: Mapping[str, Any], run_dir: Path) -> None:
    summary = redact_tree(dict(summary))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (run_dir / "matrix.html").write_text(build_html(summary), encoding="utf-8")
    (run_dir / "matrix.md").write_text(build_markdown(summary), encoding="utf-8")


__all__ = ["LEGEND", "build_html", "build_markdown", "cell_text", "render_table", "write"]
