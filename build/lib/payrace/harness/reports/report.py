"""What a run shows and writes: the same summary.json, four ways.

    outcome()         (strategy summary) -> Outcome: the verdict against what was declared;
    check_passed()    the same for one checker row; every renderer uses these two, so the
                      console, JUnit and HTML never disagree
    write_json()      summary.json, strict JSON (no NaN), written atomically
    write_junit()     junit.xml: a <testsuite> per strategy, a <testcase> per checker and gate
    write_html()      report.html: one self-contained file, inline CSS and inline SVG plots
      build_html()      the page as a string
      _plots_html()     per strategy: lock wait as histogram + CDF on one scale, hold and
                        request time as CDFs, a series per path (drawn by harness.reports.svgplot)
    render_console()  rich tables, the first violating schedule in a panel, gates, file paths
    write_all()       summary.json + junit.xml + report.html into a run directory

JUnit mirrors the CLI verdict. For a strategy declared safe (expected "valid" or not
declared) a checker that found violations is a <failure>, one that could not decide an
<error> (CI must not show "unknown" as passed, and <skipped> reads as passed in most
tools). For a strategy declared unsafe (expected "violated", e.g. `naive`, kept to prove
the harness can see the bug) a checker that found violations is the passing case
"caught:<checker>", and "caught:violation" fails when no checker caught anything: a run
that could not provoke the known race proves nothing about the fix. A declared-safe
strategy with no checker results gets one "verdict" case (an <error> unless its verdict
is valid), so a run that checked nothing is never green. Gates are "gate:<expr>" cases in
their strategy's suite (or "payrace.gates"); a gate with no measured value is an <error>.

The HTML is read offline and in CI artefact viewers: no scripts, no external resources,
every plot inline SVG (reports.svgplot); every string from the summary is escaped, except one:
`explore.timeline_html`, the schedule `payrace explore` drew (harness.explore.findings, escaped
there by payrace.harness.reports.timeline.render_html), embedded as is.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from payrace.harness.reports import svgplot
from payrace.harness.reports.timeline import TimelineEvent, render_html, render_text

Summary = Mapping[str, Any]

KIND_LABELS = {"lock": "lock wait", "hold": "lock hold", "request": "request time"}
PATH_ORDER = ("client", "webhook")


# ---------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Outcome:
    label: str  # what a reader sees: "valid", "violated, as declared", "VIOLATED", ...
    passed: bool | None  # None: could not be decided; never shown as passed


def outcome(strategy: Mapping[str, Any]) -> Outcome:
    valid = strategy.get("valid", "unknown")
    unsafe = strategy.get("expected") == "violated"
    if valid is False:
        return Outcome("violated, as declared", True) if unsafe else Outcome("VIOLATED", False)
    if valid is True:
        if unsafe:
            return Outcome("valid, but declared unsafe: race not provoked", False)
        return Outcome("valid", True)
    return Outcome("unknown", None)


def check_passed(valid: object, unsafe: bool) -> bool | None:
    """A checker row as CI reads it: for a declared-unsafe strategy a found violation is
    a catch (passed), and an invariant it happened not to break is fine too."""
    if valid is True:
        return True
    if valid is False:
        return unsafe
    return None


def _valid_word(valid: object) -> str:
    if valid is True:
        return "valid"
    return "violated" if valid is False else "unknown"


def _strategies(summary: Summary) -> dict[str, Mapping[str, Any]]:
    return dict(summary.get("strategies") or {})


def _checks(strategy: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return dict(strategy.get("checks") or {})


def _timeline(strategy: Mapping[str, Any]) -> list[TimelineEvent]:
    violation = strategy.get("first_violation") or {}
    return [
        TimelineEvent(int(e.get("time_ns", 0)), str(e.get("process", "?")), str(e.get("text", "")))
        for e in violation.get("timeline") or []
    ]


def _num(value: object, digits: int = 3) -> str:
    if value is None or isinstance(value, bool):
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if math.isfinite(value) else "-"
    return str(value)


def _latency(strategy: Mapping[str, Any], kind: str, path: str) -> Mapping[str, Any]:
    return ((strategy.get("latency_ms") or {}).get(kind) or {}).get(path) or {}


def _compact(value: object, limit: int = 300) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------- JSON


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return to_json()
    raise TypeError(f"summary.json cannot hold {type(value).__name__}: {value!r}")


def _write_atomically(path: Path, text: str) -> None:
    # A CI job or a browser may read the file while a run rewrites it; never show half.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(summary: dict[str, Any], path: Path) -> None:
    # allow_nan=False: NaN is not JSON, and a consumer choking on it later is worse.
    text = json.dumps(summary, indent=2, allow_nan=False, default=_json_default)
    _write_atomically(path, text + "\n")


# ---------------------------------------------------------------------------- JUnit


def _testcase(suite: ET.Element, classname: str, name: str) -> ET.Element:
    return ET.SubElement(suite, "testcase", classname=classname, name=name, time="0")


def _mark(case: ET.Element, tag: str, message: str, body: str = "") -> None:
    element = ET.SubElement(case, tag, message=message, type=tag)
    element.text = body


def _check_body(check: Mapping[str, Any]) -> str:
    lines = [f"{key}: {_compact(check.get(key), 2000)}" for key in ("first", "worst", "last")]
    if check.get("note"):
        lines.append(f"note: {check['note']}")
    return "\n".join(lines)


def _check_case(
    suite: ET.Element, classname: str, name: str, check: Mapping[str, Any], unsafe: bool
) -> ET.Element:
    valid = check.get("valid", "unknown")
    counted = f"{check.get('count', '?')} of {check.get('checked', '?')} checked"
    if valid is False and unsafe:
        case = _testcase(suite, classname, f"caught:{name}")
        _append_out(case, f"caught as declared: {counted}\n{_check_body(check)}")
    elif valid is False:
        case = _testcase(suite, classname, name)
        first = _compact(check.get("first"), 200)
        _mark(case, "failure", f"{name}: {counted} violated; first: {first}", _check_body(check))
    elif valid is True:
        case = _testcase(suite, classname, name)
    else:
        case = _testcase(suite, classname, name)
        note = check.get("note") or "the checker could not decide"
        _mark(case, "error", f"{name}: unknown: {note}", _check_body(check))
    return case


def _verdict_case(
    suite: ET.Element, classname: str, name: str, strategy: Mapping[str, Any]
) -> None:
    result = outcome(strategy)
    case = _testcase(suite, classname, name)
    if result.passed is False:
        _mark(case, "failure", f"{result.label} ({strategy.get('trials', 0)} trials)")
    elif result.passed is None:
        _mark(case, "error", f"verdict unknown ({strategy.get('trials', 0)} trials)")


def _gate_case(suite: ET.Element, classname: str, gate: Mapping[str, Any]) -> None:
    expr = str(gate.get("expr", "?"))
    case = _testcase(suite, classname, f"gate:{expr}")
    value = gate.get("value")
    if value is None:
        _mark(case, "error", f"gate {expr}: not measured")
    elif gate.get("passed") is not True:
        _mark(case, "failure", f"gate {expr}: breached, measured {_num(value)}")


def _append_out(element: ET.Element, text: str) -> None:
    out = element.find("system-out")
    if out is None:
        out = ET.SubElement(element, "system-out")
    out.text = f"{out.text}\n\n{text}" if out.text else text


def _count(suite: ET.Element, tag: str) -> int:
    return sum(1 for case in suite.iter("testcase") if case.find(tag) is not None)


def write_junit(summary: dict[str, Any], path: Path) -> None:
    root = ET.Element("testsuites", name=f"payrace {summary.get('run_id', '')}".strip())
    gates = list(summary.get("gates") or [])
    hostname = str((summary.get("machine") or {}).get("hostname", ""))
    suites: dict[str, ET.Element] = {}
    for name, strategy in _strategies(summary).items():
        classname = f"payrace.{name}"
        suite = ET.SubElement(
            root,
            "testsuite",
            name=classname,
            timestamp=str(summary.get("started_at", "")),
            hostname=hostname,
            time=_num(float(strategy.get("duration_s") or 0.0)),
        )
        suites[name] = suite
        unsafe = strategy.get("expected") == "violated"
        timeline = render_text(_timeline(strategy)) if _timeline(strategy) else ""
        violation = strategy.get("first_violation") or {}
        shown_in = set(violation.get("checks") or [])
        checks = _checks(strategy)
        if unsafe:
            _verdict_case(suite, classname, "caught:violation", strategy)
        elif not checks:
            _verdict_case(suite, classname, "verdict", strategy)  # nothing checked is no pass
        for check_name, check in checks.items():
            case = _check_case(suite, classname, check_name, check, unsafe)
            if timeline and check_name in shown_in:
                _append_out(case, f"first violating schedule:\n{timeline}")
        if timeline:
            header = f"first violation: {_where(violation)}\n"
            ET.SubElement(suite, "system-out").text = header + timeline
    for gate in gates:
        strategy_name = str(gate.get("strategy") or "")
        if strategy_name not in suites:  # a gate on a strategy that did not run, or the run
            strategy_name = ""
            if "" not in suites:
                suites[""] = ET.SubElement(root, "testsuite", name="payrace.gates")
        _gate_case(suites[strategy_name], f"payrace.{strategy_name or 'gates'}", gate)
    for suite in root.iter("testsuite"):
        # system-out must follow the testcases for strict schema readers.
        for out in suite.findall("system-out"):
            suite.remove(out)
            suite.append(out)
        suite.set("tests", str(len(suite.findall("testcase"))))
        suite.set("failures", str(_count(suite, "failure")))
        suite.set("errors", str(_count(suite, "error")))
        suite.set("skipped", "0")
    for attr in ("tests", "failures", "errors"):
        root.set(attr, str(sum(int(s.get(attr, "0")) for s in root.iter("testsuite"))))
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode", xml_declaration=False)
    _write_atomically(path, '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n")


# ---------------------------------------------------------------------------- HTML

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
"""
    + svgplot.CSS  # the rules for the classes its markup uses
    + "table.timeline td,table.timeline th{font-family:ui-monospace,Menlo,Consolas,monospace}\n"
)


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


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


def _n(value: object, digits: int = 3) -> str:
    return "\x00num" + _esc(_num(value, digits))


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
                    _n(s.get("count")),
                    *(_n(s.get(k)) for k in ("mean", "p50", "p95", "p99", "max")),
                ]
            )
    if not rows:
        return ""
    head = ["kind", "path", "count", "mean ms", "p50 ms", "p95 ms", "p99 ms", "max ms"]
    return "<h3>Latency</h3>" + _table(head, rows)


def _checks_html(strategy: Mapping[str, Any]) -> str:
    unsafe = strategy.get("expected") == "violated"
    rows = []
    for name, check in _checks(strategy).items():
        valid = check.get("valid", "unknown")
        passed = check_passed(valid, unsafe)
        word = _valid_word(valid) + (" (caught)" if unsafe and valid is False else "")
        examples = "".join(
            f"<div><b>{key}</b> <code>{_esc(_compact(check.get(key)))}</code></div>"
            for key in ("first", "worst")
            if check.get(key) is not None
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


def _where(violation: Mapping[str, Any]) -> str:
    """`trial 3, payment 17`; a load run has payments, not numbered trials: `payment 17`."""
    trial = violation.get("trial")
    payment = f"payment {violation.get('payment')}"
    return payment if trial is None else f"trial {trial}, {payment}"


def _violation_html(strategy: Mapping[str, Any]) -> str:
    violation = strategy.get("first_violation")
    if not violation:
        return ""
    events = _timeline(strategy)
    title = (
        f"First violating schedule: {_where(violation)} "
        f"({', '.join(map(str, violation.get('checks') or []))})"
    )
    body = render_html(events) if events else '<p class="meta">no timeline recorded</p>'
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
        f"{_esc(_num(strategy.get('trials')))} trials, "
        f"{_esc(_num(strategy.get('violating_trials')))} violating, "
        f"{_esc(_num(strategy.get('trials_per_second'), 1))} trials/s, "
        f"{_esc(_num(strategy.get('duration_s'), 2))} s</p>",
    ]
    server = strategy.get("server_side")
    if server:
        line = ", ".join(f"{k} {_num(v)}" for k, v in server.items())
        parts.append(f'<p class="meta">seen in pg_stat_activity / pg_locks: {_esc(line)}</p>')
    spread = strategy.get("arrival_spread_ms")
    if spread:
        line = ", ".join(f"{k} {_num(v)}" for k, v in spread.items())
        parts.append(
            f'<p class="meta">arrival spread (server receive times within a trial, ms): '
            f"{_esc(line)}</p>"
        )
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
    for name, strategy in _strategies(summary).items():
        result = outcome(strategy)
        lock = [
            f"{_num(s.get('p50'))} / {_num(s.get('p99'))} / {_num(s.get('max'))}"
            for s in (_latency(strategy, "lock", p) for p in PATH_ORDER)
        ]
        rows.append(
            [
                f'<a href="#strategy-{_esc(name)}">{_esc(name)}</a>',
                _esc(strategy.get("expected") or "-"),
                f'<span class="{_cls(result.passed)}">{_esc(result.label)}</span>',
                _n(strategy.get("trials")),
                _n(strategy.get("violating_trials")),
                _n(strategy.get("trials_per_second"), 1),
                "\x00num" + _esc(lock[0]),
                "\x00num" + _esc(lock[1]),
                _n(_latency(strategy, "hold", "all").get("p99")),
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
            f'<span class="{_cls(g.get("passed") if g.get("value") is not None else None)}">'
            f"{_esc(_gate_word(g))}</span>",
        ]
        for g in gates
    ]
    return _table(["gate", "strategy", "measured", "result"], rows)


def _gate_word(gate: Mapping[str, Any]) -> str:
    if gate.get("value") is None:
        return "not measured"
    return "passed" if gate.get("passed") is True else "breached"


def machine_line(summary: Summary) -> str:
    m = summary.get("machine") or {}
    d = summary.get("database") or {}
    machine = f"{m.get('hostname', '?')}, {m.get('cpus', '?')} CPUs, Python {m.get('python', '?')}"
    if m.get("platform"):
        machine += f", {m['platform']}"
    database = f"PostgreSQL {d.get('server_version', '?')} via {d.get('route', '?')}"
    if d.get("fast"):
        database += " (fsync/synchronous_commit off: durability, not locking, changed)"
    if d.get("describe"):
        database += f" - {d['describe']}"
    return f"machine: {machine}; database: {database}"


def run_line(summary: Summary) -> str:
    keys = ("target", "mode", "trials", "seed", "webhooks_per_trial")
    return ", ".join(f"{k} {summary[k]}" for k in keys if summary.get(k) is not None)


def build_html(summary: Summary) -> str:
    verdict = str(summary.get("verdict", "unknown"))
    passed = {"valid": True}.get(verdict, False if verdict != "unknown" else None)
    head = ["strategy", "expected", "verdict", "trials", "violating", "trials/s"]
    head += ["lock client p50/p99/max ms", "lock webhook p50/p99/max ms", "hold p99 ms"]
    strategies = _strategies(summary)
    body = [
        f"<h1>payrace {_esc(summary.get('run_id', ''))}: "
        f'<span class="{_cls(passed)}">{_esc(verdict)}</span> '
        f'<span class="meta">(exit code {_esc(summary.get("exit_code", "?"))})</span></h1>',
        f'<p class="meta"><code>{_esc(summary.get("command", ""))}</code></p>',
        f'<p class="meta">started {_esc(summary.get("started_at", "?"))}, '
        f"{_esc(_num(summary.get('duration_s'), 2))} s; {_esc(run_line(summary))}</p>",
        f'<p class="meta">{_esc(machine_line(summary))}</p>',
        "<h2>Overview</h2>",
        _table(head, _overview_rows(summary)) if strategies else "<p>no strategies ran</p>",
        "<h2>Gates</h2>",
        _gates_html(summary),
        *(_strategy_html(name, s) for name, s in strategies.items()),
    ]
    title = f"payrace {summary.get('run_id', '')}: {verdict}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def write_html(summary: dict[str, Any], path: Path) -> None:
    _write_atomically(path, build_html(summary))


# ---------------------------------------------------------------------------- console

_STYLE = {True: "green", False: "bold red", None: "yellow"}


def render_console(
    summary: dict[str, Any], console: Console, paths: Mapping[str, Path] | None = None
) -> None:
    strategies = _strategies(summary)
    table = Table(title=f"payrace {summary.get('run_id', '')}", title_justify="left")
    for column in ("strategy", "expected", "verdict"):
        table.add_column(column)
    for column in ("trials", "violating", "trials/s"):
        table.add_column(column, justify="right")
    table.add_column("lock client\np50/p99/max ms", justify="right")
    table.add_column("lock webhook\np50/p99/max ms", justify="right")
    table.add_column("hold p99 ms", justify="right")
    for name, strategy in strategies.items():
        result = outcome(strategy)
        lock = [
            f"{_num(s.get('p50'))}/{_num(s.get('p99'))}/{_num(s.get('max'))}"
            for s in (_latency(strategy, "lock", p) for p in PATH_ORDER)
        ]
        table.add_row(
            Text(name),
            Text(str(strategy.get("expected") or "-")),
            Text(result.label, style=_STYLE[result.passed]),
            _num(strategy.get("trials")),
            _num(strategy.get("violating_trials")),
            _num(strategy.get("trials_per_second"), 1),
            lock[0],
            lock[1],
            _num(_latency(strategy, "hold", "all").get("p99")),
        )
    console.print(table)
    console.print(Text(machine_line(summary), style="dim"))

    checks = Table(title="checks", title_justify="left")
    for column in ("strategy", "checker", "valid", "count", "checked", "first"):
        checks.add_column(column, justify="right" if column in ("count", "checked") else "left")
    for name, strategy in strategies.items():
        unsafe = strategy.get("expected") == "violated"
        for check_name, check in _checks(strategy).items():
            valid = check.get("valid", "unknown")
            word = _valid_word(valid) + (" (caught)" if unsafe and valid is False else "")
            passed = check_passed(valid, unsafe)
            first = _compact(check.get("first"), 80) if check.get("first") is not None else ""
            checks.add_row(
                Text(name),
                Text(check_name),
                Text(word, style=_STYLE[passed]),
                _num(check.get("count")),
                _num(check.get("checked")),
                Text(first, style="dim"),
            )
    if checks.row_count:
        console.print(checks)

    for name, strategy in strategies.items():
        events = _timeline(strategy)
        if not events:
            continue
        violation = strategy.get("first_violation") or {}
        title = (
            f"first violation: {name}, {_where(violation)} "
            f"({', '.join(map(str, violation.get('checks') or []))})"
        )
        console.print(Panel(Text(render_text(events)), title=Text(title), expand=False))

    for gate in summary.get("gates") or []:
        word = _gate_word(gate)
        style = {"passed": "green", "breached": "bold red"}.get(word, "yellow")
        line = Text("gate ")
        line.append(str(gate.get("expr", "?")), style="bold")
        line.append(f" on {gate.get('strategy') or '-'}: measured {_num(gate.get('value'))} ")
        line.append(word, style=style)
        console.print(line)

    verdict = str(summary.get("verdict", "unknown"))
    line = Text("verdict: ")
    line.append(verdict, style="green" if verdict == "valid" else "bold red")
    line.append(f" (exit code {summary.get('exit_code', '?')})")
    console.print(line)
    for label, path in (paths or {}).items():
        console.print(Text(f"{label}: {path}"))


# ---------------------------------------------------------------------------- all

WRITERS: dict[str, tuple[str, Callable[[dict[str, Any], Path], None]]] = {
    "summary": ("summary.json", write_json),
    "junit": ("junit.xml", write_junit),
    "html": ("report.html", write_html),
}


def write_all(summary: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """summary.json, junit.xml and report.html in out_dir (history.jsonl is the runner's)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for key, (filename, writer) in WRITERS.items():
        writer(summary, out_dir / filename)
        written[key] = out_dir / filename
    return written
