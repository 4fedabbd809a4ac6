"""What a run's summary says, read the same way by every report, and summary.json itself.

    Summary           the summary as the writers read it (shape: docs/contracts.md)
    outcome()         (strategy summary) -> Outcome: its verdict as the run judged it
    excused()         found as declared in a run judged against declarations (race)
    check_passed()    the same for one checker row; the console, JUnit and HTML all use these,
                      so they never disagree
    valid_word(), gate_word()   a checker's validity, a gate's result, as a word
    gate_figures(), gate_threshold()   a gate's measured value and the threshold it
                      resolved to, and from what
    strategies_of(), checks_of(), latency_of(), violation_events(), where()
                      the parts of a summary a writer picks out, with the summary's defaults
    deadlock_lines()  the first violation's deadlocks: each backend, the lock it waited for,
                      its fate and its statement, and the replies that named 40P01
    deadlock_line()   a strategy's deadlocks in one line: counted, tied to trials, not, why
    nemesis_line()    a strategy's faults in one line: what each injected, restarted, killed
    number(), compact(), machine_line()   values and the run's machine as text
    NOT_MEASURED, stat()   a statistic of no samples reads "not measured", never 0 or "-"
    forced_text()     how many trials forced mode forced, and by what ("-" in other modes)
    write_atomically()   a file a reader never sees half-written (every writer uses it), with
                      the permissions open() would give it (umask respected)
    write_json()      summary.json, strict JSON (no NaN)

Used by reports.junit, reports.html and reports.console; reports.writers puts summary.json
beside the other files. Nothing here imports rich, so what the Locust gate loads stays light.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from payrace.harness.reports.timeline import TimelineEvent

Summary = Mapping[str, Any]

PATH_ORDER = ("client", "webhook")


# ---------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Outcome:
    label: str  # what a reader sees: "valid", "violated, as declared", "VIOLATED", ...
    passed: bool | None  # None: could not be decided; never shown as passed


def outcome(strategy: Mapping[str, Any]) -> Outcome:
    """One strategy's verdict as the run judged it (model.verdict.RunOutcome.judged): a
    strategy carrying `as_declared` (race, an explore scenario) passes when it is what it is
    declared to be; otherwise (run, load, explore) only a valid one passes, so a violation
    of a strategy declared unsafe is red like the exit code it sets."""
    valid = strategy.get("valid", "unknown")
    expected = strategy.get("expected")
    unsafe = expected == "violated"
    if "as_declared" in strategy:
        if strategy["as_declared"] is True:
            return Outcome(f"{valid_word(valid)}, as declared", True)
        return Outcome(f"{valid_word(valid).upper()}, declared {expected or 'nothing'}", False)
    if valid is False:
        return Outcome("violated, as declared" if unsafe else "VIOLATED", False)
    if valid is True:
        if unsafe:
            return Outcome("valid, but declared unsafe: race not provoked", True)
        return Outcome("valid", True)
    return Outcome("unknown", None)


def excused(strategy: Mapping[str, Any]) -> bool:
    """Judged against its declaration and found as declared: its checker rows are not red
    (naive's double captures in `payrace race` are the catch it is there for)."""
    return strategy.get("as_declared") is True


def check_passed(valid: object, excused: bool = False) -> bool | None:
    """A checker row as CI reads it; the console, JUnit and HTML all use this and
    outcome(), so they never disagree."""
    if valid is True or (valid is False and excused):
        return True
    if valid is False:
        return False
    return None


def valid_word(valid: object) -> str:
    if valid is True:
        return "valid"
    return "violated" if valid is False else "unknown"


def gate_word(gate: Mapping[str, Any]) -> str:
    # "threshold" is None when a relative gate's reference was not measured (model.gates).
    if gate.get("value") is None or ("threshold" in gate and gate["threshold"] is None):
        return "not measured"
    return "passed" if gate.get("passed") is True else "breached"


def gate_threshold(gate: Mapping[str, Any]) -> str:
    """'15 = 3 * hold_p99_ms (5)': the threshold a gate resolved to, and from what."""
    text = number(gate.get("threshold"))
    basis = str(gate.get("threshold_from") or "")
    return f"{text} = {basis}" if basis and basis != text else text


def gate_figures(gate: Mapping[str, Any]) -> str:
    """'measured 12.3, threshold 15 = 3 * hold_p99_ms (5)': what the gate compared."""
    text = f"measured {number(gate.get('value'))}"
    if "threshold" in gate:  # summaries from before relative gates have no threshold
        text += f", threshold {gate_threshold(gate)}"
    if gate.get("error"):
        text += f" ({gate['error']})"
    return text


# ---------------------------------------------------------------------------- reading


def strategies_of(summary: Summary) -> dict[str, Mapping[str, Any]]:
    return dict(summary.get("strategies") or {})


def checks_of(strategy: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return dict(strategy.get("checks") or {})


def latency_of(strategy: Mapping[str, Any], kind: str, path: str) -> Mapping[str, Any]:
    return ((strategy.get("latency_ms") or {}).get(kind) or {}).get(path) or {}


def violation_events(strategy: Mapping[str, Any]) -> list[TimelineEvent]:
    violation = strategy.get("first_violation") or {}
    return [
        TimelineEvent(int(e.get("time_ns", 0)), str(e.get("process", "?")), str(e.get("text", "")))
        for e in violation.get("timeline") or []
    ]


_FATE = {"aborted": "rolled back by PostgreSQL", "committed": "went on and committed"}


def deadlock_lines(violation: Mapping[str, Any]) -> list[str]:
    """The statements of the first violation's deadlocks, as PostgreSQL's backends ran them."""
    found = violation.get("deadlocks") or {}
    lines: list[str] = []
    for cycle in found.get("cycles") or []:
        lines.append(f"deadlock seen at {cycle.get('seen_at', '?')}:")
        for m in cycle.get("members") or []:
            blockers = ", ".join(str(b) for b in m.get("blocked_by") or []) or "?"
            fate = _FATE.get(str(m.get("status")), "fate unknown")
            lines.append(
                f"  backend {m.get('pid')} (xid {m.get('xid')}, {fate}) waits for "
                f"{m.get('waits_for')} held by backend {blockers}:"
            )
            lines.append(f"    {m.get('query') or '(statement not seen)'}")
    for reply in found.get("replies") or []:
        lines.append(
            f"reply #{reply.get('index')} to {reply.get('f')} ({reply.get('process')}), "
            f"HTTP {reply.get('status')}: {reply.get('said')}"
        )
    return lines


def nemesis_line(strategy: Mapping[str, Any]) -> str:
    """ "" without a nemesis; else the faults and what each did, in one line (the
    history's `nemesis` operations have every one of them)."""
    n = strategy.get("nemesis") or {}
    if not n:
        return ""
    said = [
        f"{n[key]} {label}"
        for key, label in (
            ("gateway_errors_injected", "gateway errors"),
            ("gateway_timeouts_injected", "gateway timeouts"),
            ("backends_killed", "backends killed"),
            ("captures_killed_before_commit", "captures whose transaction was killed"),
            ("webhooks_redelivered", "webhooks redelivered"),
        )
        if n.get(key)
    ]
    for fault, done in (n.get("restarts") or {}).items():
        said.append(f"{fault} {done.get('count', 0)} time(s), down at most "
                    f"{number(done.get('down_s_max'), 2)} s")  # fmt: skip
    if n.get("timeouts"):
        said.append(", ".join(f"{k} {v} ms" for k, v in n["timeouts"].items()))
    faults = ", ".join(n.get("faults") or [])
    return f"nemesis {faults}: " + ("; ".join(said) or "nothing injected")


def deadlock_line(strategy: Mapping[str, Any]) -> str:
    """ "" when the run saw no deadlock; else how many, how many tied to trials, and why the
    others could not be."""
    d = strategy.get("deadlocks") or {}
    counted, attributed = d.get("counted") or 0, d.get("attributed") or 0
    unattributed = d.get("unattributed") or 0
    if not (counted or attributed or unattributed):
        return ""
    line = (
        f"deadlocks: {counted} counted by PostgreSQL"
        + ("" if d.get("settled", True) else " (reading not settled)")
        + f", {attributed} tied to {len(d.get('payments') or [])} trial(s)"
    )
    if unattributed:
        line += f", {unattributed} could not be tied to a trial: {d.get('why_unattributed')}"
    return line


def where(violation: Mapping[str, Any]) -> str:
    """`trial 3, payment 17`; a load run has payments, not numbered trials: `payment 17`."""
    trial = violation.get("trial")
    payment = f"payment {violation.get('payment')}"
    return payment if trial is None else f"trial {trial}, {payment}"


# ---------------------------------------------------------------------------- as text


def number(value: object, digits: int = 3) -> str:
    if value is None or isinstance(value, bool):
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if math.isfinite(value) else "-"
    return str(value)


NOT_MEASURED = "not measured"


def stat(stats: Mapping[str, Any] | None, key: str, digits: int = 3) -> str:
    """`stats[key]` of a {"count", "p50", ...} summary as text; "not measured" when it has
    no samples (count 0, absent, or the value null): an empty histogram's 0 would read as
    perfect alignment or no wait at all."""
    if not stats or not stats.get("count") or stats.get(key) is None:
        return NOT_MEASURED
    return number(stats[key], digits)


def compact(value: object, limit: int = 300) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def forced_text(strategy: Mapping[str, Any]) -> str:
    """`198/200 by locks, 2 timeouts`: trials forced of those run, by which forcing."""
    forced = strategy.get("forced")
    if not isinstance(forced, Mapping):
        return "-"
    text = f"{number(forced.get('forced'))}/{number(forced.get('trials'))} by {forced.get('by')}"
    timeouts = forced.get("timeouts") or 0
    return text + (f", {number(timeouts)} timeout{'s' * (timeouts != 1)}" if timeouts else "")


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


# ---------------------------------------------------------------------------- files


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it and set it back
    os.umask(mask)
    return mask


def write_atomically(path: Path, text: str) -> None:
    # A CI job or a browser may read the file while a run rewrites it; never show half.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp makes the file 0600; a report is as readable as history.jsonl beside it
        # (0644 under the usual umask), e.g. for a CI artefact uploader running as another user.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return to_json()
    raise TypeError(f"summary.json cannot hold {type(value).__name__}: {value!r}")


def write_json(summary: dict[str, Any], path: Path) -> None:
    # allow_nan=False: NaN is not JSON, and a consumer choking on it later is worse.
    text = json.dumps(summary, indent=2, allow_nan=False, default=_json_default)
    write_atomically(path, text + "\n")
