"""examples/team_strategy.py: a team's own strategy, chosen by import path, raced through the
`payrace run`, `payrace explore` and `payrace load` commands (`payrace compare` and
`payrace matrix`: their own tests) as a user types them (from the checkout's root,
where `examples` is found, as uvicorn finds a team's package)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from payrace.harness.infra.provider import Database

ROOT = Path(__file__).resolve().parents[2]
PAYRACE = str(Path(sys.executable).with_name("payrace"))
VALID = "examples.team_strategy:NO_KEY_UPDATE"
CAUGHT = "examples.team_strategy:FOR_SHARE"


def _payrace(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PAYRACE, *args, "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def _words(done: subprocess.CompletedProcess[str]) -> str:
    return " ".join((done.stdout + done.stderr).split())  # the console wraps long messages


def _summary(out: Path) -> dict[str, object]:
    [run_dir] = [p for p in out.iterdir() if p.is_dir()]
    loaded: dict[str, object] = json.loads((run_dir / "summary.json").read_text())
    return loaded


def test_run_races_a_strategy_given_by_import_path(pg: Database, tmp_path: Path) -> None:
    done = _payrace("run", "-s", VALID, "--trials", "8", "--dsn", pg.url,
                    "--out", str(tmp_path / "valid"))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    strategies = _summary(tmp_path / "valid")["strategies"]
    assert isinstance(strategies, dict) and strategies[VALID]["valid"] is True


def test_run_catches_the_teams_broken_strategy(pg: Database, tmp_path: Path) -> None:
    done = _payrace("run", "-s", CAUGHT, "--trials", "8", "--dsn", pg.url,
                    "--out", str(tmp_path / "caught"))  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    strategies = _summary(tmp_path / "caught")["strategies"]
    assert isinstance(strategies, dict)
    assert strategies[CAUGHT]["checks"]["no_deadlock"]["valid"] is False


def test_explore_every_schedule_of_a_strategy_given_by_import_path(
    pg: Database, tmp_path: Path
) -> None:
    done = _payrace("explore", "--strategy", VALID, "--dsn", pg.url, "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "violating: 0" in done.stdout and "every schedule" in done.stdout


@pytest.mark.slow
def test_load_races_a_strategy_given_by_import_path(pg: Database, tmp_path: Path) -> None:
    """Locust against the reference service running the team's strategy, judged by the gate;
    short and bounded (3 s, 2 users). The service names it as its Strategy.name."""
    done = _payrace("load", "--strategy", VALID, "-u", "2", "-r", "10", "-t", "3s",
                    "--dsn", pg.url, "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = _summary(tmp_path)
    strategies = summary["strategies"]
    assert isinstance(strategies, dict) and list(strategies) == ["no_key_update"]
    result = strategies["no_key_update"]
    assert result["valid"] is True and result["trials"] > 0
    assert "--strategy examples.team_strategy:NO_KEY_UPDATE" in str(summary["command"])


def test_a_strategy_path_that_does_not_import_is_a_usage_error() -> None:
    done = _payrace("run", "-s", "examples.no_such_module:X", "--trials", "1")
    assert done.returncode == 2
    assert "cannot import examples.no_such_module" in _words(done)
    done = _payrace("explore", "--strategy", "examples.team_strategy:read_for_share")
    assert done.returncode == 2
    assert "is a function, not a payrace.service.capture.Strategy" in _words(done)
