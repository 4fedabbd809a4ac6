"""How `payrace compare` is shown: one table (console and HTML) and one self-contained page.

    HEAD              the columns, in the order both views give them
    cells()           one runner.compare.Row as the table's strings
    render_table()    the rich table, the advice and the verdict line on a console
    build_html()      compare.html: verdict, table, "which to pick when", and per mode the
                      lock-wait and hold CDFs of every strategy side by side (svgplot)
    write_html()
    build_markdown()  compare.md: the same table and advice as Markdown, with the command and
                      the machine (what docs/compare.md is made from)

The verdict line is the summary's (model.verdict.RunOutcome.of): the page, the console and
the exit code cannot disagree.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from payrace.harness.model.verdict import RunOutcome
from payrace.harness.reports import svgplot
from payrace.harness.reports.summary import machine_line

# Times in ms; "40001": attempts aborted by a serialization failure and re-run by the service.
HEAD = (
    "strategy", "mode", "declared", "found", "violations", "trials/s", "captures/s",
    "request p50", "request p99", "lock p50", "lock p99", "lock max", "hold p50", "hold p99",
    "409 (retried)", "40001", "deadlocks", "gateway calls",
)  # fmt: skip


NOTES = (
    "Times in ms. 40001: attempts aborted by a serialization failure and re-run inside the "
    "service; 409 (retried): answers the harness sent again, as a client would (Locust's "
    "users do not). request: invoke to answer as the client saw it (aligned, load); n/a in "
    "forced and explore, where the harness holds the requests, as are lock and hold in "
    "explore. captures/s: payments captured per second (a trial is one payment); n/a in "
    "explore, which paces its schedules itself. explore: every schedule of the callback and "
    "a webhook plus PCT runs of the callback and two webhooks; its trials are schedules."
)


def workload(summary: Mapping[str, Any]) -> str:
    """What every strategy was given, per mode compared."""
    modes = str(summary.get("mode", "")).split("+")
    got = summary.get("settings") or {"trials": summary.get("trials")}
    parts = [f"seed {summary.get('seed')}"]
    if {"forced", "aligned"} & set(modes):
        parts.append(f"{got.get('trials')} trials per strategy in forced and aligned")
    if "explore" in modes:
        parts.append(f"explore: every schedule plus {got.get('pct')} PCT runs per strategy")
    if "load" in modes:
        parts.append(
            f"load: race_pairs, {got.get('users')} users at {got.get('spawn_rate')}/s for "
            f"{got.get('run_time')} per strategy"
        )
    return ", ".join(parts)


def _ms(value: object) -> str:
    return "n/a" if not isinstance(value, int | float) else f"{value:.2f}"


def cells(row: Mapping[str, Any]) -> list[str]:
    return [
        str(row["strategy"]),
        str(row["mode"]),
        str(row["declared"]),
        str(row["found"]),
        f"{row['violations']}/{row['trials']}",
        f"{row['trials_per_s']:.1f}",
        "n/a" if row.get("captures_per_s") is None else f"{row['captures_per_s']:.1f}",
        _ms(row.get("request_p50")),
        _ms(row.get("request_p99")),
        _ms(row["lock_p50"]),
        _ms(row["lock_p99"]),
        _ms(row["lock_max"]),
        _ms(row["hold_p50"]),
        _ms(row["hold_p99"]),
        f"{row['answered_409']} ({row['retried_409']})",
        str(row["serialization_failures"]),
        str(row["deadlocks"]),
        str(row["gateway_calls"]),
    ]


def render_table(summary: Mapping[str, Any], console: Console) -> None:
    table = Table(title="payrace compare: one seeded workload, every strategy (times in ms)")
    for col in HEAD:
        table.add_column(col, justify="left" if col in HEAD[:4] else "right")
    for row in summary["compare"]["rows"]:
        style = None if row["as_declared"] else "bold red"
        table.add_row(*(escape(c) for c in cells(row)), style=style)
    console.print(table)
    console.print("which to pick when (from the figures above):", highlight=False)
    for line in summary["compare"]["advice"]:
        console.print(f"  - {escape(line)}", highlight=False)
    console.print(f"verdict: {RunOutcome.of(summary).line()}", highlight=False)


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _plots(summary: Mapping[str, Any], mode: str) -> str:
    figures = []
    for kind, label in (("lock", "lock wait ms"), ("hold", "lock hold ms")):
        series = []
        results = [r for r in summary["strategies"].values() if r["mode"] == mode]
        for i, result in enumerate(results):
            data = (((result.get("plots") or {}).get(kind) or {}).get("all") or {}).get("cdf")
            color = svgplot.PALETTE[i % len(svgplot.PALETTE)]
            series.append(svgplot.Series(result["strategy"], color, list(data or [])))
        figures.append(svgplot.cdf(f"{label}, {mode}: CDF", label, series))
    return '<div class="plots">' + "".join(figures) + "</div>"


def build_html(summary: Mapping[str, Any]) -> str:
    outcome = RunOutcome.of(summary)
    head = "".join(f"<th>{_esc(c)}</th>" for c in HEAD)
    body = "".join(
        f'<tr class="{"ok" if row["as_declared"] else "bad"}">'
        + "".join(f"<td>{_esc(c)}</td>" for c in cells(row))
        + "</tr>"
        for row in summary["compare"]["rows"]
    )
    advice = "".join(f"<li>{_esc(line)}</li>" for line in summary["compare"]["advice"])
    # An exploration's times are the scheduler's holds: it has no plots to show.
    modes = list(dict.fromkeys(r["mode"] for r in summary["strategies"].values() if r.get("plots")))
    plots = "".join(f"<h3>{_esc(m)}</h3>{_plots(summary, m)}" for m in modes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>payrace compare {_esc(summary["run_id"])}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ddd;padding:4px 8px;text-align:right}}
td:nth-child(-n+4){{text-align:left}}
tr.bad td{{background:#fde2e0}} .verdict{{font-size:1.2em;font-weight:600}}
.plots{{display:flex;flex-wrap:wrap;gap:12px}} .meta{{color:#666}}
{svgplot.CSS}</style></head><body>
<h1>payrace compare</h1>
<p class="verdict">verdict: {_esc(outcome.line())}</p>
<p class="meta">{_esc(summary.get("command", ""))} · {_esc(workload(summary))} ·
{_esc(machine_line(summary))}</p>
<p class="meta">{_esc(NOTES)}</p>
<table><tr>{head}</tr>{body}</table>
<h2>Which to pick when</h2><p class="meta">derived from the figures above by
payrace.harness.runner.compare.advice()</p><ul>{advice}</ul>
<h2>Lock wait and hold, side by side</h2>{plots}
</body></html>
"""


def write_html(summary: Mapping[str, Any], path: Path) -> None:
    path.write_text(build_html(summary), encoding="utf-8")


def build_markdown(summary: Mapping[str, Any]) -> str:
    table = [
        "| " + " | ".join(HEAD) + " |",
        "|" + "---|" * len(HEAD),
        *("| " + " | ".join(cells(row)) + " |" for row in summary["compare"]["rows"]),
    ]
    advice = [f"- {line}" for line in summary["compare"]["advice"]]
    return "\n".join(
        [
            f"Command: `{summary.get('command', 'payrace compare')}` ({workload(summary)})",
            "",
            machine_line(summary),
            "",
            f"Verdict: {RunOutcome.of(summary).line()}",
            "",
            NOTES,
            "",
            *table,
            "",
            "Which to pick when (derived from the figures above by "
            "`payrace.harness.runner.compare.advice()`):",
            "",
            *advice,
            "",
        ]
    )


__all__ = ["HEAD", "build_html", "build_markdown", "cells", "render_table", "write_html"]
