"""explore.matrix: every strategy at every isolation level from the explorer (real
PostgreSQL, every schedule), and its verdict over the declared cells.

What is asserted is what the explorer measured with client + payment.authorized: naive is
caught at READ COMMITTED on both sides; above it PostgreSQL aborts the second writer, so no
row is written twice, but naive's gateway capture happened before the abort (gateway side
violated); for_update is valid at every level; serializable pins SERIALIZABLE and calls the
gateway again after its retry. explore_db and gateway come from conftest.py beside this file.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

from cli_inproc import payrace_cli

from payrace.harness.explore import matrix
from payrace.harness.explore.matrix import LEVELS, Cell, explore_matrix
from payrace.harness.infra.provider import Database

ROOT = Path(__file__).resolve().parents[3]


def _cells(db: Database, *strategies: str) -> dict[str, Cell]:
    return {c.key: c for c in asyncio.run(explore_matrix(db, strategies))}


def test_naive_is_caught_at_read_committed_and_for_update_is_valid_at_every_level(
    explore_db: Database,
) -> None:
    cells = _cells(explore_db, "naive", "for_update")
    assert [c.isolation for c in cells.values()] == [*LEVELS, *LEVELS]
    rc = cells["naive.rc"]
    assert (rc.found, rc.declared, rc.as_declared) == ("violated", "violated", True)
    assert rc.database > 0 and rc.gateway > 0 and rc.first_violation is not None
    assert rc.first_violation.startswith("naive.rc.ca.")
    for code in ("rr", "sr"):
        above = cells[f"naive.{code}"]
        # PostgreSQL aborts the second writer: no row twice.
        assert above.database == 0, above
        assert above.declared is None and above.as_declared is None  # measured, not judged
    # At REPEATABLE READ the aborted writer's re-run calls the gateway again; at SERIALIZABLE
    # the service commits the gateway's answer on the capture intent and the re-run reads it.
    assert cells["naive.rr"].gateway > 0 and cells["naive.sr"].gateway == 0
    for code in ("rc", "rr", "sr"):
        fixed = cells[f"for_update.{code}"]
        assert (fixed.found, fixed.violating, fixed.as_declared) == ("valid", 0, True), fixed
        assert fixed.schedules > 1 and fixed.waiting > 0 and fixed.complete
    summary = matrix.summary(list(cells.values()), run_id="m", command="payrace matrix",
                             requests=matrix.REQUESTS, database={}, started=0.0)  # fmt: skip
    assert (summary["verdict"], summary["exit_code"]) == ("as_declared", 0)


def test_a_strategy_pinning_its_level_is_shown_where_it_runs(explore_db: Database) -> None:
    [cell] = asyncio.run(explore_matrix(explore_db, ["serializable"], ["READ COMMITTED"]))
    assert (cell.isolation, cell.runs_at) == ("READ COMMITTED", "SERIALIZABLE")
    # Its claim decides the one gateway caller, and a re-run after a 40001 reads the gateway's
    # committed answer instead of asking again: exactly once on both sides.
    assert cell.database == 0 and cell.gateway == 0, cell
    assert cell.declared == "valid" and cell.found == "valid"


def _cell(strategy: str, isolation: str, found: str) -> Cell:
    return Cell(strategy=strategy, isolation=isolation, runs_at=isolation,
                declared=matrix.declared(strategy, isolation), found=found, schedules=9,
                violating=0 if found == "valid" else 3, database=0, gateway=0, other=0,
                waiting=1, complete=True, first_violation=None, checks={},
                duration_s=0.1)  # fmt: skip


def test_the_verdict_is_red_only_where_a_declared_cell_is_not_as_declared() -> None:
    def verdict(*cells: Cell) -> tuple[str, int]:
        s = matrix.summary(cells, run_id="m", command="c", requests=("client", "webhook"),
                           database={}, started=0.0)  # fmt: skip
        return s["verdict"], s["exit_code"]

    rc, rr = "READ COMMITTED", "REPEATABLE READ"
    assert verdict(_cell("naive", rc, "violated"), _cell("naive", rr, "valid")) == (
        "as_declared",
        0,
    )
    assert verdict(_cell("naive", rc, "valid")) == ("not_as_declared", 1)  # the bug not caught
    assert verdict(_cell("for_update", rr, "violated")) == ("not_as_declared", 1)
    # advisory is declared at READ COMMITTED only: its snapshot predates its lock above it.
    assert verdict(_cell("advisory", rr, "violated")) == ("as_declared", 0)
    assert verdict(_cell("advisory", rc, "violated")) == ("not_as_declared", 1)
    unfinished = replace(_cell("for_update", rc, "valid"), complete=False)
    assert verdict(unfinished) == ("error", 2)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`payrace matrix` in this process (cli_inproc: a new interpreter's imports spared)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYRACE_")}
    return payrace_cli("matrix", "--quiet", *args, env={**env, "COLUMNS": "250"})


def test_the_command_writes_one_verdict_everywhere(explore_db: Database, tmp_path: Path) -> None:
    done = _cli("-s", "naive,examples.team_strategy:NO_KEY_UPDATE", "--isolation", "rc",
                "--dsn", explore_db.url, "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    [run_dir] = list(tmp_path.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["verdict"] == "as_declared" and summary["levels"] == ["READ COMMITTED"]
    team = summary["cells"][1]
    # A strategy given by import path is not declared: measured and shown, not judged.
    assert team["strategy"] == "examples.team_strategy:NO_KEY_UPDATE" and team["found"] == "valid"
    page = (run_dir / "matrix.html").read_text()
    assert "verdict: as declared (exit code 0)" in page
    assert "verdict: as declared (exit code 0)" in done.stdout
    assert "Verdict: as declared (exit code 0)" in (run_dir / "matrix.md").read_text()


def test_usage_mistakes_exit_two_before_anything_starts(tmp_path: Path) -> None:
    for args, words in (
        (("-s", "no_such"), "no_such"),
        (("--isolation", "snapshot"), "choose READ COMMITTED"),
        (("--requests", "client"), "at least two requests"),
    ):
        done = _cli(*args, "--out", str(tmp_path))
        assert done.returncode == 2, done.stdout + done.stderr
        assert words in " ".join(done.stderr.split()) and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())
