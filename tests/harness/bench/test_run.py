from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_inproc import payrace_cli

from payrace.harness.bench.run import _bracket, _ratios


def test_the_ratio_is_the_service_over_the_ceiling_and_absent_without_a_ceiling() -> None:
    service = {
        "for_update": {"1": {"captures_per_s": 50.0}, "2": {"captures_per_s": 80.0}},
        "naive": {"1": {"captures_per_s": 60.0}},
    }
    ratios = _ratios({"for_update": {"captures_per_s": 200.0}, "naive": {"error": "x"}}, service)
    assert ratios == {"for_update": {"1": 0.25, "2": 0.4}}


def test_the_bracketed_ceiling_is_the_mean_of_before_and_after_with_the_drift() -> None:
    ceiling = {"captures_per_s": 8000.0, "clients": 4}
    _bracket(ceiling, 6000.0)
    assert ceiling["before_captures_per_s"] == 8000.0
    assert ceiling["after_captures_per_s"] == 6000.0
    assert ceiling["captures_per_s"] == 7000.0
    assert ceiling["drift_percent"] == -25.0


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
        [sys.executable, "-m", "payrace.harness.cli", "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "bench").iterdir()
    report = json.loads((run_dir / "bench.json").read_text())
    ceiling = report["ceiling"]["for_update"]
    assert ceiling["captures_per_s"] > 0
    # The sweep's best, measured again after the service's windows: the ratio's ceiling is
    # the mean of the two.
    assert ceiling["before_captures_per_s"] == max(ceiling["sweep_tps"].values())
    assert ceiling["after_captures_per_s"] > 0
    mean = (ceiling["before_captures_per_s"] + ceiling["after_captures_per_s"]) / 2
    assert ceiling["captures_per_s"] == round(mean, 1)
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
    text = (run_dir / "bench.md").read_text()
    assert str(report["ratio"]["for_update"]["1"]) in text
    assert f"{ceiling['before_captures_per_s']} → {ceiling['after_captures_per_s']}" in text
