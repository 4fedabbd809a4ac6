from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_inproc import payrace_cli

from payrace.harness.bench.run import _bracket, _median_rounds, _ratios


def test_the_ratio_is_the_service_over_the_ceiling_and_absent_without_a_ceiling() -> None:
    service = {
        "for_update": {"1": {"captures_per_s": 50.0}, "2": {"captures_per_s": 80.0}},
        "naive": {"1": {"captures_per_s": 60.0}},
    }
    ratios = _ratios({"for_update": {"captures_per_s": 200.0}, "naive": {"error": "x"}}, service)
    assert ratios == {"for_update": {"1": 0.25, "2": 0.4}}


def test_the_bracketed_ceiling_is_the_median_of_its_runs_with_the_drift() -> None:
    one_round = {"captures_per_s": 8000.0, "clients": 4, "runs": [8000.0, 6000.0]}
    _bracket(one_round)
    assert one_round["before_captures_per_s"] == 8000.0
    assert one_round["after_captures_per_s"] == 6000.0
    assert one_round["captures_per_s"] == 7000.0  # the mean of before and after
    assert one_round["drift_percent"] == -25.0
    three = {"captures_per_s": 9000.0, "clients": 2, "runs": [9000.0, 5000.0, 7000.0, 9900.0]}
    _bracket(three)
    assert three["captures_per_s"] == 8000.0
    assert three["drift_percent"] == 10.0


def test_the_service_figure_is_the_round_of_median_captures_and_an_error_wins() -> None:
    rounds = [
        {"1": {"captures_per_s": 300.0, "p": "a"}, "2": {"captures_per_s": 50.0}},
        {"1": {"captures_per_s": 100.0, "p": "b"}, "2": {"error": "the load generator exited"}},
        {"1": {"captures_per_s": 200.0, "p": "c"}, "2": {"captures_per_s": 70.0}},
        {"1": {"captures_per_s": 400.0, "p": "d"}, "2": {"captures_per_s": 90.0}},
    ]
    chosen = _median_rounds(rounds)
    # Of four, the lower middle one: a round that ran, its other figures with it.
    assert chosen["1"]["p"] == "c"
    assert chosen["1"]["rounds_captures_per_s"] == [300.0, 100.0, 200.0, 400.0]
    assert chosen["2"]["error"] == "the load generator exited"
    assert _median_rounds([rounds[0]])["1"]["captures_per_s"] == 300.0


@pytest.mark.parametrize("rounds", ["0", "21"])
def test_rounds_out_of_range_is_a_usage_error(tmp_path: Path, rounds: str) -> None:
    done = payrace_cli("bench", "--quick", "--rounds", rounds, "--out", str(tmp_path))
    assert done.returncode == 2
    assert "--rounds must be between 1 and 20" in done.stderr
    assert not (tmp_path / "bench").exists()


def test_an_unknown_strategy_is_a_usage_error_before_anything_starts(tmp_path: Path) -> None:
    done = payrace_cli("bench", "--quick", "-s", "nope", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "unknown strategy nope" in done.stderr
    assert "for_update" in done.stderr
    assert not (tmp_path / "bench").exists()


@pytest.mark.slow
def test_quick_bench_writes_positive_figures_and_the_ratio_of_them(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PAYRACE_DSN", "PAYRACE_DATABASE_URL")}
    done = subprocess.run(
        [sys.executable, "-m", "payrace.harness.cli", "bench", "--quick", "--rounds", "2",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "bench").iterdir()
    report = json.loads((run_dir / "bench.json").read_text())
    text = (run_dir / "bench.md").read_text()
    ceiling = report["ceiling"]["for_update"]
    assert ceiling["captures_per_s"] > 0
    # Two rounds: the sweep's best, then pgbench again at that client count after each
    # round's service windows; the ratio's ceiling is the median of the three.
    assert ceiling["before_captures_per_s"] == max(ceiling["sweep_tps"].values())
    before, middle, after = ceiling["runs"]
    assert (before, after) == (ceiling["before_captures_per_s"], ceiling["after_captures_per_s"])
    assert middle > 0
    assert ceiling["captures_per_s"] == sorted(ceiling["runs"])[1]
    assert ceiling["statements_per_capture"] > 0
    assert (run_dir / ceiling["script"]).read_text().count("FOR UPDATE") >= 1
    for workers in ("1", "2"):
        service = report["service"]["for_update"][workers]
        for figure in ("captures_per_s", "request_p50_ms", "request_p99_ms", "lock_p50_ms",
                       "hold_p50_ms", "loadgen_cpu_s", "service_peak_rss_mib"):  # fmt: skip
            assert service[figure] > 0, figure
        assert service["request_p99_ms"] >= service["request_p50_ms"]
        assert service["failed"] == 0
        assert set(service["cpu"]["groups"]) >= {"service", "postgres", "load generator"}
        # Of two rounds, the lower: the one whose latencies and CPU shares are shown.
        assert service["captures_per_s"] == min(service["rounds_captures_per_s"])
        assert len(service["rounds_captures_per_s"]) == 2
        # --quick's 16 connections, split between the workers.
        assert service["pool_per_worker"] == 16 // int(workers)
        # Two workers get the 16 connections evenly (the load generator moves them), one
        # worker all of them without asking the kernel who holds what.
        split = [8, 8] if workers == "2" else []
        assert service["connections_per_worker"] == split
        spread = ", connections 8 / 8" if split else ""
        assert f"{workers} worker(s), pool {16 // int(workers)} per worker{spread}:" in text
        expected = round(service["captures_per_s"] / ceiling["captures_per_s"], 3)
        assert report["ratio"]["for_update"][workers] == expected
    harness = report["harness"]
    assert harness["forced"]["trials_per_s"] > 0
    assert harness["aligned"]["trials_per_s"] > 0
    assert harness["explore"]["schedules_per_s"] > 0
    assert harness["cold_run"]["exit"] == 0 and harness["cold_run"]["wall_s"] > 0
    assert harness["cold_run"]["payrace_peak_rss_mib"] > 0
    assert harness["instrumentation"]["cost_us_per_request"] > 0
    load_groups = report["load"]["cpu"]["groups"]
    assert load_groups["locust"]["cpu_s"] > 0
    assert load_groups["payrace (fake gateway)"]["cpu_s"] > 0
    assert str(report["ratio"]["for_update"]["1"]) in text
    assert " → ".join(str(run) for run in ceiling["runs"]) in text
    one_line = report["service"]["for_update"]["1"]
    assert ", ".join(str(r) for r in one_line["rounds_captures_per_s"]) in text
