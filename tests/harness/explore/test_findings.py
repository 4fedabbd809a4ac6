"""payrace.harness.explore.findings: what an exploration adds up to, judged and drawn (no database).

The runs here are written by hand, as Explorer.run() and Explorer.judge() would leave them;
the same code on real runs is covered by the golden scenarios in test_plan.py beside this file.
"""

from __future__ import annotations

from pathlib import Path

from payrace.harness.explore.findings import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_VIOLATED,
    ExploreResult,
    ScheduleRun,
)
from payrace.harness.explore.policies import PctBound
from payrace.harness.explore.scenario import Scenario, ScheduleRef, parse_requests
from payrace.harness.explore.scheduler import Wait
from payrace.harness.model import checker
from payrace.harness.model.client import Reply
from payrace.harness.reports.timeline import TimelineEvent

RC = "READ COMMITTED"
CHECK = "gateway_capture_once"


def _run(
    number: int,
    choices: tuple[int, ...],
    *,
    valid: checker.Validity = True,
    events: int = 4,
    waits: tuple[Wait, ...] = (),
    races: tuple[tuple[int, tuple[str, ...]], ...] = (),
) -> ScheduleRun:
    run = ScheduleRun(
        number=number,
        ref=ScheduleRef("naive", RC, ("client", "webhook"), choices),
        payment_id=100 + number,
        gateway_payment_id=f"pay_{number}",
        events=[
            TimelineEvent(i, "client" if i % 2 else "webhook-1", f"step {i} of run {number}")
            for i in range(events)
        ],
        replies={"client": Reply(200, {"status": "captured"}, {})},
        waits=list(waits),
        races=list(races),
    )
    run.valid = valid
    run.violated = (CHECK,) if valid is False else ()
    return run


def _result(runs: list[ScheduleRun], scenario: Scenario | None = None) -> ExploreResult:
    bad = [r for r in runs if r.valid is False]
    result = checker.CheckResult(CHECK, not bad, len(bad), len(runs))
    return ExploreResult(
        title="scenario test",
        strategy="naive",
        isolation=RC,
        specs=parse_requests(["client", "webhook"]),
        mode="exhaustive",
        runs=runs,
        verdict=checker.Verdict(result.valid, {CHECK: result}, frozenset()),
        duration_s=0.5,
        scenario=scenario,
    )


def test_the_shortest_violation_is_one_postgresql_did_not_decide() -> None:
    raced = _run(1, (0, 1), valid=False, events=3, races=((1, ("client", "webhook-1")),))
    long = _run(2, (0, 1, 0, 1), valid=False, events=8)
    short = _run(3, (0, 0, 1, 1), valid=False, events=6)
    result = _result([raced, long, short, _run(4, (1, 1), events=2)])
    assert result.shortest_violation() is short
    assert result.shown() == ("shortest violating schedule", short)
    assert result.by_checker() == {CHECK: 3}
    assert result.exit_code() == EXIT_VIOLATED


def test_golden_text_shows_a_raced_schedule_only_up_to_the_race() -> None:
    raced = _run(1, (0, 1, 1, 0), valid=False, races=((2, ("client", "webhook-1")),))
    text = _result([raced, _run(2, (1, 0)), _run(3, (0, 0, 1), valid=False)]).golden()
    assert "naive.rc.cw.ab…  race: client and webhook-1" in text
    assert "naive.rc.cw.ab2a" not in text  # what followed was the server's choice
    assert "schedules: 2 ·" in text and "1 more schedule(s), not counted above" in text
    assert "violating: 1" in text and "shortest violating schedule: naive.rc.cw.a2b" in text


def test_a_clean_exploration_draws_a_schedule_that_waited() -> None:
    wait = Wait("webhook-1", ("client",), "lock payment")
    waited = _run(2, (0, 1, 0), waits=(wait,))
    result = _result([_run(1, (0, 0, 1)), waited])
    what, run = result.shown() or ("", None)
    assert (what, run) == ("a schedule where webhook-1 waited for client", waited)
    fragment = result.html_fragment()
    assert fragment.startswith(
        "<h3>a schedule where webhook-1 waited for client: <code>naive.rc.cw.aba</code></h3>"
    )
    summary = result.summary(command="payrace explore", run_id="r", database={}, started_at="t")
    explore = summary["strategies"]["naive"]["explore"]
    assert explore["timeline_html"] == fragment and explore["waiting"] == 1
    assert summary["exit_code"] == EXIT_OK and summary["strategies"]["naive"]["valid"] is True
    assert _result([_run(1, (0, 1))]).html_fragment() == (
        '<p class="meta">no schedule violated a checker or waited for a lock</p>'
    )


def test_a_scenario_that_expects_the_violation_exits_zero() -> None:
    scenario = Scenario(
        "s", "naive", RC, ("client", "webhook"), "exhaustive", expect="violated",
        expect_checks=(CHECK,), path=Path("s.toml"),
    )  # fmt: skip
    assert _result([_run(1, (0, 1), valid=False)], scenario).exit_code() == EXIT_OK
    clean = _result([_run(1, (0, 1))], scenario)
    assert clean.exit_code() == EXIT_VIOLATED
    assert clean.mismatches() == [
        "scenario s: expected violated, got valid",
        f"scenario s: expected violations of ['{CHECK}'], got []",
    ]


def test_a_step_that_broke_the_step_table_makes_the_run_untrustworthy() -> None:
    run = _run(1, (0, 1), valid=False)
    run.guard = ["client: the step after txn_begun was assumed READ but did WRITE"]
    result = _result([run])
    assert result.exit_code() == EXIT_ERROR
    assert "payrace.harness.explore.steps.predict" in result.problems()[-1]
    assert "! schedule naive.rc.cw.ab: client: the step after" in result.golden()


def test_pct_header_states_the_bound() -> None:
    result = _result([_run(i, (0, 1)) for i in range(1, 6)])
    result.mode, result.bound = "pct", PctBound(n=2, k=4, d=2)
    assert "1/8" in result.header()[2] and "3 runs give" in result.header()[2]


def test_an_apps_exploration_names_its_points_and_how_to_replay() -> None:
    result = _result([_run(1, (0, 1), valid=False)])
    result.app, result.points = "shop.main:create_app", ("charge_read", "charge_written")
    result.replay_command = "payrace explore --app shop.main:create_app --profile shop.toml"
    assert "app naive · its own isolation level · requests client" in result.header()[1]
    assert result.header()[-1] == "pause points reached: charge_read, charge_written"
    assert result.problems() == [] and result.exit_code() == EXIT_VIOLATED
    summary = result.summary(command="c", run_id="r", database={}, started_at="t")
    assert summary["target"] == "app shop.main:create_app"
    assert summary["strategies"]["naive"]["explore"]["points"] == ["charge_read", "charge_written"]


def test_an_app_whose_requests_never_paused_cannot_be_trusted() -> None:
    result = _result([_run(1, (0, 1)), _run(2, (1, 0))])
    result.app = "shop.main:create_app"
    [problem] = result.problems()
    assert "no request reached a pause point" in problem and "shop.main:create_app" in problem
    assert result.exit_code() == EXIT_ERROR
