"""model.gates: parsing, absolute and relative thresholds, baselines, and the checks that
refuse a gate before the run when it could only vanish or never decide."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from payrace.harness.errors import UsageError
from payrace.harness.model.gates import (
    METRICS,
    Baseline,
    Gate,
    baseline_of,
    check_gates,
    judge_gates,
    measure,
    write_baseline,
)
from payrace.harness.model.verdict import overall


def result(lock_p99: float, hold_p99: float, *, count: int = 100, valid: Any = True) -> dict:
    def stats(p99: float) -> dict[str, Any]:
        return {"count": count, "mean": p99 / 2, "p50": p99 / 3, "p95": p99, "p99": p99,
                "max": p99}  # fmt: skip

    return {
        "valid": valid,
        "trials": count,
        "trials_per_second": 50.0,
        "violating_trials": 0,
        "deadlocks": {"attributed": 0, "unattributed": 0},
        "latency_ms": {"lock": {"all": stats(lock_p99)}, "hold": {"all": stats(hold_p99)}},
    }


def summary_of(results: dict[str, Any], mode: str = "forced") -> dict[str, Any]:
    return {"run_id": "20261130-100000-run", "mode": mode, "command": "payrace run",
            "machine": {"hostname": "ci", "cpus": 2}, "strategies": results}  # fmt: skip


# -- parsing -------------------------------------------------------------------------------


def test_gate_parsing() -> None:
    gate = Gate.parse("for_update: lock_webhook_p99_ms <= 100")
    assert (gate.strategy, gate.metric, gate.op, gate.value, gate.ref) == (
        "for_update", "lock_webhook_p99_ms", "<=", 100.0, None,
    )  # fmt: skip
    res = {"latency_ms": {"lock": {"webhook": {"count": 3, "p99": 120.0}}}, "violating_trials": 0}
    assert gate.judge("for_update", res)["passed"] is False
    with pytest.raises(UsageError, match="form"):
        Gate.parse("lock_p99_ms is small")
    with pytest.raises(UsageError, match="form"):
        Gate.parse("lock_p99_ms<=")


def test_an_unknown_metric_names_the_closest_one() -> None:
    with pytest.raises(UsageError, match="unknown metric 'lock_p42_ms'"):
        Gate.parse("lock_p42_ms<=1")
    with pytest.raises(UsageError, match="did you mean 'lock_p99_ms'"):
        Gate.parse("lock_p99<=1")
    with pytest.raises(UsageError, match="unknown metric 'hold_p99'; did you mean 'hold_p99_ms'"):
        Gate.parse("lock_p99_ms<=3*hold_p99")
    assert len(METRICS) == 2 + 3 * 3 * 5


def test_relative_forms_parse_into_factor_reference_and_offset() -> None:
    gate = Gate.parse("lock_p99_ms <= 3 * hold_p99_ms")
    assert (gate.value, gate.ref, gate.offset, gate.against_baseline) == (
        3.0,
        "hold_p99_ms",
        0,
        False,
    )
    base = Gate.parse("flask-shop:lock_p99_ms<=1.5*baseline+2")
    assert (base.strategy, base.value, base.ref, base.offset) == (
        "flask-shop",
        1.5,
        "baseline",
        2.0,
    )
    assert base.against_baseline
    assert Gate.parse("trials_per_second>=baseline").value == 1.0
    with pytest.raises(UsageError, match="compares lock_p99_ms with itself"):
        Gate.parse("lock_p99_ms<=2*lock_p99_ms")
    with pytest.raises(UsageError, match=r"threshold .* is not of the form"):
        Gate.parse("lock_p99_ms<=hold_p99_ms*3")


def test_the_violations_gate_counts_deadlocks_no_trial_could_be_tied_to() -> None:
    gate = Gate.parse("violations<=0")
    clean = {"violating_trials": 0, "deadlocks": {"attributed": 0, "unattributed": 0}}
    assert gate.judge("target", clean) == {
        "expr": "violations<=0", "strategy": "target", "value": 0.0, "threshold": 0.0,
        "threshold_from": "0", "passed": True,
    }  # fmt: skip
    # 27 deadlocked trials are in violating_trials already; 2 deadlocks were tied to none.
    deadlocked = {"violating_trials": 27, "deadlocks": {"attributed": 29, "unattributed": 2}}
    assert gate.judge("target", deadlocked)["value"] == 29.0
    untied = {"violating_trials": 0, "deadlocks": {"attributed": 0, "unattributed": 29}}
    assert gate.judge("target", untied)["passed"] is False
    # A summary from before deadlocks were accounted (no block): trials alone.
    assert gate.measure({"violating_trials": 3}) == 3.0


# -- judging -------------------------------------------------------------------------------


def test_lock_wait_against_the_measured_hold_time() -> None:
    gate = Gate.parse("lock_p99_ms<=3*hold_p99_ms")
    held = gate.judge("for_update", result(lock_p99=11.0, hold_p99=4.0))
    assert held == {
        "expr": "lock_p99_ms<=3*hold_p99_ms", "strategy": "for_update", "value": 11.0,
        "threshold": 12.0, "threshold_from": "3 * 4 (hold_p99_ms)", "passed": True,
    }  # fmt: skip
    breached = gate.judge("for_update", result(lock_p99=13.0, hold_p99=4.0))
    assert (breached["threshold"], breached["passed"]) == (12.0, False)
    assert overall({"for_update": {"valid": True}}, [held]) == ("valid", 0)
    assert overall({"for_update": {"valid": True}}, [breached]) == ("gate_breached", 1)


def test_an_unmeasured_metric_is_a_gate_error_never_a_pass() -> None:
    nothing = result(lock_p99=0.0, hold_p99=0.0, count=0)  # empty histograms report zeros
    assert measure(nothing, "lock_p99_ms") is None
    absolute = Gate.parse("lock_p99_ms<=100").judge("naive", nothing)
    assert absolute["value"] is None and absolute["passed"] is False
    assert "lock_p99_ms was not measured" in absolute["error"]
    no_hold = result(lock_p99=1.0, hold_p99=0.0)
    del no_hold["latency_ms"]["hold"]
    relative = Gate.parse("lock_p99_ms<=3*hold_p99_ms").judge("shop", no_hold)
    assert (relative["value"], relative["threshold"], relative["passed"]) == (1.0, None, False)
    assert relative["error"] == "hold_p99_ms was not measured"
    for gate in (absolute, relative):
        assert overall({"s": {"valid": True}}, [gate]) == ("unknown", 1)
        assert overall({"s": {"valid": True}}, [gate], unknown_exit=2) == ("unknown", 2)


def test_a_baseline_gate_resolves_its_threshold_from_the_baseline(tmp_path: Path) -> None:
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(summary_of({"for_update": result(8.0, 3.0)})))
    baseline = Baseline.load(path)
    gate = Gate.parse("lock_p99_ms<=1.5*baseline+1")
    held = gate.judge("for_update", result(12.5, 3.0), baseline)
    assert (held["threshold"], held["passed"]) == (13.0, True)
    assert (
        held["threshold_from"] == f"1.5 * 8 (lock_p99_ms of run 20261130-100000-run in {path}) + 1"
    )
    breached = judge_gates([gate], {"for_update": result(13.5, 3.0)}, baseline)
    assert [g["passed"] for g in breached] == [False]
    # Not handed the baseline (a config never validated): not measured, never passed.
    assert gate.judge("for_update", result(1.0, 1.0))["passed"] is False


def test_gates_apply_to_their_strategy_or_to_all() -> None:
    results = {"naive": result(0.5, 0.2), "for_update": result(9.0, 3.0)}
    judged = judge_gates(
        [Gate.parse("lock_p99_ms<=5"), Gate.parse("for_update:hold_p99_ms<=2")], results
    )
    assert [(g["expr"], g["strategy"], g["passed"]) for g in judged] == [
        ("lock_p99_ms<=5", "naive", True),
        ("lock_p99_ms<=5", "for_update", False),
        ("for_update:hold_p99_ms<=2", "for_update", False),
    ]


# -- checked before the run ----------------------------------------------------------------

KNOWN = ["naive", "for_update", "advisory"]


def test_a_misspelt_strategy_prefix_names_the_closest_one() -> None:
    with pytest.raises(
        UsageError, match=r"names strategy 'for_updte'.*'for_update:lock_p99_ms<=5'"
    ):
        check_gates([Gate.parse("for_updte:lock_p99_ms<=5")], ["for_update"], known=KNOWN)


def test_a_prefix_for_a_strategy_not_in_the_run_is_refused() -> None:
    with pytest.raises(UsageError, match="this run races for_update: add --strategy advisory"):
        check_gates([Gate.parse("advisory:lock_p99_ms<=5")], ["for_update"], known=KNOWN)
    with pytest.raises(
        UsageError, match=r"did you mean 'advisory:lock_p99_ms<=5' \(add --strategy"
    ):
        check_gates([Gate.parse("advisoyr:lock_p99_ms<=5")], ["for_update"], known=KNOWN)
    with pytest.raises(UsageError, match="drop the prefix"):
        check_gates([Gate.parse("zzz:lock_p99_ms<=5")], ["for_update"], known=KNOWN)
    check_gates([Gate.parse("for_update:lock_p99_ms<=5")], ["naive", "for_update"], known=KNOWN)


def test_a_running_target_is_gated_by_its_profile_name() -> None:
    with pytest.raises(UsageError, match="named after its profile, 'shop'"):
        check_gates([Gate.parse("for_update:lock_p99_ms<=5")], ["shop"], known=KNOWN,
                    profile_named=True)  # fmt: skip
    with pytest.raises(UsageError, match="did you mean 'shop:lock_p99_ms<=5'"):
        check_gates([Gate.parse("shpo:lock_p99_ms<=5")], ["shop"], known=KNOWN, profile_named=True)
    check_gates([Gate.parse("shop:lock_p99_ms<=5")], ["shop"], known=KNOWN, profile_named=True)


def test_baseline_gates_need_a_baseline_that_measured_their_metric(tmp_path: Path) -> None:
    gate = Gate.parse("lock_p99_ms<=1.5*baseline")
    with pytest.raises(UsageError, match="give --baseline FILE"):
        check_gates([gate], ["for_update"])
    with pytest.raises(UsageError, match="no such file; write one with --write-baseline"):
        Baseline.load(tmp_path / "missing.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(UsageError, match="not a readable JSON summary"):
        Baseline.load(tmp_path / "garbage.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(UsageError, match="no strategies in it"):
        Baseline.load(tmp_path / "empty.json")
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(summary_of({"for_update": result(8.0, 3.0, count=0)})))
    baseline = Baseline.load(path)
    with pytest.raises(UsageError, match="did not measure lock_p99_ms for for_update"):
        check_gates([gate], ["for_update"], baseline=baseline, mode="forced")
    with pytest.raises(UsageError, match="has no strategy 'naive'"):
        check_gates([gate], ["naive"], baseline=baseline, mode="forced")
    with pytest.raises(UsageError, match="measured in forced mode and this run is aligned"):
        check_gates([gate], ["for_update"], baseline=baseline, mode="aligned")
    with pytest.raises(UsageError, match="read only by gates like"):
        check_gates([Gate.parse("lock_p99_ms<=5")], ["for_update"], baseline=baseline)
    path.write_text(json.dumps(summary_of({"for_update": result(8.0, 3.0)})))
    check_gates([gate], ["for_update"], baseline=Baseline.load(path), mode="forced")


def test_a_baseline_is_written_only_from_a_valid_run(tmp_path: Path) -> None:
    path = tmp_path / "ci" / "baseline.json"
    run = summary_of({"for_update": {**result(8.0, 3.0), "plots": {"lock": {}}}})
    assert write_baseline(run, path) == f"baseline written to {path}"
    written = json.loads(path.read_text())
    assert written == baseline_of(run)
    assert "plots" not in written["strategies"]["for_update"]  # small enough to commit
    baseline = Baseline.load(path)
    assert (baseline.mode, baseline.measure("for_update", "lock_p99_ms")) == ("forced", 8.0)
    path.unlink()
    violated = summary_of({"naive": result(1.0, 1.0, valid=False)})
    assert "not written" in write_baseline(violated, path) and not path.exists()


def test_a_gate_on_a_metric_with_no_samples_is_not_measured_and_does_not_pass() -> None:
    empty = {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    result: dict[str, Any] = {"latency_ms": {"lock": {"client": empty, "all": empty}}}
    for expr in ("lock_p99_ms<=100", "lock_client_max_ms<=100", "request_p50_ms>=0"):
        judged = Gate.parse(expr).judge("for_update", result)
        assert judged["value"] is None and judged["passed"] is False, expr
    measured = {"count": 3, "p99": 4.0}
    judged = Gate.parse("lock_p99_ms<=100").judge(
        "for_update", {"latency_ms": {"lock": {"all": measured}}}
    )
    assert (judged["value"], judged["passed"]) == (4.0, True)
