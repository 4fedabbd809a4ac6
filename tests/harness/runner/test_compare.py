"""runner.compare: `payrace compare` end to end (real PostgreSQL, real strategies), and the
"which to pick when" rules on measured rows.

The verdict follows the one-verdict rule: exit 0 iff every strategy is what it is declared to
be, and summary.json, compare.html and the console say the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from payrace.harness.infra.provider import Database
from payrace.harness.runner.compare import Row, advice, merge

ROOT = Path(__file__).resolve().parents[3]


def _compare(pg: Database, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYRACE_")}
    return subprocess.run(
        [sys.executable, "-m", "payrace.harness.cli", "compare", "--dsn", pg.url,
         "--out", str(out), "--quiet", *args],
        env={**env, "COLUMNS": "300"}, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _report(out: Path) -> tuple[dict[str, Any], str]:
    [run_dir] = [p for p in out.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary, (run_dir / "compare.html").read_text()


def test_compare_is_as_declared_with_naive_caught_and_says_what_to_pick(
    pg: Database, tmp_path: Path
) -> None:
    # Aligned races are released together, not forced: enough trials that naive is caught.
    done = _compare(pg, tmp_path, "-s", "naive,for_update,optimistic,nowait", "--trials", "12")
    assert done.returncode == 0, done.stdout + done.stderr
    summary, page = _report(tmp_path)
    assert summary["verdict"] == "as_declared" and summary["exit_code"] == 0
    rows = summary["compare"]["rows"]
    assert {(r["strategy"], r["mode"]) for r in rows} == {
        (s, m)
        for s in ("naive", "for_update", "optimistic", "nowait")
        for m in ("forced", "aligned")
    }
    naive_forced = next(r for r in rows if (r["strategy"], r["mode"]) == ("naive", "forced"))
    assert naive_forced["found"] == "violated" and naive_forced["violations"] == 12
    advice_lines = summary["compare"]["advice"]
    assert advice_lines[0].startswith("never naive: ")
    assert any(line.startswith("nowait only where clients retry a 409") for line in advice_lines)
    assert "verdict: as declared (exit code 0)" in done.stdout
    assert "verdict: as declared (exit code 0)" in page and "never naive" in page
    assert page.count("<svg") == 4  # lock wait and hold CDFs, per mode


def test_compare_exits_one_when_a_strategy_is_not_as_declared(pg: Database, tmp_path: Path) -> None:
    """A team's strategy given by path is expected valid; FOR_SHARE deadlocks: not as declared."""
    done = _compare(pg, tmp_path, "-s", "for_update,examples.team_strategy:FOR_SHARE",
                    "--mode", "forced", "--trials", "4")  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    summary, page = _report(tmp_path)
    assert summary["verdict"] == "not_as_declared" and summary["exit_code"] == 1
    assert summary["verdict_reasons"] == [
        "examples.team_strategy:FOR_SHARE.forced: declared valid, found violated"
    ]
    assert "verdict: not as declared (exit code 1)" in done.stdout
    assert "verdict: not as declared (exit code 1)" in page
    assert '<tr class="bad">' in page


def test_compare_refuses_a_mode_it_does_not_run(pg: Database, tmp_path: Path) -> None:
    done = _compare(pg, tmp_path, "--mode", "jitter")
    assert done.returncode == 2
    assert "--mode jitter: compare runs forced and aligned" in done.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def _row(strategy: str, mode: str, found: str = "valid", **kw: Any) -> Row:
    fields: dict[str, Any] = {
        "declared": "valid", "trials": 10, "violations": 0, "trials_per_s": 10.0,
        "lock_p50": 1.0, "lock_p99": 5.0, "lock_max": 6.0, "hold_p50": 2.0, "hold_p99": 8.0,
        "answered_409": 0, "retried_409": 0, "serialization_failures": 0, "deadlocks": 0,
        "gateway_calls": 10,
    }  # fmt: skip
    fields.update(kw)
    return Row(strategy=strategy, mode=mode, found=found, **fields)


def test_advice_picks_by_the_figures_and_never_an_unsafe_strategy() -> None:
    rows = [
        _row("a", "forced", lock_p99=3.0, hold_p99=9.0),
        _row("a", "aligned", trials_per_s=50.0),
        _row("b", "forced", lock_p99=4.0, hold_p99=2.0, answered_409=5),
        _row("b", "aligned", trials_per_s=20.0),
        _row("bad", "forced", found="violated", violations=7, lock_p99=0.1, hold_p99=0.1),
        _row("bad", "aligned", found="valid", trials_per_s=99.0),
    ]
    lines = advice(rows)
    assert lines[0] == "never bad: 7 violating trial(s) of 20 (forced violated, aligned valid)"
    assert "the least waiting when requests collide: a (lock p99 3.00 ms in forced)" in lines
    assert "the shortest lock hold (least blocking of others): b (hold p99 2.00 ms in forced)" in (
        lines
    )
    assert "the most payments raced per second: a (trials per s 50.00/s in aligned)" in lines
    assert "clients that cannot retry (no 409 answered, no attempt aborted): a" in lines
    assert "b only where clients retry a 409: 5 answered over 20 trials (25 per 100)" in lines


def test_advice_recommends_nothing_when_nothing_is_valid() -> None:
    lines = advice([_row("x", "forced", found="unknown")])
    assert lines[-1] == "no strategy was valid in every mode: nothing to recommend"


def test_advice_names_a_strategy_that_calls_the_gateway_twice() -> None:
    lines = advice([_row("s", "forced", gateway_calls=13, serialization_failures=4)])
    assert "s calls the gateway more than once per payment: 13 capture calls for 10 payments" in (
        lines
    )
    assert any(line.startswith("s repeats database work: 4 attempt(s)") for line in lines)


def test_merge_expects_a_strategy_given_by_path_to_be_valid() -> None:
    result = {"valid": False, "expected": None, "trials": 1, "violating_trials": 1}
    summary = {"duration_s": 1.0, "strategies": {"pkg.mod:X": dict(result)}}
    merged = merge("r", [("forced", summary)])
    assert merged["strategies"]["pkg.mod:X.forced"]["expected"] == "valid"
    assert merged["exit_code"] == 1 and merged["verdict"] == "not_as_declared"
