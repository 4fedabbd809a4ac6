"""junit.xml: the CLI verdict as CI reads it, a <testsuite> per strategy, a <testcase> per
checker and gate.

    write_junit()     the whole file, written atomically
  inside
    _check_case()     one checker row: passed, <failure>, <error>, or "caught:<checker>"
    _verdict_case()   "caught:violation" (declared unsafe) or "verdict" (nothing checked)
    _gate_case()      "gate:<expr>"
    _testcase(), _mark(), _append_out(), _check_body(), _count()   the XML pieces

For a strategy declared safe (expected "valid" or not declared) a checker that found
violations is a <failure>, one that could not decide an <error> (CI must not show "unknown"
as passed, and <skipped> reads as passed in most tools). For a strategy declared unsafe
(expected "violated", e.g. `naive`, kept to prove the harness can see the bug) a checker that
found violations is the passing case "caught:<checker>", and "caught:violation" fails when no
checker caught anything: a run that could not provoke the known race proves nothing about the
fix. A declared-safe strategy with no checker results gets one "verdict" case (an <error>
unless its verdict is valid), so a run that checked nothing is never green. Gates are
"gate:<expr>" cases in their strategy's suite (or "payrace.gates"); a gate with no measured
value is an <error>. The first violating schedule (with a deadlock's statements) goes to the
suite's <system-out> and to the cases of the checkers that saw it.

Used by reports.writers (write_all).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from payrace.harness.reports.summary import (
    checks_of,
    compact,
    deadlock_lines,
    gate_figures,
    gate_word,
    number,
    outcome,
    strategies_of,
    violation_events,
    where,
    write_atomically,
)
from payrace.harness.reports.timeline import render_text


def _testcase(suite: ET.Element, classname: str, name: str) -> ET.Element:
    return ET.SubElement(suite, "testcase", classname=classname, name=name, time="0")


def _mark(case: ET.Element, tag: str, message: str, body: str = "") -> None:
    element = ET.SubElement(case, tag, message=message, type=tag)
    element.text = body


def _check_body(check: Mapping[str, Any]) -> str:
    lines = [f"{key}: {compact(check.get(key), 2000)}" for key in ("first", "worst", "last")]
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
        first = compact(check.get("first"), 200)
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
    word = gate_word(gate)
    if word == "not measured":
        _mark(case, "error", f"gate {expr}: not measured; {gate_figures(gate)}")
    elif word != "passed":
        _mark(case, "failure", f"gate {expr}: breached, {gate_figures(gate)}")


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
    for name, strategy in strategies_of(summary).items():
        classname = f"payrace.{name}"
        suite = ET.SubElement(
            root,
            "testsuite",
            name=classname,
            timestamp=str(summary.get("started_at", "")),
            hostname=hostname,
            time=number(float(strategy.get("duration_s") or 0.0)),
        )
        suites[name] = suite
        unsafe = strategy.get("expected") == "violated"
        events = violation_events(strategy)
        violation = strategy.get("first_violation") or {}
        drawn = [render_text(events) if events else "", "\n".join(deadlock_lines(violation))]
        timeline = "\n\n".join(part for part in drawn if part)
        shown_in = set(violation.get("checks") or [])
        checks = checks_of(strategy)
        if unsafe:
            _verdict_case(suite, classname, "caught:violation", strategy)
        elif not checks:
            _verdict_case(suite, classname, "verdict", strategy)  # nothing checked is no pass
        for check_name, check in checks.items():
            case = _check_case(suite, classname, check_name, check, unsafe)
            if timeline and check_name in shown_in:
                _append_out(case, f"first violating schedule:\n{timeline}")
        if timeline:
            header = f"first violation: {where(violation)}\n"
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
    write_atomically(path, '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n")
