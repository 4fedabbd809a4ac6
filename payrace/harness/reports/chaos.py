"""The `payrace chaos` table: one row per (fault, strategy), and the README's copy of it.

COLUMNS         the table's header: what the issue asks to be zero on for_update
rows()          a merged chaos summary (runner.chaos.merge) -> rows of cells, a total
                row per strategy last
markdown()      the rows as the README's Markdown table, with the command, machine and
                verdict under it
render_table()  the rows on the console (rich)
rewrite_readme() replace what lies between START and END in a README; a README without
                both markers is refused before the campaign runs (check_readme)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from payrace.harness.errors import UsageError
from payrace.harness.model.verdict import found_word
from payrace.harness.reports.summary import machine_line

START = "<!-- payrace-chaos:start (payrace chaos --readme README.md rewrites this) -->"
END = "<!-- payrace-chaos:end -->"

# column -> the checker whose violation count it shows (None: not a count)
COUNTED = {
    "double capture": "single_capture_write",
    "double invoice": "single_invoice_paid",
    "double order": "single_order_paid",
    "double gateway capture": "gateway_capture_once",
    "lost": "no_lost_capture",
    "phantom": "no_phantom_capture",
    "5xx": "no_5xx",
}
COLUMNS = ("fault", "strategy", "payments", *COUNTED, "reconciled", "verdict", "as declared")
NUMERIC = {*COUNTED, "payments", "reconciled"}  # right-aligned


def _count(result: dict[str, Any], checker: str) -> int | None:
    check = (result.get("checks") or {}).get(checker)
    return None if check is None else int(check.get("count") or 0)


def _cell(value: int | None) -> str:
    return "?" if value is None else str(value)


def rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per (fault, strategy) in campaign order, then a total row per strategy."""
    out: list[list[str]] = []
    totals: dict[str, dict[str, int | None]] = {}
    for result in summary["strategies"].values():
        strategy = str(result["strategy"])
        counts = {col: _count(result, checker) for col, checker in COUNTED.items()}
        reconciled = int((result.get("reconciliation") or {}).get("reconciled") or 0)
        payments = int(result.get("trials_done") or 0)
        out.append(
            [
                str(result.get("fault") or "-"),
                strategy,
                str(payments),
                *(_cell(v) for v in counts.values()),
                str(reconciled),
                found_word(result.get("valid")),
                "yes" if result.get("as_declared") else "NO",
            ]
        )
        total = totals.setdefault(
            strategy, {"payments": 0, "reconciled": 0, **dict.fromkeys(COUNTED, 0)}
        )
        for key, value in (*counts.items(), ("payments", payments), ("reconciled", reconciled)):
            before = total[key]
            total[key] = None if before is None or value is None else before + value
    for strategy, total in totals.items():
        mine = [r for r in summary["strategies"].values() if r["strategy"] == strategy]
        declared = all(r.get("as_declared") for r in mine)
        found = {found_word(r.get("valid")) for r in mine}
        out.append(
            [
                "all faults",
                strategy,
                _cell(total["payments"]),
                *(_cell(total[col]) for col in COUNTED),
                _cell(total["reconciled"]),
                found.pop() if len(found) == 1 else "mixed",
                "yes" if declared else "NO",
            ]
        )
    return out


def markdown(summary: dict[str, Any]) -> str:
    """The README's table: header, rows, and what produced it."""
    align = "|".join("---:" if c in NUMERIC else "---" for c in COLUMNS)
    lines = ["| " + " | ".join(COLUMNS) + " |", f"|{align}|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(summary)]
    lines += [
        "",
        f"`{summary.get('command') or 'payrace chaos'}`: verdict {summary['verdict']} (exit "
        f"code {summary['exit_code']}), {summary['duration_s']:.0f} s, "
        f"{summary.get('started_at', '?')}; {machine_line(summary)}.",
    ]
    return "\n".join(lines)


def render_table(summary: dict[str, Any], console: Console) -> None:
    table = Table(title="payrace chaos: every fault of the nemesis, the fix and the bug")
    for col in COLUMNS:
        numeric = col in NUMERIC
        # The fault and strategy are what a reader scans for: never cut, never wrapped.
        table.add_column(col, justify="right" if numeric else "left", no_wrap=not numeric)
    for row in rows(summary):
        style = "bold" if row[0] == "all faults" else None
        declared = "[green]yes[/]" if row[-1] == "yes" else "[bold red]NO[/]"
        table.add_row(*row[:-1], declared, style=style)
    console.print(table)


def check_readme(path: Path) -> str:
    """The README's text; refused (exit 2) before anything runs if it lacks the markers."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--readme {path}: {exc.strerror or exc}") from None
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise UsageError(
            f"--readme {path} has no chaos table markers: add the two lines\n{START}\n{END}\n"
            "where the table should go (payrace chaos writes between them)"
        )
    return text


def rewrite_readme(path: Path, summary: dict[str, Any]) -> None:
    text = check_readme(path)
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{markdown(summary)}\n{END}{tail}", encoding="utf-8")


def readme_table(text: str) -> list[list[str]]:
    """The table rows between the markers of a README's text (header first), as cells."""
    body = text.split(START, 1)[1].split(END, 1)[0]
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in body.splitlines()
        if line.startswith("|")
    ]
