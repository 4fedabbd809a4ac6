"""Summaries shaped like real runs, for the tests of payrace.harness.reports.

realistic_summary()   a forced run of naive (caught, with its schedule) and for_update
                      (valid, behind a lock gate), as `payrace run` judges it: exit 1
race_summary()        the same as `payrace race` judges it: every strategy as declared
empty_summary()       a run with zero trials and nothing checked
deadlocked_summary()  a team's service with a deadlocked trial (its statements) and deadlocks
                      the server counted that no trial could be tied to
strategy(), check()   one strategy's and one checker's entry, for tests that edit a summary
measured()            latencies shaped like a real run
TIMELINE              the first violating schedule of realistic_summary's naive
"""

from __future__ import annotations

import random
from typing import Any

from payrace.harness.model.stats import PathHistograms

TIMELINE = [
    {"time_ns": 100, "process": "client", "text": "read payment (pending)"},
    {"time_ns": 200, "process": "webhook-1", "text": "read payment (pending)"},
    {"time_ns": 300, "process": "client", "text": "status pending: capture"},
    {"time_ns": 400, "process": "webhook-1", "text": "status pending: capture"},
    {"time_ns": 500, "process": "client", "text": "update payment = captured"},
    {"time_ns": 600, "process": "webhook-1", "text": "update payment = captured"},
    {"time_ns": 700, "process": "client", "text": "update invoice = paid"},
    {"time_ns": 800, "process": "webhook-1", "text": "update invoice = paid <dup>"},
]


def measured(seed: int, lock_scale_ms: float, trials: int) -> PathHistograms:
    """Latencies shaped like a real run: most lock waits tiny, the loser of each race
    waiting for the winner's whole hold."""
    rng = random.Random(seed)
    paths = PathHistograms()
    for _ in range(trials):
        hold = rng.uniform(2.0, 8.0)
        winner, loser = rng.sample(["client", "webhook"], 2)
        paths.record("lock", winner, rng.uniform(0.01, 0.05))
        paths.record("lock", loser, hold * lock_scale_ms + rng.uniform(0.0, 0.3))
        paths.record("hold", winner, hold)
        paths.record("hold", loser, rng.uniform(0.2, 0.5))
        for path in ("client", "webhook"):
            paths.record("request", path, hold + rng.uniform(1.0, 4.0))
    return paths


def check(name: str, valid: object, count: int, checked: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "valid": valid,
        "count": count,
        "checked": checked,
        "first": extra.get("first"),
        "worst": extra.get("worst"),
        "last": extra.get("last"),
        "note": extra.get("note", ""),
    }


def strategy(expected: str, valid: object, paths: PathHistograms, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "expected": expected,
        "valid": valid,
        "trials": 50,
        "violating_trials": 0,
        "trials_per_second": 41.7,
        "duration_s": 1.2,
        "checks": {},
        "latency_ms": paths.summary(),
        "plots": paths.plots(),
        "server_side": {"samples": 40, "waiting_max": 1, "waiting_seen": 12},
        "arrival_spread_ms": None,
        "first_violation": None,
    }
    doc.update(extra)
    return doc


def realistic_summary() -> dict[str, Any]:
    duplicate = {
        "payment": 17,
        "table": "payments",
        "row_id": 17,
        "writes": 2,
        "rewrites": 1,
        "txids": [811, 812],
        "backend_pids": [4242, 4243],
        "final_status": "captured",
        "audit": [
            {"audit_id": 33, "op": "UPDATE", "old": "pending", "new": "captured", "txid": 811},
            {"audit_id": 34, "op": "UPDATE", "old": "captured", "new": "captured", "txid": 812},
        ],
        "ops": [
            {
                "index": 12,
                "f": "verify",
                "process": "client",
                "type": "ok",
                "status": 200,
                "trial": 3,
            },
            {
                "index": 13,
                "f": "webhook",
                "process": "webhook-1",
                "type": "ok",
                "status": 200,
                "trial": 3,
            },
        ],
        "problem": "written twice",
    }
    naive = strategy(
        "violated",
        False,
        measured(1, 0.0, 50),  # naive takes no lock: waits are ~0
        violating_trials=50,
        forced={"by": "locks", "trials": 50, "forced": 48, "timeouts": 2},
        checks={
            "single_capture_write": check(
                "single_capture_write", False, 50, 50, first=duplicate, worst=duplicate
            ),
            "single_invoice_paid": check("single_invoice_paid", False, 50, 50, first=duplicate),
            "no_5xx": check("no_5xx", True, 0, 100),
        },
        first_violation={
            "trial": 3,
            "payment": 17,
            "checks": ["single_capture_write", "single_invoice_paid"],
            "timeline": TIMELINE,
        },
    )
    for_update = strategy(
        "valid",
        True,
        measured(2, 1.0, 50),
        checks={
            "single_capture_write": check("single_capture_write", True, 0, 50),
            "single_invoice_paid": check("single_invoice_paid", True, 0, 50),
            "no_deadlock": check("no_deadlock", True, 0, 50),
        },
        arrival_spread_ms={"count": 50, "p50": 0.2, "p99": 1.1, "max": 2.0},
    )
    return {
        "run_id": "20261126-101500-forced",
        "command": "payrace run --strategy naive,for_update --mode forced --trials 50",
        "started_at": "2026-11-26T10:15:00+00:00",
        "duration_s": 3.4,
        "machine": {"hostname": "ci-1", "cpus": 2, "python": "3.11.7", "platform": "Linux"},
        "database": {"route": "embedded", "server_version": "16.2", "fast": True},
        "target": "inproc",
        "mode": "forced",
        "trials": 50,
        "seed": 1,
        "webhooks_per_trial": 1,
        "strategies": {"naive": naive, "for_update": for_update},
        "gates": [
            {"expr": "lock_p99_ms<=100", "strategy": "for_update", "value": 9.1, "passed": True}
        ],
        # as `payrace run` says it: naive's violation is red, declared unsafe or not
        "verdict": "violated",
        "exit_code": 1,
        "judged": "invariants",
        "verdict_reasons": ["naive: violated"],
    }


def race_summary() -> dict[str, Any]:
    """realistic_summary() as `payrace race` judges it: every strategy as declared, exit 0."""
    summary = realistic_summary()
    for result in summary["strategies"].values():
        result["as_declared"] = True
    summary.update(verdict="as_declared", exit_code=0, judged="declared", verdict_reasons=[])
    return summary


def empty_summary() -> dict[str, Any]:
    return {
        "run_id": "empty",
        "trials": 0,
        "strategies": {
            "for_update": {
                "expected": "valid",
                "valid": "unknown",
                "trials": 0,
                "violating_trials": 0,
                "checks": {},
                "latency_ms": {},
                "plots": {},
                "arrival_spread_ms": None,
                "first_violation": None,
            }
        },
        "gates": [],
        "verdict": "unexpected",
        "exit_code": 1,
    }


DEADLOCK_STATEMENTS = (
    "UPDATE invoices SET status = 'paid' WHERE order_id = 41",
    "UPDATE payments SET status = 'captured' WHERE id = 17",
)


def deadlocked_summary() -> dict[str, Any]:
    members = [
        {
            "pid": 4242,
            "xid": 812,
            "query": DEADLOCK_STATEMENTS[0],
            "status": "aborted",
            "waits_for": "transaction 813 (ShareLock)",
            "blocked_by": [4243],
        },
        {
            "pid": 4243,
            "xid": 813,
            "query": DEADLOCK_STATEMENTS[1],
            "status": "committed",
            "waits_for": "transaction 812 (ShareLock)",
            "blocked_by": [4242],
        },
    ]
    found = {
        "payment": 17,
        "trial": 3,
        "deadlocks": 1,
        "statements": list(DEADLOCK_STATEMENTS),
        "cycles": [{"seen_at": "2026-11-26T10:15:01.5+00:00", "members": members}],
        "replies": [
            {
                "index": 12,
                "f": "verify",
                "process": "client",
                "status": 409,
                "said": "deadlock detected <40P01>",
            }
        ],
    }
    why = "2 counted by pg_stat_database were never seen as a wait-for cycle"
    target = strategy(
        "valid",
        False,
        measured(3, 1.0, 50),
        violating_trials=1,
        checks={
            "single_capture_write": check("single_capture_write", True, 0, 50),
            "no_deadlock": check(
                "no_deadlock", False, 3, 50, first=found, last={"unattributed": 2, "why": why}
            ),
        },
        first_violation={
            "trial": 3,
            "payment": 17,
            "checks": ["no_deadlock"],
            "timeline": [
                {
                    "time_ns": 1,
                    "process": "backend 4242",
                    "text": "waits for transaction 813 (ShareLock): deadlock, rolled back",
                },
                {
                    "time_ns": 2,
                    "process": "backend 4243",
                    "text": "UPDATE payments pending -> captured (tx 813)",
                },
            ],
            "deadlocks": found,
        },
        deadlocks={
            "counted": 3,
            "settled": True,
            "cycles_seen": 1,
            "attributed": 1,
            "unattributed": 2,
            "why_unattributed": why,
            "payments": [17],
        },
    )
    summary = realistic_summary()
    summary.update(
        run_id="deadlocked",
        target="http://127.0.0.1:8000",
        strategies={"target": target},
        gates=[{"expr": "violations<=0", "strategy": "target", "value": 3.0, "passed": False}],
        verdict="violated",
        exit_code=1,
    )
    return summary
