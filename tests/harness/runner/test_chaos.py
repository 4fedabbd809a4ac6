"""The chaos campaign's plan: every fault of the registry, enough payments, judged as declared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from payrace.harness.errors import UsageError
from payrace.harness.infra.provider import Database
from payrace.harness.model import nemesis
from payrace.harness.model.nemesis import FAULTS, parse_spec
from payrace.harness.reports import chaos as chaos_report
from payrace.harness.runner import chaos
from payrace.harness.runner.config import RunConfig


def test_the_plan_has_a_run_per_registered_fault_and_enough_payments(tmp_path: Path) -> None:
    steps = chaos.plan(RunConfig(out_dir=tmp_path, run_id="c"))
    assert [s.fault for s in steps] == list(FAULTS)
    for step in steps:
        (fault,) = parse_spec(step.config.nemesis or "")  # a spec the run itself accepts
        assert fault.name == step.fault
        assert step.config.strategies == ["for_update", "naive"]
        assert step.config.run_id == f"c-{step.fault}"
    assert sum(s.config.trials for s in steps) >= chaos.MIN_PAYMENTS


def test_a_fault_added_to_the_registry_later_is_in_the_campaign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The campaign reads the registry: a fault it has no parameter for is injected at the
    registry's example value, within its range."""
    added = nemesis._Param("RATE", 0.0, 0.05, "a fault from another change", 0.2, "gateway")
    monkeypatch.setitem(FAULTS, "brand-new", added)
    assert chaos.parameter("brand-new") == 0.05  # the example's 0.2, clamped into the range
    steps = chaos.plan(RunConfig(out_dir=tmp_path, run_id="c"), payments=10 * len(FAULTS))
    assert "brand-new" in [s.fault for s in steps]
    assert all(s.config.trials == 10 for s in steps)  # 10 payments per fault


def test_faults_that_restart_what_payrace_owns_run_where_payrace_owns_it(tmp_path: Path) -> None:
    """A server named by --dsn is not payrace's to restart: restart-postgres runs on the
    embedded server payrace starts; restart-service on the service in its own process; the
    other faults keep the campaign's settings."""
    dsn = "postgresql://postgres@127.0.0.1:5432/postgres"
    steps = {s.fault: s.config for s in chaos.plan(RunConfig(out_dir=tmp_path, dsn=dsn))}
    assert steps["restart-postgres"].dsn is None
    assert steps["restart-service"].target == "http"
    assert steps["restart-service"].dsn == dsn
    assert steps["gateway-errors"].dsn == dsn and steps["gateway-errors"].target == "inproc"


def test_every_campaign_parameter_is_within_its_faults_range() -> None:
    for name, param in FAULTS.items():
        assert param.low <= chaos.parameter(name) <= param.high, name
    assert set(chaos.CAMPAIGN_PARAMETERS) <= set(FAULTS)


def test_a_fault_no_target_can_take_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: RunConfig) -> None:
        raise UsageError("needs something this machine lacks")

    monkeypatch.setattr(RunConfig, "validate", refuse)
    with pytest.raises(UsageError, match="fault gateway-errors cannot run in the campaign"):
        chaos.plan(RunConfig(out_dir=tmp_path, run_id="c"))


def _result(strategy: str, valid: Any, expected: str) -> dict[str, Any]:
    return {"valid": valid, "expected": expected, "trials": 5, "trials_done": 5, "checks": {}}


def _summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"run_id": "r", "mode": "forced", "duration_s": 1.0, "trials": 5,
            "strategies": results}  # fmt: skip


@pytest.mark.parametrize(
    ("naive", "for_update", "verdict", "exit_code"),
    [
        (False, True, "as_declared", 0),
        (True, True, "not_as_declared", 1),  # naive not caught under a fault
        (False, False, "not_as_declared", 1),  # the fix broke under a fault
        (False, "unknown", "not_as_declared", 1),  # not proven is not passed
    ],
)
def test_the_campaign_is_judged_against_the_declarations(
    tmp_path: Path, naive: Any, for_update: Any, verdict: str, exit_code: int
) -> None:
    steps = chaos.plan(RunConfig(out_dir=tmp_path, run_id="c"), payments=12)
    clean = {"for_update": ("valid", True), "naive": ("violated", False)}
    runs = [
        (step, _summary({s: _result(s, v, e) for s, (e, v) in clean.items()})) for step in steps
    ]
    runs[-1][1]["strategies"] = {
        "for_update": _result("for_update", for_update, "valid"),
        "naive": _result("naive", naive, "violated"),
    }
    merged = chaos.merge("c", runs)
    assert (merged["verdict"], merged["exit_code"]) == (verdict, exit_code)
    last = steps[-1].fault
    assert merged["strategies"][f"naive.{last}"]["fault"] == steps[-1].config.nemesis
    assert len(merged["strategies"]) == 2 * len(FAULTS)


@pytest.mark.slow
def test_payrace_chaos_small_campaign_end_to_end(pg: Database, tmp_path: Path) -> None:
    """`payrace chaos` with a few payments per fault: every fault of the registry runs, the
    fix holds and the bug is caught under each, the table reaches the README, and summary,
    JUnit and exit code agree."""
    readme = tmp_path / "README.md"
    readme.write_text(f"# shop\n\n{chaos_report.START}\nold\n{chaos_report.END}\nafter\n")
    # naive must be caught under every fault with this few payments. A killed backend can save
    # a naive payment (its retry reads what the other request committed): in the README's
    # campaign 169 of 223 were still double-captured, so three payments all saved happened
    # about once in 70 runs, more often on a loaded machine; five, about once in 1,200.
    per_fault = 5
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "payrace.harness.cli",
            "chaos",
            "--quiet",
            "--payments",
            str(per_fault * len(FAULTS)),
            "--readme",
            str(readme),
            "--out",
            str(tmp_path / "reports"),
        ],
        env={**os.environ, "PAYRACE_DSN": pg.url, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verdict: as declared (exit code 0)" in done.stdout
    (run_dir,) = (tmp_path / "reports").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["verdict"] == "as_declared"
    assert {r["fault"].split(":")[0] for r in summary["strategies"].values()} == set(FAULTS)
    for result in summary["strategies"].values():
        assert result["trials_done"] == per_fault
        wanted = result["strategy"] == "for_update"
        assert result["valid"] is wanted, (result["fault"], result["checks"])
    assert 'failures="0"' in (run_dir / "junit.xml").read_text()
    text = readme.read_text()
    assert text.startswith("# shop\n") and text.endswith(f"{chaos_report.END}\nafter\n")
    table = chaos_report.readme_table(text)
    assert table[0] == list(chaos_report.COLUMNS)
    assert len(table) == 2 + 2 * len(FAULTS) + 2
    assert (run_dir / "chaos.md").read_text().strip() in text
