"""`payrace chaos`: every fault of the nemesis, one at a time, on the fix and on the bug.

    STRATEGIES      for_update (declared valid: every invariant must hold under every fault)
                    and naive (declared violated: the campaign must still catch it)
    parameter()     the strength a fault is injected at: CAMPAIGN_PARAMETERS, else the
                    registry's example value (a fault added later is included)
    plan()          one RunConfig per fault of model.nemesis.FAULTS, the payments split so
                    every strategy gets at least `payments` in all
    merge()         the runs' summaries -> one summary, a strategy per (strategy, fault)
                    named `<strategy>.<fault>`, judged against the declarations (as `race`)

The faults come from the registry (model.nemesis.FAULTS), never from a list here: a fault
another change adds is in the next campaign. Each fault gets a run of its own, so a violation
names the fault that caused it; both strategies race in that run, one after the other on the
same database with the same seeded workload. The reference service payrace starts is the
target: in-process, or in its own process for a fault the in-process target cannot take
(RunConfig.validate says so, e.g. a fault that restarts the service).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from payrace.harness.errors import UsageError
from payrace.harness.model.nemesis import FAULTS
from payrace.harness.model.verdict import against_declared
from payrace.harness.runner.config import RunConfig

STRATEGIES = ("for_update", "naive")
MIN_PAYMENTS = 2_000  # per strategy, over the whole campaign (issue 11)

# Strong enough to bite within a few hundred payments on a 2-core machine, not so strong that
# nothing completes: a fifth of gateway captures failed or answered 504 after capturing; a
# backend inside a transaction killed every 50 ms; lock and statement timeouts below the lock
# waits forced mode produces.
CAMPAIGN_PARAMETERS: dict[str, float] = {
    "gateway-errors": 0.2,
    "gateway-latency": 50.0,
    "gateway-timeout": 0.2,
    "kill-backends": 0.05,
    "lock-timeout": 50.0,
    "statement-timeout": 200.0,
}
# A fault the table above does not know: the registry's example value, kept within its range.


def parameter(name: str) -> float:
    """The value `name` is injected at in the campaign."""
    param = FAULTS[name]
    value = CAMPAIGN_PARAMETERS.get(name, param.example)
    return min(max(value, param.low), param.high)


def spec(name: str) -> str:
    return f"{name}:{parameter(name):g}"


@dataclass(frozen=True)
class Step:
    fault: str  # the registry's name
    config: RunConfig


def plan(base: RunConfig, payments: int = MIN_PAYMENTS) -> list[Step]:
    """One run per fault of the registry, `base` giving everything else (dsn, out, seed...);
    trials per fault so that each strategy races at least `payments` payments."""
    faults = list(FAULTS)
    trials = max(1, math.ceil(payments / len(faults)))
    steps = []
    for fault in faults:
        config = replace(
            base,
            strategies=list(STRATEGIES),
            trials=trials,
            nemesis=spec(fault),
            run_id=f"{base.run_id}-{fault}",
        )
        steps.append(Step(fault, _runnable(fault, config)))
    return steps


def _runnable(fault: str, config: RunConfig) -> RunConfig:
    """The config as is when it validates; else against the service in its own process (a
    fault that restarts the service needs one); else, for a fault that restarts PostgreSQL,
    on the embedded server payrace starts and owns (a --dsn server is not payrace's to
    restart); else the refusal, naming the fault."""
    candidates = [config, replace(config, target="http")]
    if FAULTS[fault].needs == "own-postgres" and config.dsn:
        candidates += [replace(c, dsn=None) for c in candidates]
    refusal: UsageError | None = None
    for candidate in candidates:
        try:
            replace(candidate).validate()
        except UsageError as exc:
            refusal = refusal or exc
            continue
        return candidate
    raise UsageError(f"fault {fault} cannot run in the campaign: {refusal}")


def merge(run_id: str, runs: list[tuple[Step, dict[str, Any]]]) -> dict[str, Any]:
    """One summary for the campaign: a strategy per (strategy, fault), `<strategy>.<fault>`,
    each with its `fault` (the spec) and `strategy`; judged against the declarations."""
    first = runs[0][1]
    strategies: dict[str, dict[str, Any]] = {}
    for step, summary in runs:
        for name, result in summary["strategies"].items():
            strategies[f"{name}.{step.fault}"] = {
                "strategy": name,
                "fault": step.config.nemesis,
                "target": step.config.target,
                "mode": summary["mode"],
                **result,
            }
    merged = {
        **first,
        "run_id": run_id,
        "duration_s": round(sum(s["duration_s"] for _, s in runs), 3),
        "trials": sum(s["trials"] for _, s in runs),
        "strategies": strategies,
        "gates": [],
    }
    return against_declared(strategies).stamp(merged)
