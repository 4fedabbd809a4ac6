"""report.html: one self-contained page per run, inline CSS and inline SVG plots.

    build_html()      the page as a string: run header (the run's verdict and exit code as
                      model.verdict.RunOutcome reads them from the summary, with its
                      reasons), overview table, gates, a section per strategy
    write_html()      the page, written atomically
    CSS               the page's rules, svgplot's included
    run_line()        target, mode, trials, seed, webhooks per trial, as one line
  inside
    _strategy_html()  a strategy's section: verdict and checks, the first violating schedule
                      (or the explorer's drawn one), plots, latency table
    _plots_html()     lock wait as histogram + CDF on one scale, hold and request time as
                      CDFs, a series per path (drawn by reports.svgplot)
    _overview_rows(), _gates_html(), _checks_html(), _latency_html(), _violation_html(),
    _explore_html()   the other parts of the page
    _locust_link()    a load run's relative link to Locust's locust.html beside it
    _esc(), _cls(), _table(), _n()   escaping, pass/fail classes, tables, numeric cells

The page is read offline and in CI artefact viewers: no scripts, no external resources, every
plot inline SVG; every string from the summary is escaped, except one:
`explore.timeline_html`, the schedule `payrace explore` drew (harness.explore.findings, escaped
there by payrace.harness.reports.timeline.render_html), embedded as is.

Used by reports.writers (write_all).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from payrace.harness.model.verdict import RunOutcome
from payrace.harness.reports import svgplot
from payrace.harness.reports.summary import (
    PATH_ORDER,
    Summary,
    check_passed,
    checks_of,
    deadlock_line,
    deadlock_lines,
    excused,
    forced_text,
    gate_threshold,
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
    write_atomically,
)
from payrace.harness.reports.timeline import render_html
from payrace.harness.reports.words import in_words

KIND_LABELS = {"lock": "lock wait", "hold": "lock hold", "request": "request time"}

CSS = (
    """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;
 max-width:1180px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:18px 0 6px}
.meta{color:#555;font-size:13px;margin:2px 0}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #d5d5d5;padding:3px 8px;text-align:left;vertical-align:top}
thead th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:12px;word-break:break-all}
.pass{color:#176b2c;font-weight:600} .fail{color:#b3261e;font-weight:600}
.unknown{color:#8a5a00;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:12px}
pre.statements{font-size:12px;white-space:pre-wrap;background:#f7f7f7;padding:6px}
"""
    + svgplot.CSS  # the rules for the classes its markup uses
    + "table.timeline td,table.timeline th{font-family:ui-monospace,Menlo,Consolas,monospace}\n"
    # A request blocked on a lock: its column shaded from the wait to the step that ended it.
    + "table.timeline td.waiting{background:#fff2cc;color:#8a5a00;font-style:italic}\n"
    + "table.timeline td.waited{background:#fff2cc}\n"
)


def _esc(value: object) -> str:
    return escape(str(value), quote=True)


def _cls(passed: bool | None) -> str:
    if passed is None:
        return "unknown"
    return "pass" if passed else "fail"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Cells arrive as HTML (callers escape); a cell starting with '\\x00num' is numeric."""
    out = ["<table><thead><tr>", *(f"<th>{_esc(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>")
        for cell in row:
            if cell.startswith("\x00num"):
                out.append(f'<td class="num">{cell[4:]}</td>')
            else:
                out.append(f"<td>{cell}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _pairs(values: Mapping[str, Any]) -> str:
    """`samples 12, wait_ms (count 3, p99 15.7)`: nested figures as words, never a repr."""
    return ", ".join(
        f"{k} ({_pairs(v)})" if isinstance(v, Mapping) else f"{k} {number(v)}"
        for k, v in values.items()
    )


def _n(value: object, digits: int = 3) -> str:
    return "\x00num" + _esc(number(value, digits))


def _stat(stats: Mapping[str, Any] | None, key: str, digits: int = 3) -> str:
    return "\x00num" + _esc(stat(stats, key, digits))


def _stats_line(stats: Mapping[str, Any] | None) -> str:
    """`count 12, p50 0.4, ... ms`, or "not measured" for a summary of no samples."""
    if not isinstance(stats, Mapping) or not stats.get("count"):
        return "not measured"
    keys = [k for k in ("mean", "p50", "p95", "p99", "max") if k in stats]
    return f"count {number(stats['count'])}, " + ", ".join(f"{k} {stat(stats, k)}" for k in keys)


def _lock_cell(stats: Mapping[str, Any]) -> str:
    if not stats.get("count"):
        return stat(stats, "p50")
    return " / ".join(stat(stats, k) for k in ("p50", "p99", "max"))


def _paths(plots_or_latency: Mapping[str, Any]) -> list[str]:
    names = [p for p in plots_or_latency if p != "all"]
    return sorted(names, key=lambda p: (PATH_ORDER.index(p) if p in PATH_ORDER else 99, p))


def _series(
    by_path: Mapping[str, Any], key: str, counts: Mapping[str, Any]
) -> list[svgplot.Series]:
    out = []
    for i, path in enumerate(_paths(by_path)):
        n = (counts.get(path) or {}).get("count")
        label = f"{path} (n={n})" if n is not None else path
        color = svgplot.PALETTE[i % len(svgplot.PALETTE)]
        out.append(svgplot.Series(label, color, list(by_path[path].get(key) or [])))
    return out


def _plots_html(strategy: Mapping[str, Any]) -> str:
    plots = strategy.get("plots") or {}
    latency = strategy.get("latency_ms") or {}
    order = [k for k in KIND_LABELS if k in plots] + [k for k in plots if k not in KIND_LABELS]
    figures = []
    for kind in order:
        by_path = plots.get(kind) or {}
        if not by_path:
            continue
        label = KIND_LABELS.get(kind, str(kind))
        counts = latency.get(kind) or {}
        cdfs = _series(by_path, "cdf", counts)
        if kind == "lock":
            bars = _series(by_path, "buckets", counts)
            # One scale for both views of a kind: a log histogram beside a linear CDF of
            # the same waits reads as two different distributions.
            span = [v for s in cdfs for v, _ in s.data]
            span += [v for s in bars for b in s.data for v in b[:2]]
            figures.append(svgplot.histogram(f"{label}: histogram", label, bars, span))
            figures.append(svgplot.cdf(f"{label}: CDF", label, cdfs, span))
        else:
            figures.append(svgplot.cdf(f"{label}: CDF", label, cdfs))
    if not figures:
        return '<p class="meta">no latency samples recorded</p>'
    return '<div class="plots">' + "".join(figures) + "</div>"


def _latency_html(strategy: Mapping[str, Any]) -> str:
    latency = strategy.get("latency_ms") or {}
    rows = []
    for kind, by_path in latency.items():
        for path in [*_paths(by_path), *(["all"] if "all" in by_path else [])]:
            s = by_path[path] or {}
            rows.append(
                [
                    _esc(KIND_LABELS.get(kind, kind)),
                    _esc(path),
                    _n(s.get("count") or 0),
                    *(_stat(s, k) for k in ("mean", "p50", "p95", "p99", "max")),
                ]
            )
    if not rows:
        return ""
    head = ["kind", "path", "count", "mean ms", "p50 ms", "p95 ms", "p99 ms", "max ms"]
    return "<h3>Latency</h3>" + _table(head, rows)


def _checks_html(strategy: Mapping[str, Any]) -> str:
    as_declared = excused(strategy)
    rows = []
    for name, check in checks_of(strategy).items():
        valid = check.get("valid", "unknown")
        passed = check_passed(valid, as_declared)
        word = valid_word(valid) + (" (as declared)" if as_declared and valid is False else "")
        examples = "".join(
            f"<div><b>{key}</b> {_esc(in_words(name, check.get(key)))}</div>"
            for key in ("first", "worst")
            if check.get(key) is not None and valid is not True
        )
        rows.append(
            [
                _esc(name),
                f'<span class="{_cls(passed)}">{_esc(word)}</span>',
                _n(check.get("count")),
                _n(check.get("checked")),
                examples,
                _esc(check.get("note") or ""),
            ]
        )
    if not rows:
        return '<p class="meta">no checker ran</p>'
    return _table(["checker", "valid", "count", "checked", "examples", "note"], rows)


def _violation_html(strategy: Mapping[str, Any]) -> str:
    violation = strategy.get("first_violation")
    if not violation:
        return ""
    events = violation_events(strategy)
    schedule = violation.get("schedule_id")  # the explorer's: an id `--replay` reruns
    title = (
        f"First violating schedule: {where(violation)}"
        + (f", schedule {schedule}" if schedule else "")
        + f" ({', '.join(map(str, violation.get('checks') or []))})"
    )
    times = violation.get("times")
    body = (
        render_html(events, times=str(times) if times else None)
        if events
        else '<p class="meta">no timeline recorded</p>'
    )
    statements = deadlock_lines(violation)
    if statements:
        body += f'<pre class="statements">{_esc(chr(10).join(statements))}</pre>'
    replay = violation.get("replay")
    if replay:
        body = f'<p class="meta replay">replay it: <code>{_esc(replay)}</code></p>' + body
    return f"<h3>{_esc(title)}</h3>{body}"


def _explore_html(strategy: Mapping[str, Any]) -> str:
    """The explorer's drawn schedule when no violation is drawn already: one where a request
    waited for the lock (it carries its own heading), or a line saying none did."""
    explore = strategy.get("explore")
    if not isinstance(explore, Mapping) or strategy.get("first_violation"):
        return ""  # a violation is the same schedule _violation_html draws
    fragment = explore.get("timeline_html")
    return fragment if isinstance(fragment, str) else ""


def _strategy_html(name: str, strategy: Mapping[str, Any]) -> str:
    result = outcome(strategy)
    parts = [
        f'<section id="strategy-{_esc(name)}"><h2>{_esc(name)}: '
        f'<span class="{_cls(result.passed)}">{_esc(result.label)}</span></h2>',
        f'<p class="meta">expected {_esc(strategy.get("expected") or "not declared")}; '
        f"{_esc(number(strategy.get('trials')))} trials, "
        f"{_esc(number(strategy.get('violating_trials')))} violating, "
        f"{_esc(number(strategy.get('trials_per_second'), 1))} trials/s, "
        f"{_esc(number(strategy.get('duration_s'), 2))} s</p>",
    ]
    if strategy.get("forced"):
        parts.append(
            f'<p class="meta">forced: {_esc(forced_text(strategy))} (a trial whose barrier or '
            "pause gave up waiting raced unforced)</p>"
        )
    server = strategy.get("server_side")
    if server:
        line = ", ".join(
            f"{k} ({_stats_line(v)})" if isinstance(v, Mapping) else f"{k} {number(v)}"
            for k, v in server.items()
        )
        parts.append(f'<p class="meta">seen in pg_stat_activity / pg_locks: {_esc(line)}</p>')
    spread = strategy.get("arrival_spread_ms")
    if isinstance(spread, Mapping):
        line = _stats_line(spread)
        parts.append(
            f'<p class="meta">arrival spread (server receive times within a trial, ms): '
            f"{_esc(line)}</p>"
        )
    if line := deadlock_line(strategy):
        parts.append(f'<p class="fail">{_esc(line)}</p>')
    if line := nemesis_line(strategy):
        parts.append(f'<p class="meta">{_esc(line)} (each one an operation in history.jsonl)</p>')
    parts += [
        "<h3>Verdict</h3>",
        _checks_html(strategy),
        _violation_html(strategy),
        _explore_html(strategy),
        "<h3>Plots</h3>",
        _plots_html(strategy),
        _latency_html(strategy),
        "</section>",
    ]
    return "".join(parts)


def _overview_rows(summary: Summary) -> list[list[str]]:
    rows = []
    for name, strategy in strategies_of(summary).items():
        result = outcome(strategy)
        lock = [_lock_cell(latency_of(strategy, "lock", p)) for p in PATH_ORDER]
        rows.append(
            [
                f'<a href="#strategy-{_esc(name)}">{_esc(name)}</a>',
                _esc(strategy.get("expected") or "-"),
                f'<span class="{_cls(result.passed)}">{_esc(result.label)}</span>',
                _n(strategy.get("trials")),
                _n(strategy.get("violating_trials")),
                _n(strategy.get("trials_per_second"), 1),
                "\x00num" + _esc(forced_text(strategy)),
                "\x00num" + _esc(lock[0]),
                "\x00num" + _esc(lock[1]),
                _stat(latency_of(strategy, "hold", "all"), "p99"),
            ]
        )
    return rows


def _gates_html(summary: Summary) -> str:
    gates = list(summary.get("gates") or [])
    if not gates:
        return '<p class="meta">no gates set</p>'
    rows = [
        [
            f"<code>{_esc(g.get('expr'))}</code>",
            _esc(g.get("strategy") or "-"),
            _n(g.get("value")),
            _esc(gate_threshold(g) if "threshold" in g else "-"),
            f'<span class="{_cls(g.get("passed") if gate_word(g) != "not measured" else None)}">'
            f"{_esc(gate_word(g))}</span>",
        ]
        for g in gates
    ]
    return _table(["gate", "strategy", "measured", "threshold", "result"], rows)


def _locust_link(summary: Summary) -> str:
    """A load run's link to Locust's own report beside this one (relative, same directory:
    the page stays self-contained and the pair survives being moved as a CI artefact)."""
    name = (summary.get("locust") or {}).get("html")
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or ":" in name:
        return ""
    return (
        f'<p class="meta" id="locust-report">Locust\'s report (requests, response times, '
        f'failures): <a href="{_esc(name)}">{_esc(name)}</a></p>'
    )


def run_line(summary: Summary) -> str:
    keys = ("target", "mode", "trials", "seed", "webhooks_per_trial")
    return ", ".join(f"{k} {summary[k]}" for k in keys if summary.get(k) is not None)


def build_html(summary: Summary) -> str:
    run = RunOutcome.of(summary)
    passed = True if run.passed else (None if run.verdict == "unknown" else False)
    head = ["strategy", "expected", "verdict", "trials", "violating", "trials/s", "forced"]
    head += ["lock client p50/p99/max ms", "lock webhook p50/p99/max ms", "hold p99 ms"]
    strategies = strategies_of(summary)
    body = [
        f"<h1>payrace {_esc(summary.get('run_id', ''))}: "
        f'<span class="{_cls(passed)}">{_esc(run.line())}</span></h1>',
        *(f'<p class="{_cls(passed)}">{_esc(reason)}</p>' for reason in run.reasons),
        f'<p class="meta"><code>{_esc(summary.get("command", ""))}</code></p>',
        f'<p class="meta">started {_esc(summary.get("started_at", "?"))}, '
        f"{_esc(number(summary.get('duration_s'), 2))} s; {_esc(run_line(summary))}</p>",
        f'<p class="meta">{_esc(machine_line(summary))}</p>',
        _locust_link(summary),
        "<h2>Overview</h2>",
        _table(head, _overview_rows(summary)) if strategies else "<p>no strategies ran</p>",
        "<h2>Gates</h2>",
        _gates_html(summary),
        *(_strategy_html(name, s) for name, s in strategies.items()),
    ]
    title = f"payrace {summary.get('run_id', '')}: {run.line()}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def write_html(summary: dict[str, Any], path: Path) -> None:
    write_atomically(path, build_html(summary))
