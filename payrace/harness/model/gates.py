"""Gates: a run's measured figures held against thresholds, checked before the run starts
and judged after it. Light on purpose: Locust's processes load it (harness.load.gate).

    Gate          `[strategy:]metric OP rhs`, OP one of <= < >= > ==; rhs is
                    a number                      lock_p99_ms<=100
                    K * another metric, same run  lock_p99_ms<=3*hold_p99_ms
                    K * the metric in a baseline  lock_p99_ms<=1.5*baseline
                  either relative form may add a constant: lock_p99_ms<=1.5*baseline+2
        parse()       the expression -> Gate; a UsageError names the fix (closest metric)
        judge()       one strategy's result -> the gate's record in summary.json
    METRICS       every metric a gate can name
    measure()     one metric of one strategy's result; None when the run did not measure it
    Baseline      a previous run's summary.json, or the trimmed file --write-baseline writes
    check_gates() before anything starts: every prefix names a strategy of the run, every
                  baseline gate has a baseline that measured its metric in the same mode
    judge_gates() every gate against every strategy it applies to
    write_baseline()  the trimmed baseline of a run whose every invariant held

A gate whose metric (or the metric its threshold is taken from) was not measured is an error
of the gate, never a pass: its record has value or threshold None and `passed: false`, and
model.verdict.overall() makes the run "unknown".

Why relative gates: an absolute `lock_p99_ms<=100` measured 210 ms on a busy 2-core runner,
where every wait and every hold grows together. `lock_p99_ms<=3*hold_p99_ms` compares lock
wait with the hold time it queues behind, measured on the same machine in the same second;
`<=1.5*baseline` compares with the same figure of an earlier run taken on the same runner class.
"""

from __future__ import annotations

import difflib
import json
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from payrace.harness.errors import UsageError

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "<": operator.lt,
    ">": operator.gt,
}
_NUMBER = r"\d+(?:\.\d+)?"
# Strategy names are the reference flows or a profile's [target].name ("flask-shop", ...).
_GATE = re.compile(r"^\s*(?:(?P<strategy>[A-Za-z0-9_.-]+)\s*:)?\s*(?P<metric>[A-Za-z0-9_]+)\s*"
                   r"(?P<op><=|>=|==|<|>)\s*(?P<rhs>.*?)\s*$")  # fmt: skip
_ABSOLUTE = re.compile(rf"^-?{_NUMBER}$")
_RELATIVE = re.compile(
    rf"^(?:(?P<factor>{_NUMBER})\s*\*\s*)?(?P<ref>[A-Za-z0-9_]+)(?:\s*\+\s*(?P<offset>{_NUMBER}))?$"
)
_LATENCY_METRIC = re.compile(
    r"^(?P<kind>lock|hold|request)(?:_(?P<path>client|webhook))?_(?P<stat>p50|p95|p99|max|mean)_ms$"
)
BASELINE = "baseline"
METRICS: tuple[str, ...] = (
    "violations",
    "trials_per_second",
    *(
        f"{kind}{path}_{stat}_ms"
        for kind in ("lock", "hold", "request")
        for path in ("", "_client", "_webhook")
        for stat in ("p50", "p95", "p99", "max", "mean")
    ),
)
_FORM = (
    "[strategy:]metric<=threshold, the threshold a number, K*other_metric or K*baseline, "
    "e.g. 'lock_p99_ms<=100', 'lock_p99_ms<=3*hold_p99_ms' or "
    "'for_update:lock_p99_ms<=1.5*baseline'"
)


def _closest(word: str, choices: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def _metric_or_fail(expr: str, metric: str) -> None:
    if metric in METRICS:
        return
    close = _closest(metric, METRICS)
    hint = f"did you mean {close!r}? " if close else ""
    raise UsageError(
        f"gate {expr!r}: unknown metric {metric!r}; {hint}use violations, trials_per_second "
        "or {lock|hold|request}[_client|_webhook]_{p50|p95|p99|max|mean}_ms"
    )


def measure(result: Mapping[str, Any], metric: str) -> float | None:
    """One metric of a strategy's result (summary.json's strategies.<name>); None when the run
    did not measure it (a latency nothing reported, a summary without the field)."""
    if metric == "violations":
        if "violating_trials" not in result:
            return None
        # Deadlocks the server counted but no trial could be tied to are violations too.
        unattributed = (result.get("deadlocks") or {}).get("unattributed") or 0
        return float(result["violating_trials"]) + float(unattributed)
    if metric == "trials_per_second":
        value = result.get("trials_per_second")
        return None if value is None else float(value)
    m = _LATENCY_METRIC.match(metric)
    if m is None:
        return None
    stats = ((result.get("latency_ms") or {}).get(m["kind"]) or {}).get(m["path"] or "all") or {}
    # An empty histogram reports zeros: a p99 of 0 that nobody measured must not pass a gate.
    if stats.get(m["stat"]) is None or stats.get("count", 1) == 0:
        return None
    return float(stats[m["stat"]])


def _n(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Gate:
    """One gate. `value` is the number of an absolute gate and the factor K of a relative one;
    `ref` names what K multiplies (another metric, or BASELINE), `offset` what is added."""

    expr: str
    strategy: str | None
    metric: str
    op: str
    value: float
    ref: str | None = None
    offset: float = 0.0

    @classmethod
    def parse(cls, expr: str) -> Gate:
        m = _GATE.match(expr)
        if not m or not m["rhs"]:
            raise UsageError(f"gate {expr!r} is not of the form {_FORM}")
        metric, rhs = m["metric"], m["rhs"]
        _metric_or_fail(expr, metric)
        if _ABSOLUTE.match(rhs):
            return cls(expr, m["strategy"], metric, m["op"], float(rhs))
        rel = _RELATIVE.match(rhs)
        if rel is None:
            raise UsageError(f"gate {expr!r}: threshold {rhs!r} is not of the form {_FORM}")
        ref = rel["ref"]
        if ref != BASELINE:
            _metric_or_fail(expr, ref)
            if ref == metric:
                raise UsageError(
                    f"gate {expr!r} compares {metric} with itself; to compare it with an "
                    f"earlier run write '{metric}{m['op']}{rel['factor'] or 1}*baseline' and "
                    "give --baseline FILE"
                )
        factor = float(rel["factor"]) if rel["factor"] else 1.0
        offset = float(rel["offset"]) if rel["offset"] else 0.0
        return cls(expr, m["strategy"], metric, m["op"], factor, ref, offset)

    @property
    def against_baseline(self) -> bool:
        return self.ref == BASELINE

    def measure(self, result: Mapping[str, Any]) -> float | None:
        return measure(result, self.metric)

    def applies_to(self, strategy: str) -> bool:
        return self.strategy in (None, strategy)

    def judge(
        self, strategy: str, result: Mapping[str, Any], baseline: Baseline | None = None
    ) -> dict[str, Any]:
        """The record summary.json, JUnit, HTML and the console show: the expression, the
        threshold it resolved to and where from, the measured value, passed."""
        value = self.measure(result)
        threshold: float | None = self.value
        source = _n(self.value)
        problem = None if value is not None else f"{self.metric} was not measured in this run"
        if self.ref is not None:
            if self.against_baseline:
                ref_value = baseline.measure(strategy, self.metric) if baseline else None
                where = f"{self.metric} of the baseline"
                if baseline is not None:
                    where = f"{self.metric} of run {baseline.run_id} in {baseline.path}"
            else:
                ref_value = measure(result, self.ref)
                where = self.ref
            if ref_value is None:
                threshold = None
                problem = problem or f"{where} was not measured"
                source = f"{_n(self.value)} * ({where}: not measured)"
            else:
                threshold = self.value * ref_value + self.offset
                plus = f" + {_n(self.offset)}" if self.offset else ""
                source = f"{_n(self.value)} * {_n(ref_value)} ({where}){plus}"
        record: dict[str, Any] = {
            "expr": self.expr,
            "strategy": strategy,
            "value": None if value is None else round(value, 3),
            "threshold": None if threshold is None else round(threshold, 3),
            "threshold_from": source,
            "passed": (
                value is not None and threshold is not None and _OPS[self.op](value, threshold)
            ),
        }
        if problem:
            record["error"] = problem
        return record


@dataclass(frozen=True)
class Baseline:
    """A previous run's figures: its summary.json, or the file --write-baseline wrote."""

    path: Path
    run_id: str
    mode: str | None
    strategies: Mapping[str, Mapping[str, Any]]

    @classmethod
    def load(cls, path: Path) -> Baseline:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(
                f"--baseline {path}: no such file; write one with --write-baseline {path} "
                "(or `make baseline`), or copy a previous run's reports/<run>/summary.json"
            ) from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"--baseline {path}: not a readable JSON summary ({exc})") from None
        strategies = doc.get("strategies") if isinstance(doc, dict) else None
        if not isinstance(strategies, dict) or not strategies:
            raise UsageError(
                f"--baseline {path}: no strategies in it; give a summary.json of a previous "
                "run or a file written by --write-baseline"
            )
        mode = doc.get("mode")
        return cls(path, str(doc.get("run_id") or "?"), mode if isinstance(mode, str) else None,
                   {str(k): v for k, v in strategies.items() if isinstance(v, dict)})  # fmt: skip

    def measure(self, strategy: str, metric: str) -> float | None:
        result = self.strategies.get(strategy)
        return None if result is None else measure(result, metric)

    def describe(self) -> str:
        return f"{self.path} (run {self.run_id})"


def check_gates(
    gates: Sequence[Gate],
    strategies: Sequence[str],
    *,
    known: Sequence[str] = (),
    baseline: Baseline | None = None,
    mode: str | None = None,
    profile_named: bool = False,
) -> None:
    """Refuse, before anything starts, a gate that could only vanish or never decide.

    strategies: the names this run will report (the reference flows raced, or the profile's
    name for a running target: profile_named); known: every strategy name payrace knows,
    so a prefix naming one that is not in the run is told apart from a typo."""
    runs = ", ".join(strategies)
    for gate in gates:
        prefix = gate.strategy
        if prefix is None or prefix in strategies:
            continue
        rest = gate.expr.split(":", 1)[1].strip()
        close = _closest(prefix, [*strategies, *known])
        if profile_named:
            what = f"this run races the running target named after its profile, {runs!r}"
        else:
            what = f"this run races {runs}"
        if close and close in strategies:
            fix = f"did you mean '{close}:{rest}'?"
        elif prefix in known:
            fix = f"add --strategy {prefix}, or drop the prefix to gate every strategy"
        elif close:
            fix = f"did you mean '{close}:{rest}' (add --strategy {close})?"
        else:
            fix = "name one of them, or drop the prefix to gate every strategy"
        raise UsageError(f"gate {gate.expr!r} names strategy {prefix!r}, but {what}: {fix}")
    wanted = [g for g in gates if g.against_baseline]
    if baseline is None:
        if wanted:
            raise UsageError(
                f"gate {wanted[0].expr!r} compares with a baseline: give --baseline FILE (a "
                "previous run's summary.json, or a file written by --write-baseline)"
            )
        return
    if not wanted:
        raise UsageError(
            f"--baseline {baseline.path} is read only by gates like 'lock_p99_ms<=1.5*baseline'; "
            "add one, or leave --baseline out"
        )
    if mode is not None and baseline.mode is not None and baseline.mode != mode:
        raise UsageError(
            f"--baseline {baseline.describe()} was measured in {baseline.mode} mode and this "
            f"run is {mode}: lock waits of different modes do not compare; take a baseline "
            f"in {mode} mode"
        )
    for gate in wanted:
        for name in (s for s in strategies if gate.applies_to(s)):
            if name not in baseline.strategies:
                have = ", ".join(baseline.strategies)
                raise UsageError(
                    f"gate {gate.expr!r}: baseline {baseline.describe()} has no strategy "
                    f"{name!r} (it has {have}); prefix the gate with one this run races, or "
                    f"take a baseline of {name}"
                )
            if baseline.measure(name, gate.metric) is None:
                raise UsageError(
                    f"gate {gate.expr!r}: baseline {baseline.describe()} did not measure "
                    f"{gate.metric} for {name}; take a baseline that does"
                )


def judge_gates(
    gates: Sequence[Gate],
    results: Mapping[str, Mapping[str, Any]],
    baseline: Baseline | None = None,
) -> list[dict[str, Any]]:
    return [
        g.judge(name, result, baseline)
        for g in gates
        for name, result in results.items()
        if g.applies_to(name)
    ]


def baseline_of(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The figures a baseline gate reads, and where they came from: small and stable enough
    to commit (a summary.json carries plots and examples that change every run)."""
    kept = ("trials", "trials_per_second", "violating_trials", "latency_ms")
    strategies: dict[str, Any] = {}
    for name, result in (summary.get("strategies") or {}).items():
        entry = {k: result[k] for k in kept if k in result}
        unattributed = (result.get("deadlocks") or {}).get("unattributed")
        if unattributed is not None:
            entry["deadlocks"] = {"unattributed": unattributed}
        strategies[name] = entry
    machine = summary.get("machine") or {}
    return {
        "baseline_of": summary.get("run_id"),
        "run_id": summary.get("run_id"),
        "command": summary.get("command"),
        "started_at": summary.get("started_at"),
        "machine": {k: machine[k] for k in ("hostname", "cpus", "platform") if k in machine},
        "mode": summary.get("mode"),
        "strategies": strategies,
    }


def write_baseline(summary: Mapping[str, Any], path: Path) -> str:
    """Write the baseline of a run whose every invariant held; say what happened."""
    results = (summary.get("strategies") or {}).values()
    if not results or any(r.get("valid") is not True for r in results):
        return (
            f"baseline not written to {path}: a baseline is taken from a run whose every "
            "invariant held"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline_of(summary), indent=2) + "\n", encoding="utf-8")
    return f"baseline written to {path}"
