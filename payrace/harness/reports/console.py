"""The run on the terminal, with rich: the only reports module that imports it.

    render_console()  the strategies table and the machine line, a checks table, each
                      strategy's deadlocks in a line, the first violating schedule of each
                      strategy in a panel (with a deadlock's statements), gates, the verdict
                      and exit code, the files written

Text from the summary goes into rich.Text, never into markup, so a schedule's "<dup>" or a
note's brackets print as they are. Used by `payrace run` (harness.cli) and `payrace load`
(harness.load.launch).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from payrace.harness.reports.summary import (
    PATH_ORDER,
    check_passed,
    checks_of,
    compact,
    deadlock_line,
    deadlock_lines,
    forced_text,
    gate_word,
    latency_of,
    machine_line,
    number,
    outcome,
    strategies_of,
    valid_word,
    violation_events,
    where,
)
from payrace.harness.reports.timeline import render_text

_STYLE = {True: "green", False: "bold red", None: "yellow"}


def render_console(
    summary: dict[str, Any], console: Console, paths: Mapping[str, Path] | None = None
) -> None:
    strategies = strategies_of(summary)
    table = Table(title=f"payrace {summary.get('run_id', '')}", title_justify="left")
    for column in ("strategy", "expected", "verdict"):
        table.add_column(column)
    for column in ("trials", "violating", "trials/s"):
        table.add_column(column, justify="right")
    table.add_column("forced", justify="right")
    table.add_column("lock client\np50/p99/max ms", justify="right")
    table.add_column("lock webhook\np50/p99/max ms", justify="right")
    table.add_column("hold p99 ms", justify="right")
    for name, strategy in strategies.items():
        result = outcome(strategy)
        lock = [
            f"{number(s.get('p50'))}/{number(s.get('p99'))}/{number(s.get('max'))}"
            for s in (latency_of(strategy, "lock", p) for p in PATH_ORDER)
        ]
        table.add_row(
            Text(name),
            Text(str(strategy.get("expected") or "-")),
            Text(result.label, style=_STYLE[result.passed]),
            number(strategy.get("trials")),
            number(strategy.get("violating_trials")),
            number(strategy.get("trials_per_second"), 1),
            forced_text(strategy),
            lock[0],
            lock[1],
            number(latency_of(strategy, "hold", "all").get("p99")),
        )
    console.print(table)
    console.print(Text(machine_line(summary), style="dim"))

    checks = Table(title="checks", title_justify="left")
    for column in ("strategy", "checker", "valid", "count", "checked", "first"):
        checks.add_column(column, justify="right" if column in ("count", "checked") else "left")
    for name, strategy in strategies.items():
        unsafe = strategy.get("expected") == "violated"
        for check_name, check in checks_of(strategy).items():
            valid = check.get("valid", "unknown")
            word = valid_word(valid) + (" (caught)" if unsafe and valid is False else "")
            passed = check_passed(valid, unsafe)
            first = compact(check.get("first"), 80) if check.get("first") is not None else ""
            checks.add_row(
                Text(name),
                Text(check_name),
                Text(word, style=_STYLE[passed]),
                number(check.get("count")),
                number(check.get("checked")),
                Text(first, style="dim"),
            )
    if checks.row_count:
        console.print(checks)
    for name, strategy in strategies.items():
        if deadlocks := deadlock_line(strategy):
            console.print(Text(f"{name}: {deadlocks}", style="bold red"))
        for blind in strategy.get("not_seen") or []:  # what the run could not see
            console.print(Text(f"{name}: not seen: {blind}", style="yellow"))

    for name, strategy in strategies.items():
        events = violation_events(strategy)
        violation = strategy.get("first_violation") or {}
        statements = deadlock_lines(violation)
        if not events and not statements:
            continue
        title = (
            f"first violation: {name}, {where(violation)} "
            f"({', '.join(map(str, violation.get('checks') or []))})"
        )
        body = "\n\n".join(
            part for part in (render_text(events) if events else "", "\n".join(statements)) if part
        )
        console.print(Panel(Text(body), title=Text(title), expand=False))

    for gate in summary.get("gates") or []:
        word = gate_word(gate)
        style = {"passed": "green", "breached": "bold red"}.get(word, "yellow")
        line = Text("gate ")
        line.append(str(gate.get("expr", "?")), style="bold")
        line.append(f" on {gate.get('strategy') or '-'}: measured {number(gate.get('value'))} ")
        line.append(word, style=style)
        console.print(line)

    verdict = str(summary.get("verdict", "unknown"))
    line = Text("verdict: ")
    line.append(verdict, style="green" if verdict == "valid" else "bold red")
    line.append(f" (exit code {summary.get('exit_code', '?')})")
    console.print(line)
    for label, path in (paths or {}).items():
        console.print(Text(f"{label}: {path}"))
