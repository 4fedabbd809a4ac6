"""The run on the terminal, with rich: the only reports module that imports it.

    render_console()  the strategies table and the machine line, a checks table, each
                      strategy's deadlocks in a line, the first violating schedule of each
                      strategy in a panel (with a deadlock's statements), gates, the run's
                      verdict and exit code (model.verdict.RunOutcome, read from the summary)
                      with its reasons, the files written; examples in words (reports.words)
    render_reports_line()   "reports: PATH", the last line of a command that wrote reports

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

from payrace.harness.model.verdict import RunOutcome
from payrace.harness.reports.summary import (
    NOT_MEASURED,
    PATH_ORDER,
    check_passed,
    checks_of,
    deadlock_line,
    deadlock_lines,
    excused,
    forced_text,
    gate_figures,
    gate_word,
    latency_of,
    machine_line,
    nemesis_line,
    number,
    outcome,
    stat,
    strategies_of,
    valid_word,
    violation_events,
    where,
)
from payrace.harness.reports.timeline import render_text
from payrace.harness.reports.words import in_words

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
            "/".join(stat(s, k) for k in ("p50", "p99", "max")) if s.get("count") else NOT_MEASURED
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
            stat(latency_of(strategy, "hold", "all"), "p99"),
        )
    console.print(table)
    console.print(Text(machine_line(summary), style="dim"))

    checks = Table(title="checks", title_justify="left")
    for column in ("strategy", "checker", "valid", "count", "checked", "first"):
        checks.add_column(column, justify="right" if column in ("count", "checked") else "left")
    for name, strategy in strategies.items():
        as_declared = excused(strategy)
        for check_name, check in checks_of(strategy).items():
            valid = check.get("valid", "unknown")
            word = valid_word(valid) + (" (as declared)" if as_declared and valid is False else "")
            passed = check_passed(valid, as_declared)
            first = in_words(check_name, check.get("first")) if valid is not True else ""
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
        if faults := nemesis_line(strategy):
            console.print(Text(f"{name}: {faults}", style="cyan"))
        for blind in strategy.get("not_seen") or []:  # what the run could not see
            console.print(Text(f"{name}: not seen: {blind}", style="yellow"))
        if waited := reconciliation_line(strategy.get("reconciliation")):
            console.print(Text(f"{name}: {waited}", style="dim"))

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
            part
            for part in (
                render_text(events, times=violation.get("times")) if events else "",
                "\n".join(statements),
            )
            if part
        )
        console.print(Panel(Text(body), title=Text(title), expand=False))

    for gate in summary.get("gates") or []:
        word = gate_word(gate)
        style = {"passed": "green", "breached": "bold red"}.get(word, "yellow")
        line = Text("gate ")
        line.append(str(gate.get("expr", "?")), style="bold")
        line.append(f" on {gate.get('strategy') or '-'}: {gate_figures(gate)} ")
        line.append(word, style=style)
        console.print(line)

    run = RunOutcome.of(summary)
    for reason in run.reasons:
        console.print(Text(f"  {reason}", style="green" if run.passed else "bold red"))
    line = Text("verdict: ")
    line.append(run.line(), style="green" if run.passed else "bold red")
    console.print(line)
    for label, path in (paths or {}).items():
        console.print(Text(f"{label}: {path}"))


def render_reports_line(console: Console, out_dir: Path) -> None:
    """The last line of every command that writes reports, also with --quiet."""
    console.print(Text(f"reports: {out_dir}"))


def reconciliation_line(waited: dict[str, Any] | None) -> str:
    """What the run waited for before judging (runner.reconcile); empty when nothing was
    pending when the trials ended."""
    if not waited or not waited.get("pending_before"):
        return ""
    before, after = waited["pending_before"], waited["pending_after"]
    return (
        f"reconciliation: {before} payment(s) captured at the gateway but not in the database "
        f"when the trials ended; {before - after} reconciled, {after} left after "
        f"{waited['waited_s']:.1f} s of a {waited['window_s']:g} s window ({waited['how']})"
    )
