"""junit.xml: the run's verdict as CI reads it, a <testsuite> per strategy, a <testcase> per
checker and gate; red exactly when the exit code is not 0.

    write_junit()     the whole file, written atomically
  inside
    _check_case()     one checker row: passed, <failure> or <error>, its message in words
    _verdict_case()   "verdict": a strategy whose verdict no checker row shows (nothing
                      checked, trial errors, not as declared)
    _gate_case()      "gate:<expr>"
    _run_case()       "payrace/verdict": the run's own outcome when no other case says why
                      the exit code is not 0 (an explorer that cannot be trusted, a setup
                      mistake, a scenario's expectation)
    _testcase(), _mark(), _append_out(), _check_body(), _count()   the XML pieces

How a case is judged follows the run (model.verdict.RunOutcome, stamped in the summary):
`run`, `load` and `explore` judge invariants, so a checker that found violations is a
<failure> (also for `naive`, declared unsafe: its exit code is 1), one that could not decide
an <error> (CI must not show "unknown" as passed; <skipped> reads as passed in most tools).
`race` judges every strategy against its declaration: a strategy found as declared has only
passing cases (naive's double captures, said in <system-out>, are what it is there for), one
that is not has its failures and errors as above, or a failing "verdict" case. Messages name
the checker, the count and the first example in words (reports.words). Each case takes its
strategy's measured duration (the checkers share it). The first violating schedule (with a
deadlock's statements) goes to the suite's <system-out> and to the cases of its checkers.

Used by reports.writers (write_all).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from payrace.harness.model.verdict import EXIT_VIOLATED, RunOutcome
from payrace.harness.reports.summary import (
    checks_of,
    deadlock_lines,
    excused,
    gate_figures,
    gate_word,
    number,
    outcome,
    strategies_of,
    valid_word,
    violation_events,
    where,
    write_atomically,
)
from payrace.harness.reports.timeline import render_text
from payrace.harness.reports.words import check_message, in_words


def _testcase(suite: ET.Element, classname: str, name: str, seconds: float) -> ET.Element:
    return ET.SubElement(suite, "testcase", classname=classname, name=name, time=_time(seconds))


def _time(seconds: float) -> str:
    return f"{max(seconds, 0.0):.3f}"


def _mark(case: ET.Element, tag: str, message: str, body: str = "") -> None:
    element = ET.SubElement(case, tag, message=message, type=tag)
    element.text = body


def _check_body(name: str, check: Mapping[str, Any]) -> str:
    lines = [
        f"{key}: {in_words(name, check.get(key))}"
        for key in ("first", "worst", "last")
        if check.get(key) is not None
    ]
    if check.get("note"):
        lines.append(f"note: {check['note']}")
    return "\n".join(lines)


def _check_case(
    suite: ET.Element,
    classname: str,
    name: str,
    check: Mapping[str, Any],
    as_declared: bool,
    seconds: float,
) -> ET.Element:
    valid = check.get("valid", "unknown")
    case = _testcase(suite, classname, name, seconds)
    message = check_message(name, check)
    if valid is True:
        return case
    if as_declared:  # found what the strategy is declared to be: said, not failed
        _append_out(
            case, f"{valid_word(valid)}, as declared: {message}\n{_check_body(name, check)}"
        )
    elif valid is False:
        _mark(case, "failure", message, _check_body(name, check))
    else:
        _mark(case, "error", message, _check_body(name, check))
    return case


def _verdict_case(
    suite: ET.Element, classname: str, strategy: Mapping[str, Any], seconds: float
) -> None:
    result = outcome(strategy)
    case = _testcase(suite, classname, "verdict", seconds)
    said = f"{result.label} ({number(strategy.get('trials', 0))} trials)"
    trial_errors = strategy.get("trial_errors") or {}
    if trial_errors.get("count"):
        first = (trial_errors.get("first") or ["?"])[0]
        said += f"; {trial_errors['count']} trial(s) failed to run, first: {first}"
    if result.passed is False:
        _mark(case, "failure", said)
    elif result.passed is None:
        _mark(case, "error", said)


def _gate_case(suite: ET.Element, classname: str, gate: Mapping[str, Any], seconds: float) -> None:
    expr = str(gate.get("expr", "?"))
    case = _testcase(suite, classname, f"gate:{expr}", seconds)
    word = gate_word(gate)
    if word == "not measured":
        _mark(case, "error", f"gate {expr}: not measured; {gate_figures(gate)}")
    elif word != "passed":
        _mark(case, "failure", f"gate {expr}: breached, {gate_figures(gate)}")


def _run_case(root: ET.Element, run: RunOutcome, seconds: float) -> None:
    suite = ET.SubElement(root, "testsuite", name="payrace.run", time=_time(seconds))
    case = _testcase(suite, "payrace", "verdict", seconds)
    tag = "failure" if run.exit_code == EXIT_VIOLATED else "error"
    _mark(case, tag, f"{run.line()}: {'; '.join(run.reasons) or 'see summary.json'}")


def _append_out(element: ET.Element, text: str) -> None:
    out = element.find("system-out")
    if out is None:
        out = ET.SubElement(element, "system-out")
    out.text = f"{out.text}\n\n{text}" if out.text else text


def _count(suite: ET.Element, tag: str) -> int:
    return sum(1 for case in suite.iter("testcase") if case.find(tag) is not None)


def _red(suite: ET.Element) -> bool:
    return _count(suite, "failure") + _count(suite, "error") > 0


def write_junit(summary: dict[str, Any], path: Path) -> None:
    run = RunOutcome.of(summary)
    root = ET.Element("testsuites", name=f"payrace {summary.get('run_id', '')}".strip())
    gates = list(summary.get("gates") or [])
    hostname = str((summary.get("machine") or {}).get("hostname", ""))
    suites: dict[str, ET.Element] = {}
    seconds_of: dict[str, float] = {}
    for name, strategy in strategies_of(summary).items():
        classname = f"payrace.{name}"
        seconds = float(strategy.get("duration_s") or 0.0)
        seconds_of[name] = seconds
        suite = ET.SubElement(
            root,
            "testsuite",
            name=classname,
            timestamp=str(summary.get("started_at", "")),
            hostname=hostname,
            time=_time(seconds),
        )
        suites[name] = suite
        events = violation_events(strategy)
        violation = strategy.get("first_violation") or {}
        drawn = [render_text(events) if events else "", "\n".join(deadlock_lines(violation))]
        timeline = "\n\n".join(part for part in drawn if part)
        shown_in = set(violation.get("checks") or [])
        for check_name, check in checks_of(strategy).items():
            case = _check_case(suite, classname, check_name, check, excused(strategy), seconds)
            if timeline and check_name in shown_in:
                _append_out(case, f"first violating schedule:\n{timeline}")
        if outcome(strategy).passed is not True and not _red(suite):
            # Nothing checked, trials that failed to run, a race not provoked: never green.
            _verdict_case(suite, classname, strategy, seconds)
        if timeline:
            header = f"first violation: {where(violation)}\n"
            ET.SubElement(suite, "system-out").text = header + timeline
    for gate in gates:
        strategy_name = str(gate.get("strategy") or "")
        if strategy_name not in suites:  # a gate on a strategy that did not run, or the run
            strategy_name = ""
            if "" not in suites:
                suites[""] = ET.SubElement(root, "testsuite", name="payrace.gates")
        seconds = seconds_of.get(strategy_name, 0.0)
        _gate_case(suites[strategy_name], f"payrace.{strategy_name or 'gates'}", gate, seconds)
    if not run.passed and not any(_red(s) for s in root.iter("testsuite")):
        _run_case(root, run, float(summary.get("duration_s") or 0.0))
    for suite in root.iter("testsuite"):
        # system-out must follow the testcases for strict schema readers.
        for out in suite.findall("system-out"):
            suite.remove(out)
            suite.append(out)
        suite.set("tests", str(len(suite.findall("testcase"))))
        suite.set("failures", str(_count(suite, "failure")))
        suite.set("errors", str(_count(suite, "error")))
        suite.set("skipped", "0")
        if suite.get("time") is None:
            suite.set("time", _time(float(summary.get("duration_s") or 0.0)))
    for attr in ("tests", "failures", "errors"):
        root.set(attr, str(sum(int(s.get(attr, "0")) for s in root.iter("testsuite"))))
    root.set("time", _time(float(summary.get("duration_s") or 0.0)))
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode", xml_declaration=False)
    write_atomically(path, '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n")
