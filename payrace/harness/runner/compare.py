"""`payrace compare`: the same seeded workload for each strategy, side by side.

    COMPARE_MODES  forced | aligned (each a `payrace run` of every strategy, same seed),
                   explore (explore_mode: every schedule of the callback and a webhook, then
                   seeded PCT runs of the callback and two webhooks), load (load_mode: one
                   `payrace load` per strategy, the same locustfile, users, rate and time)
    DEFAULT_MODES  forced, aligned: a minute or two; `--mode all` adds explore and load
    explore_mode() the explorer's results of every strategy as one mode summary
    load_mode()    one Locust run per strategy (load.launch.load_main), read back as one
                   mode summary
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

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from payrace.harness.infra.provider import Database
from payrace.harness.model.checker import compose_validity
from payrace.harness.model.history import History
from payrace.harness.model.stats import LatencyHistogram
from payrace.harness.model.verdict import DECLARED, against_declared, found_word

COMPARE_MODES = ("forced", "aligned", "explore", "load")
DEFAULT_MODES = ("forced", "aligned")
EXPLORE_RACES = (("client", "webhook"), ("client", "webhook", "webhook"))


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
                "request_ms": _request_ms(mode, result),
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
    captures_per_s: float | None
    request_p50: float | None
    request_p99: float | None
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
                captures_per_s=_captures_per_s(result),
                request_p50=(result.get("request_ms") or {}).get("p50"),
                request_p99=(result.get("request_ms") or {}).get("p99"),
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
                gateway_calls=int(result.get("gateway_capture_calls") or 0),
            )
        )
    return out


def _request_ms(mode: str, result: Mapping[str, Any]) -> dict[str, Any] | None:
    """Request p50/p99 as the client saw them (invoke to answer). Aligned: from the history;
    load: Locust's response times. None in forced mode, where the harness itself holds each
    request, and in explore, where the scheduler does."""
    if mode == "load":
        found = (result.get("latency_ms") or {}).get("request", {}).get("all")
        return dict(found) if isinstance(found, Mapping) else None
    history = result.get("_history")
    if mode != "aligned" or not isinstance(history, History):
        return None
    sent: dict[tuple[int, str], int] = {}
    hist = LatencyHistogram()
    for op in history.ops():
        if op.f not in ("verify", "webhook"):
            continue
        key = (op.trial, op.process)
        if op.type == "invoke":
            sent[key] = op.time
        elif key in sent:
            hist.record_ms((op.time - sent.pop(key)) / 1e6)
    return hist.summary()


def _captures_per_s(result: Mapping[str, Any]) -> float | None:
    """Payments captured per second: load counts them in the database; a forced or aligned
    trial is one payment captured once (a violating one counts once too); an exploration
    paces its schedules itself, so it has none."""
    if "captures_per_second" in result:
        value = result["captures_per_second"]
        return float(value) if isinstance(value, int | float) else None
    if "explore" in result:
        return None
    return float(result.get("trials_per_second", 0.0))


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
    pick("load", "captures_per_s", "max", "the most payments captured per second under load",
         unit="/s")  # fmt: skip
    pick("load", "request_p99", "min", "the quickest answers under load")
    pick("load", "lock_p99", "min", "the least lock waiting under load")
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


# ---------------------------------------------------------------------------- explore, load


def _explored(name: str, results: Sequence[Any], gateway_calls: int) -> dict[str, Any]:
    """One strategy's explorations (explore.findings.ExploreResult) as a run's strategy
    result: schedules are its trials; the first violation and each checker's count come
    from the exploration that found them."""
    parts = [
        r.summary(command="", run_id="", database={}, started_at="")["strategies"][name]
        for r in results
    ]
    checks: dict[str, Any] = {}
    for part in parts:
        for check_name, result in part["checks"].items():
            seen = checks.get(check_name)
            if seen is None or (seen["valid"] is not False and result["valid"] is False):
                checks[check_name] = {
                    **result,
                    "count": result["count"] + (seen or {}).get("count", 0),
                }
            else:
                seen["count"] += result["count"]
    replies = [reply for r in results for run in r.runs for reply in run.replies.values()]
    server = [reply.server() for reply in replies]
    schedules = sum(len(r.runs) for r in results)
    duration = sum(r.duration_s for r in results)
    return {
        "expected": parts[0]["expected"],
        "valid": compose_validity(r.verdict.valid for r in results),
        "trials": schedules,
        "violating_trials": sum(len(r.violating()) for r in results),
        "trials_per_second": round(schedules / duration, 2) if duration else 0.0,
        "duration_s": round(duration, 3),
        "checks": checks,
        "latency_ms": {},
        "plots": {},
        "first_violation": next((p["first_violation"] for p in parts if p["first_violation"]), None),  # noqa: E501
        "conflicts": {
            "answered_409": sum(1 for reply in replies if reply.status == 409),
            "retried": 0,
            "serialization_failures": sum(int(t.get("serialization", 0)) for t in server),
            "deadlocks_retried": sum(int(t.get("deadlock", 0)) for t in server),
        },
        "deadlocks": {"counted": sum(1 for r in results for run in r.runs if run.deadlocks)},
        "gateway_capture_calls": gateway_calls,
        "explore": {
            "races": [
                {"requests": [s.kind.token for s in r.specs], "mode": r.mode,
                 "schedules": len(r.runs), "violating": len(r.violating())}
                for r in results
            ],
        },
    }  # fmt: skip


async def explore_mode(
    db: Database,
    strategies: Sequence[str],
    *,
    seed: int,
    pct_runs: int,
    on_strategy: Callable[[str], None] = lambda name: None,
) -> dict[str, Any]:
    """Every strategy through the explorer at READ COMMITTED: every schedule of the callback
    and a payment.captured webhook, then `pct_runs` seeded PCT runs of the callback and two
    webhooks; each strategy with a fake gateway of its own, whose capture calls it counts."""
    from payrace.harness.explore.plan import execute, make_plan
    from payrace.harness.gateway.fake import FakeRazorpay
    from payrace.harness.gateway.server import GatewayServer
    from payrace.harness.gateway.signing import GatewayKeys
    from payrace.harness.infra.machine import machine

    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name in strategies:
        fake = FakeRazorpay(GatewayKeys(), seed=seed)
        found = []
        with GatewayServer(fake) as server:
            for races in EXPLORE_RACES:
                plan = make_plan(strategy=name, requests=list(races), isolation=None,
                                 pct_runs=pct_runs if len(races) > 2 else None, depth=2,
                                 seed=seed, replay=None, scenario=None)  # fmt: skip
                found.append(await execute(plan, db, fake, server.url))
        calls = sum(fake.counters()["captures"].values())
        results[name] = _explored(name, found, calls)
        on_strategy(name)
    return {
        "duration_s": round(time.perf_counter() - started, 3),
        "machine": machine(),
        "database": {"route": db.route, "server_version": db.server_version, "fast": db.fast,
                     "describe": db.describe()},
        "strategies": results,
    }  # fmt: skip


def load_mode(
    strategies: Sequence[str],
    out_dir: Path,
    *,
    run: Callable[[str, Path], int],
) -> dict[str, Any]:
    """One `payrace load` per strategy, each in a directory of its own under out_dir; `run`
    starts it (strategy, out) and returns its exit code. A run that wrote no summary
    (a setup or infrastructure error) is an error for the whole comparison."""
    results: dict[str, Any] = {}
    first: dict[str, Any] = {}
    duration = 0.0
    for name in strategies:
        out = out_dir / name.replace(":", "-")
        code = run(name, out)
        found = sorted(out.glob("*/summary.json")) if out.is_dir() else []
        if not found:
            raise RuntimeError(f"payrace load --strategy {name} wrote no summary (exit {code})")
        summary = json.loads(found[-1].read_text(encoding="utf-8"))
        first = first or summary
        duration += float(summary.get("duration_s", 0.0))
        # One strategy per load run, named as the service says it on /healthz (a strategy
        # given by import path answers with its Strategy.name).
        [result] = summary["strategies"].values()
        result["load_report"] = str(found[-1].parent)
        results[name] = result
    return {**first, "duration_s": round(duration, 3), "strategies": results}


__all__ = [
    "COMPARE_MODES",
    "DEFAULT_MODES",
    "EXPLORE_RACES",
    "Row",
    "advice",
    "explore_mode",
    "load_mode",
    "merge",
    "rows",
]
