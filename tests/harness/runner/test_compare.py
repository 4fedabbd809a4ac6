"""runner.compare: `payrace compare` end to end (real PostgreSQL, real strategies), and the
"which to pick when" rules on measured rows.

The verdict follows the one-verdict rule: exit 0 iff every strategy is what it is declared to
be, and summary.json, compare.html and the console say the same.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cli_inproc import payrace_cli

from payrace.harness.infra.provider import Database
from payrace.harness.model.history import History
from payrace.harness.runner.compare import Row, advice, merge, rows

ROOT = Path(__file__).resolve().parents[3]


def _compare(pg: Database, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`payrace compare` in this process (cli_inproc: a new interpreter's imports spared)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYRACE_")}
    return payrace_cli(
        "compare", "--dsn", pg.url, "--out", str(out), "--quiet", *args,
        env={**env, "COLUMNS": "300"},
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
    assert "--mode jitter: compare runs forced, aligned, explore, load (or all)" in (
        " ".join(done.stderr.split())
    )
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def _row(strategy: str, mode: str, found: str = "valid", **kw: Any) -> Row:
    fields: dict[str, Any] = {
        "declared": "valid", "trials": 10, "violations": 0, "trials_per_s": 10.0,
        "captures_per_s": 10.0, "request_p50": None, "request_p99": None,
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


def test_advice_under_load_picks_by_captures_and_answers() -> None:
    lines = advice([
        _row("a", "load", captures_per_s=30.0, request_p99=90.0, lock_p99=40.0),
        _row("b", "load", captures_per_s=20.0, request_p99=60.0, lock_p99=50.0),
    ])  # fmt: skip
    assert (
        "the most payments captured per second under load: a (captures per s 30.00/s in load)"
        in lines
    )
    assert "the quickest answers under load: b (request p99 60.00 ms in load)" in lines
    assert "the least lock waiting under load: a (lock p99 40.00 ms in load)" in lines


def test_rows_say_per_mode_what_was_measured_and_what_was_not() -> None:
    history = History(strategy="s")
    sent = history.invoke("verify", "client", 0, 1, {})
    history.complete(sent, "ok", value={}, status=200)
    run = {"valid": True, "trials": 1, "trials_per_second": 4.0, "_history": history}
    load = {
        "valid": True, "trials": 9, "trials_per_second": 3.0, "captures_per_second": 2.5,
        "latency_ms": {"request": {"all": {"p50": 11.0, "p99": 40.0}}},
        "conflicts": {"answered_409": 3}, "gateway_capture_calls": None,
    }  # fmt: skip
    explore = {"valid": True, "trials": 20, "trials_per_second": 8.0, "explore": {"races": []}}
    merged = merge("r", [("forced", {"duration_s": 1, "strategies": {"s": dict(run)}}),
                         ("aligned", {"duration_s": 1, "strategies": {"s": dict(run)}}),
                         ("load", {"duration_s": 1, "strategies": {"s": load}}),
                         ("explore", {"duration_s": 1, "strategies": {"s": explore}})])  # fmt: skip
    got = {r.mode: r for r in rows(merged)}
    # forced: the harness holds each request, so its request time says nothing
    assert got["forced"].request_p99 is None and got["forced"].captures_per_s == 4.0
    assert got["aligned"].request_p99 is not None and got["aligned"].request_p99 >= 0
    assert (got["load"].request_p50, got["load"].request_p99) == (11.0, 40.0)
    assert got["load"].captures_per_s == 2.5 and got["load"].answered_409 == 3
    assert got["load"].gateway_calls == 0  # not counted: a run without the gateway's counters
    assert got["explore"].captures_per_s is None and got["explore"].lock_p99 is None


@pytest.mark.slow
def test_compare_in_explore_and_load_modes_with_a_strategy_by_import_path(
    pg: Database, tmp_path: Path
) -> None:
    """Short and bounded: 5 PCT runs, 3 s of Locust with 2 users per strategy."""
    team = "examples.team_strategy:NO_KEY_UPDATE"
    done = _compare(pg, tmp_path, "-s", f"naive,{team}", "--mode", "explore,load",
                    "--pct", "5", "-t", "3s", "-u", "2", "-r", "10")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary, page = _report(tmp_path)
    assert summary["verdict"] == "as_declared"
    got = {(r["strategy"], r["mode"]): r for r in summary["compare"]["rows"]}
    assert set(got) == {(s, m) for s in ("naive", team) for m in ("explore", "load")}
    assert got[("naive", "explore")]["found"] == "violated"
    assert got[("naive", "load")]["found"] == "violated"
    for mode in ("explore", "load"):
        row = got[(team, mode)]
        assert (row["declared"], row["found"], row["violations"]) == ("valid", "valid", 0), row
        assert row["trials"] > 0 and row["gateway_calls"] > 0
    explored = summary["strategies"][f"{team}.explore"]["explore"]["races"]
    assert [r["requests"] for r in explored] == [
        ["client", "webhook"],
        ["client", "webhook", "webhook"],
    ]
    assert explored[1]["schedules"] >= 5
    loaded = got[(team, "load")]
    assert loaded["request_p99"] is not None and loaded["lock_p99"] is not None
    assert loaded["captures_per_s"] is not None and loaded["captures_per_s"] > 0
    assert "verdict: as declared (exit code 0)" in page and "verdict: as declared" in done.stdout
    assert "load: race_pairs, 2 users" in page
