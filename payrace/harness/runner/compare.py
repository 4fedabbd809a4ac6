"""`payrace compare`: the same seeded workload for each strategy, side by side.

    COMPARE_MODES  forced | aligned (each a `payrace run` of every strategy, same seed)
    merge()        the mode summaries -> one summary, a strategy per `<strategy>.<mode>`,
                   judged against the declarations (model.verdict.against_declared): exit 0
                   iff every strategy is what it is declared to be; a strategy given by
                   import path is expected valid
    Row, rows()    per (strategy, mode) the figures the table and the report show
    advice()       "which to pick when": sentences derived from the measured rows, by rule
                   (never written by hand), each naming the figure it rests on

reports.compare renders the table (console) and compare.html; cli.compare_command runs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from payrace.harness.model.verdict import DECLARED, against_declared, found_word

COMPARE_MODES = ("forced", "aligned")


def merge(run_id: str, summaries: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    first = summaries[0][1]
    strategies: dict[str, dict[str, Any]] = {}
    for mode, summary in summaries:
        for name, result in summary["strategies"].items():
            expected = result.get("expected") or DECLARED.get(name) or "valid"
            strategies[f"{name}.{mode}"] = {
                "strategy": name,
                "mode": mode,
                **result,
                "expected": expected,
            }
    merged = {
        **first,
        "run_id": run_id,
        "command": first.get("command", "payrace compare"),
        "duration_s": round(sum(s["duration_s"] for _, s in summaries), 3),
        "mode": "+".join(mode for mode, _ in summaries),
        "strategies": strategies,
        "gates": [],
    }
    merged["compare"] = {
        "rows": [row.to_json() for row in rows(merged)],
        "advice": advice(rows(merged)),
    }
    return against_declared(strategies).stamp(merged)


@dataclass(frozen=True)
class Row:
    strategy: str
    mode: str
    declared: str
    found: str
    trials: int
    violations: int
    trials_per_s: float
    lock_p50: float | None
    lock_p99: float | None
    lock_max: float | None
    hold_p50: float | None
    hold_p99: float | None
    answered_409: int
    retried_409: int
    serialization_failures: int
    deadlocks: int
    gateway_calls: int

    @property
    def as_declared(self) -> bool:
        return self.found == self.declared

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "as_declared": self.as_declared}


def _stat(latency: Mapping[str, Any], kind: str, key: str) -> float | None:
    value = ((latency.get(kind) or {}).get("all") or {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def rows(summary: Mapping[str, Any]) -> list[Row]:
    out = []
    for result in summary["strategies"].values():
        latency = result.get("latency_ms") or {}
        conflicts = result.get("conflicts") or {}
        deadlocks = result.get("deadlocks") or {}
        out.append(
            Row(
                strategy=result["strategy"],
                mode=result["mode"],
                declared=str(result.get("expected")),
                found=found_word(result.get("valid")),
                trials=int(result.get("trials", 0)),
                violations=int(result.get("violating_trials", 0)),
                trials_per_s=float(result.get("trials_per_second", 0.0)),
                lock_p50=_stat(latency, "lock", "p50"),
                lock_p99=_stat(latency, "lock", "p99"),
                lock_max=_stat(latency, "lock", "max"),
                hold_p50=_stat(latency, "hold", "p50"),
                hold_p99=_stat(latency, "hold", "p99"),
                answered_409=int(conflicts.get("answered_409", 0)),
                retried_409=int(conflicts.get("retried", 0)),
                serialization_failures=int(conflicts.get("serialization_failures", 0)),
                deadlocks=int(deadlocks.get("counted", 0) or 0)
                + int(conflicts.get("deadlocks_retried", 0)),
                gateway_calls=int(result.get("gateway_capture_calls", 0)),
            )
        )
    return out


def _fmt(value: float | None, unit: str = " ms") -> str:
    return "n/a" if value is None else f"{value:.2f}{unit}"


def advice(measured: Sequence[Row]) -> list[str]:
    """Which strategy to pick when, from the rows alone. A strategy is a candidate only when
    it was valid in every mode compared; each sentence states the figure it rests on."""
    by_strategy: dict[str, list[Row]] = {}
    for row in measured:
        by_strategy.setdefault(row.strategy, []).append(row)
    safe = {s: rs for s, rs in by_strategy.items() if all(r.found == "valid" for r in rs)}
    unsafe = {s: rs for s, rs in by_strategy.items() if s not in safe}
    lines: list[str] = []
    for name, rs in unsafe.items():
        bad = sum(r.violations for r in rs)
        lines.append(
            f"never {name}: {bad} violating trial(s) of {sum(r.trials for r in rs)} "
            f"({', '.join(r.mode + ' ' + r.found for r in rs)})"
        )
    if not safe:
        return [*lines, "no strategy was valid in every mode: nothing to recommend"]

    def pick(mode: str, key: str, best: str, label: str, unit: str = " ms") -> None:
        candidates = [
            (value, name)
            for name, rs in safe.items()
            for r in rs
            if r.mode == mode and (value := getattr(r, key)) is not None
        ]
        if not candidates:
            return
        value, name = min(candidates) if best == "min" else max(candidates)
        lines.append(f"{label}: {name} ({key.replace('_', ' ')} {_fmt(value, unit)} in {mode})")

    pick("forced", "lock_p99", "min", "the least waiting when requests collide")
    pick("forced", "hold_p99", "min", "the shortest lock hold (least blocking of others)")
    pick("aligned", "trials_per_s", "max", "the most payments raced per second", unit="/s")
    quiet = [
        name
        for name, rs in safe.items()
        if all(r.answered_409 == 0 and r.serialization_failures == 0 for r in rs)
    ]
    if quiet:
        lines.append(
            "clients that cannot retry (no 409 answered, no attempt aborted): " + ", ".join(quiet)
        )
    for name, rs in safe.items():
        trials = sum(r.trials for r in rs) or 1
        answered = sum(r.answered_409 for r in rs)
        aborted = sum(r.serialization_failures + r.deadlocks for r in rs)
        if answered:
            lines.append(
                f"{name} only where clients retry a 409: {answered} answered over {trials} "
                f"trials ({100 * answered / trials:.0f} per 100)"
            )
        if aborted:
            lines.append(
                f"{name} repeats database work: {aborted} attempt(s) aborted by PostgreSQL and "
                f"re-run inside the service over {trials} trials "
                f"({100 * aborted / trials:.0f} per 100)"
            )
        calls = sum(r.gateway_calls for r in rs)
        if calls > trials:
            lines.append(
                f"{name} calls the gateway more than once per payment: {calls} capture "
                f"calls for {trials} payments"
            )
    return lines


__all__ = ["COMPARE_MODES", "Row", "advice", "merge", "rows"]
