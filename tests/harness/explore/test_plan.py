"""explore.plan: golden scenarios, replay, collapsing, and the `payrace explore` command.

Golden files: golden/<scenario>.txt beside this file is what scenarios/<scenario>.toml explores
(ExploreResult.golden(): schedules, waits, verdicts, the timeline drawn). A change in the
service's behaviour shows as a diff; after checking it is intended, rewrite them with
`PAYRACE_UPDATE_GOLDEN=1 pytest tests/harness/explore/test_plan.py -k golden`.
explore_db and gateway come from conftest.py beside this file.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console

from payrace.harness.explore.findings import EXIT_ERROR, EXIT_OK, EXIT_VIOLATED
from payrace.harness.explore.plan import Plan, execute, explore_main, make_plan
from payrace.harness.explore.scenario import parse_schedule_id
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.infra.provider import Database
from payrace.service.strategies import names as strategy_names

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
SCENARIOS = sorted((HERE / "scenarios").glob("*.toml"))
RC = "READ COMMITTED"


def _plan(
    strategy: str, isolation: str = RC, requests: tuple[str, ...] = ("client", "webhook")
) -> Plan:
    return make_plan(
        strategy=strategy,
        requests=list(requests),
        isolation=isolation,
        pct_runs=None,
        depth=2,
        seed=1,
        replay=None,
        scenario=None,
    )


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
async def test_golden_scenario(
    path: Path, explore_db: Database, gateway: tuple[FakeRazorpay, str]
) -> None:
    fake, url = gateway
    plan = make_plan(strategy="", requests=[], isolation="", pct_runs=None, depth=2, seed=1,
                     replay=None, scenario=path)  # fmt: skip
    result = await execute(plan, explore_db, fake, url)
    text = result.golden()
    golden = GOLDEN / f"{path.stem}.txt"
    if os.environ.get("PAYRACE_UPDATE_GOLDEN"):
        golden.write_text(text, encoding="utf-8")
    assert golden.exists(), f"no {golden}; create it with PAYRACE_UPDATE_GOLDEN=1"
    expected = golden.read_text(encoding="utf-8")
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(True), text.splitlines(True), str(golden), "this run"
        )
    )
    assert text == expected, f"behaviour changed:\n{diff}"
    assert result.mismatches() == [] and result.problems() == []
    assert result.exit_code() == EXIT_OK


async def test_a_replay_reruns_exactly_the_schedule(
    explore_db: Database, gateway: tuple[FakeRazorpay, str]
) -> None:
    fake, url = gateway
    found = await execute(_plan("naive"), explore_db, fake, url)
    shortest = found.shortest_violation()
    assert shortest is not None
    ref = parse_schedule_id(shortest.id)
    replayed = await execute(Plan(_plan("naive").scenario, ref), explore_db, fake, url)
    [again] = replayed.runs
    assert again.id == shortest.id
    assert [(e.process, e.text) for e in again.events] == [
        (e.process, e.text) for e in shortest.events
    ]
    assert again.violated == shortest.violated != ()


async def test_an_id_this_service_cannot_follow_is_an_error_not_a_verdict(
    explore_db: Database, gateway: tuple[FakeRazorpay, str]
) -> None:
    fake, url = gateway
    # The webhook waits for the client's lock after its first step; a second webhook step
    # right away cannot be taken.
    ref = parse_schedule_id("for_update.rc.cw.ab2a5")
    result = await execute(Plan(_plan("for_update").scenario, ref), explore_db, fake, url)
    [run] = result.runs
    assert run.error is not None and "releases webhook-1, but it waits for client" in run.error
    assert result.exit_code() == EXIT_ERROR


async def test_collapsing_keeps_every_outcome(
    explore_db: Database, gateway: tuple[FakeRazorpay, str]
) -> None:
    """The reduction drops only schedules equivalent to explored ones: the full search
    (every interleaving of the non-local steps) reaches no outcome the reduced one misses."""
    fake, url = gateway
    plan = _plan("naive")
    reduced = await execute(plan, explore_db, fake, url)
    full = await execute(Plan(replace(plan.scenario, reduce=False)), explore_db, fake, url)
    assert len(full.runs) > 2 * len(reduced.runs)
    outcomes = {(o, v) for o, v, _ in reduced.outcomes()}
    assert outcomes == {(o, v) for o, v, _ in full.outcomes()}
    assert {r.id for r in reduced.runs} <= {r.id for r in full.runs}
    assert reduced.complete and full.complete


# -- the command ----------------------------------------------------------------------------


def _main(pg: Database, out: Path, **kw: object) -> tuple[int, str]:
    console = Console(record=True, width=110, force_terminal=False)
    args: dict[str, object] = {
        "strategy": "naive",
        "requests": ["client", "webhook"],
        "isolation": RC,
        "pct_runs": None,
        "depth": 2,
        "seed": 1,
        "replay": None,
        "scenario": None,
        "dsn": pg.url,
        "out_dir": out,
        "console": console,
    }
    args.update(kw)
    code = explore_main(**args)  # type: ignore[arg-type]
    return code, console.export_text()


def test_explore_naive_finds_the_double_capture_and_prints_the_schedule(
    pg: Database, tmp_path: Path
) -> None:
    code, text = _main(pg, tmp_path)
    assert code == EXIT_VIOLATED
    assert "shortest violating schedule: naive.rc.cw." in text
    assert text.count("read payment (pending)") >= 2
    assert "single_capture_write: 8 schedule(s)" in text
    assert "replay it: payrace explore --replay naive.rc.cw." in text
    [run_dir] = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    result = summary["strategies"]["naive"]
    assert summary["mode"] == "explore" and summary["exit_code"] == EXIT_VIOLATED
    assert result["valid"] is False and result["violating_trials"] == 8
    assert result["explore"]["schedules"] == 10 and result["explore"]["complete"] is True
    assert "read payment (pending)" in (run_dir / "report.html").read_text()
    assert '<table class="timeline">' in (run_dir / "timeline.html").read_text()
    assert (run_dir / "junit.xml").exists() and (run_dir / "explore.txt").exists()

    shortest = result["first_violation"]["schedule_id"]
    code, replayed = _main(pg, tmp_path / "replay", replay=shortest, strategy="ignored")
    assert code == EXIT_VIOLATED
    assert f"shortest violating schedule: {shortest}" in replayed


def test_explore_for_update_is_valid_and_shows_the_webhook_waiting(
    pg: Database, tmp_path: Path
) -> None:
    code, text = _main(pg, tmp_path, strategy="for_update")
    assert code == EXIT_OK
    assert "with a lock wait: 8" in text and "violating: 0" in text
    assert "a schedule where webhook-1 waited for client" in text
    assert "lock payment <waiting>" in text and "<completed> read payment (captured)" in text
    [run_dir] = tmp_path.iterdir()
    report = (run_dir / "report.html").read_text()
    assert "<h3>a schedule where webhook-1 waited for client: <code>for_update.rc.cw." in report
    assert "lock payment &lt;waiting&gt;" in report


def test_explore_with_a_scenario_exits_zero_when_it_goes_as_expected(
    pg: Database, tmp_path: Path
) -> None:
    code, text = _main(pg, tmp_path, scenario=HERE / "scenarios" / "seed.toml")
    assert code == EXIT_OK
    assert "record event id <waiting>" in text and "verdict: as declared (exit code 0)" in text


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"strategy": "fastest"}, "unknown strategy fastest"),
        ({"requests": ["client"]}, "at least two requests"),
        ({"replay": "not-an-id"}, "not a schedule id"),
        ({"replay": "naive.rc.cw.a5b4", "scenario": Path("x.toml")}, "either --replay"),
        ({"scenario": Path("/nonexistent/x.toml")}, "cannot read scenario"),
        ({"dsn": "mysql://nope"}, "is not a PostgreSQL URL"),
    ],
)
def test_usage_errors_exit_two_and_say_what_to_do(
    pg: Database, tmp_path: Path, kw: dict[str, object], message: str
) -> None:
    code, text = _main(pg, tmp_path, **kw)
    assert code == EXIT_ERROR
    assert message in " ".join(text.split())


class _Replay(HTMLParser):
    """The replay command(s) report.html shows: <p class="... replay"><code>CMD</code>."""

    def __init__(self) -> None:
        super().__init__()
        self.commands: list[str] = []
        self._in = 0  # 1 inside p.replay, 2 inside its <code>

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "p" and "replay" in (dict(attrs).get("class") or "").split():
            self._in = 1
        elif tag == "code" and self._in == 1:
            self._in = 2
            self.commands.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "code" and self._in == 2:
            self._in = 1
        elif tag == "p":
            self._in = 0

    def handle_data(self, data: str) -> None:
        if self._in == 2:
            self.commands[-1] += data


def _replay_commands(report: Path) -> list[str]:
    parser = _Replay()
    parser.feed(report.read_text(encoding="utf-8"))
    return parser.commands


def test_the_reports_replay_command_run_as_printed_replays_the_schedule_and_verdict(
    pg: Database, tmp_path: Path
) -> None:
    code, _ = _main(pg, tmp_path / "found")
    [run_dir] = (tmp_path / "found").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    first = summary["strategies"]["naive"]["first_violation"]
    [command] = _replay_commands(run_dir / "report.html")
    assert command == f"payrace explore --replay {first['schedule_id']}" == first["replay"]
    assert first["schedule_id"] in (run_dir / "report.html").read_text()

    # Exactly as printed: the database from the environment, reports under ./reports.
    here = tmp_path / "replay"
    here.mkdir()
    bin_dir = str(Path(sys.executable).parent)
    path = bin_dir + os.pathsep + os.environ["PATH"]  # `payrace` is this venv's
    env = {**os.environ, "PAYRACE_DSN": pg.url, "PATH": path}
    done = subprocess.run(
        shlex.split(command), cwd=here, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == code == EXIT_VIOLATED, done.stdout + done.stderr
    [replayed_dir] = (here / "reports").iterdir()
    replayed = json.loads((replayed_dir / "summary.json").read_text())
    again = replayed["strategies"]["naive"]
    assert replayed["verdict"] == summary["verdict"] == "violated"
    assert again["trials"] == 1 and again["first_violation"]["schedule_id"] == first["schedule_id"]
    assert [(e["process"], e["text"]) for e in again["first_violation"]["timeline"]] == [
        (e["process"], e["text"]) for e in first["timeline"]
    ]
    assert _replay_commands(replayed_dir / "report.html") == [command]


def test_a_schedule_that_only_waited_is_shown_with_its_replay_command(
    pg: Database, tmp_path: Path
) -> None:
    code, _ = _main(pg, tmp_path, strategy="for_update")
    [run_dir] = tmp_path.iterdir()
    explore = json.loads((run_dir / "summary.json").read_text())["strategies"]["for_update"][
        "explore"
    ]
    shown = explore["shown"]
    assert code == EXIT_OK and shown["what"].startswith("a schedule where webhook-1 waited")
    assert _replay_commands(run_dir / "report.html") == [
        f"payrace explore --replay {shown['schedule_id']}"
    ]


THREE = ("client", "webhook", "webhook")  # the callback and two payment.captured webhooks


@pytest.mark.parametrize("strategy", strategy_names())
async def test_pct_with_three_requests_catches_naive_and_no_other_strategy(
    strategy: str, explore_db: Database, gateway: tuple[FakeRazorpay, str]
) -> None:
    """PCT (three requests: the callback and two webhooks with their own event ids) over
    every built-in strategy: naive is caught, every other one is valid in every run."""
    fake, url = gateway
    plan = make_plan(strategy=strategy, requests=list(THREE), isolation=RC, pct_runs=30,
                     depth=2, seed=1, replay=None, scenario=None)  # fmt: skip
    assert plan.scenario.mode == "pct"
    result = await execute(plan, explore_db, fake, url)
    assert result.bound is not None and result.bound.n == 3
    assert result.problems() == []
    if strategy == "naive":
        assert result.verdict.valid is False and result.violating()
        assert result.exit_code() == EXIT_VIOLATED
    else:
        assert result.verdict.valid is True, result.by_checker()
        assert len(result.runs) >= 30
        # Schedules really interleaved: some request waited for a lock (nowait never waits,
        # its loser answers 409 at once).
        assert bool(result.waiting()) is (strategy != "nowait")
        assert result.exit_code() == EXIT_OK
