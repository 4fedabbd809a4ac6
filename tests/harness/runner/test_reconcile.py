"""The target's reconciliation gets a bounded chance before the verdict (issue 11, finding 1).

Finding 1: `payrace run --strategy for_update --webhooks 0 --nemesis
gateway-latency:50,kill-backends:0.01` ended violated with captures lost: the gateway captured,
every attempt to commit was killed, and nothing reconciled before the harness judged. The
service reconciles (payrace.service.reconcile); the harness now waits for it, and what stays
pending when the window closes is still a lost capture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from payrace.harness.errors import UsageError
from payrace.harness.infra.provider import Database
from payrace.harness.runner.config import RunConfig
from payrace.harness.runner.reconcile import OWN_WINDOW_S, RUNNING_WINDOW_S, pending, window_s
from payrace.harness.runner.run import run

# Finding 1's faults: every capture at the gateway 50 ms slow, a backend in a transaction
# killed every 10 ms, so many captures the gateway accepted never commit.
FINDING_1 = "gateway-latency:50,kill-backends:0.01"


async def _finding_1(pg: Database, tmp_path: Path, **fields: Any) -> dict[str, Any]:
    config = RunConfig(
        dsn=pg.url, out_dir=tmp_path, strategies=["for_update"], trials=40, webhooks=0,
        nemesis=FINDING_1, **fields,
    )  # fmt: skip
    summary = await run(config, announce=lambda line: None)
    result: dict[str, Any] = summary["strategies"]["for_update"]
    return result


def test_pending_is_what_the_gateway_captured_and_the_database_does_not_show() -> None:
    payments = {1: "pay_a", 2: "pay_b", 3: "pay_c", 4: "pay_d"}
    counters = {"accepted": {"pay_a": 1, "pay_b": 1}, "captured": {"pay_c": 1, "pay_d": 0}}
    statuses: dict[int, str | None] = {1: "captured", 2: "pending", 3: "pending", 4: "pending"}
    # 2: accepted at the gateway, pending here; 3: captured by the gateway itself; 4: never.
    assert pending(payments, counters, statuses, "captured") == [2, 3]
    assert pending(payments, counters, {p: "captured" for p in payments}, "captured") == []


def test_the_window_defaults_by_target_and_is_checked() -> None:
    assert window_s(RunConfig()) == OWN_WINDOW_S
    running = RunConfig(target="http://127.0.0.1:9")
    assert window_s(running) == RUNNING_WINDOW_S
    assert window_s(RunConfig(reconcile_s=0)) == 0
    for bad in (-1.0, float("nan"), float("inf"), 3601.0):
        with pytest.raises(UsageError, match="--reconcile-s"):
            RunConfig(reconcile_s=bad).validate()


@pytest.mark.slow
async def test_finding_1_ends_valid_once_the_service_reconciles(
    pg: Database, tmp_path: Path
) -> None:
    result = await _finding_1(pg, tmp_path)
    waited = result["reconciliation"]
    # The faults did lose captures when the trials ended: the clean verdict is the
    # reconciler's doing, not a run where nothing was at stake.
    assert waited["pending_before"] >= 1, waited
    assert waited["pending_after"] == 0, waited
    assert waited["reconciled"] == waited["pending_before"]
    assert waited["sweeps"] >= 1 and "reconcile_once" in waited["how"]
    assert waited["waited_s"] <= waited["window_s"]
    lost = result["checks"]["no_lost_capture"]
    assert lost["valid"] is True and lost["checked"] >= waited["pending_before"], lost
    assert result["valid"] is True, (result["trial_errors"], result["checks"])


@pytest.mark.slow
async def test_finding_1_without_the_wait_is_judged_lost(pg: Database, tmp_path: Path) -> None:
    """--reconcile-s 0 judges the moment the trials end: finding 1 as it was reported."""
    result = await _finding_1(pg, tmp_path, reconcile_s=0)
    waited = result["reconciliation"]
    assert waited["pending_before"] >= 1 and waited["pending_after"] == waited["pending_before"]
    assert waited["sweeps"] == 0 and waited["waited_s"] < 0.1
    lost = result["checks"]["no_lost_capture"]
    assert lost["valid"] is False and lost["count"] == waited["pending_after"], lost
    assert result["valid"] is False


@pytest.mark.slow
async def test_a_capture_still_lost_when_the_window_closes_stays_a_violation(
    pg: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's reconciler off (RECONCILE_INTERVAL_S=0): the harness polls for the whole
    window, nothing recovers, and the verdict says lost."""
    monkeypatch.setenv("RECONCILE_INTERVAL_S", "0")
    result = await _finding_1(pg, tmp_path, reconcile_s=1.0)
    waited = result["reconciliation"]
    assert "reconciler is off" in waited["how"] and waited["sweeps"] == 0
    assert waited["pending_before"] >= 1 and waited["pending_after"] == waited["pending_before"]
    assert 1.0 <= waited["waited_s"] < 5.0
    assert result["checks"]["no_lost_capture"]["valid"] is False
    assert result["valid"] is False
