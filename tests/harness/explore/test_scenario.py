"""explore.scenario: the request vocabulary, schedule ids and scenario files (no database)."""

from __future__ import annotations

from pathlib import Path

import pytest

from payrace.harness.explore.scenario import (
    APP_ISOLATION,
    KINDS,
    ScenarioError,
    ScheduleRef,
    StepSpec,
    app_name,
    decode_choices,
    encode_choices,
    load_scenario,
    normalise_isolation,
    parse_requests,
    parse_schedule_id,
    scenario_from_mapping,
)
from payrace.service.capture import STRATEGIES

ROOT = Path(__file__).resolve().parents[3]
SCENARIO_FILES = sorted((Path(__file__).parent / "scenarios").glob("*.toml")) + sorted(
    (ROOT / "scenarios").glob("*.toml")
)


def test_requests_are_labelled_as_the_history_names_its_processes() -> None:
    specs = parse_requests(["client", "webhook", "duplicate", "retry", "order.paid"])
    assert [s.label for s in specs] == ["client", "webhook-1", "webhook-2", "client-2", "webhook-3"]
    assert [s.step.kind for s in specs] == ["verify", "webhook", "webhook", "verify", "webhook"]
    duplicate = specs[2]
    assert duplicate.step.event == "payment.captured"
    assert duplicate.step.same_event_as == 1  # reuses webhook-1's X-Razorpay-Event-Id


def test_a_redelivery_repeats_the_event_under_a_new_id() -> None:
    specs = parse_requests(["client", "payment.authorized", "redelivery"])
    assert specs[2].step.event == "payment.authorized"
    assert specs[2].step.same_event_as is None


def test_who_calls_the_gateway_follows_the_capture_path() -> None:
    client, captured, authorized, failed = parse_requests(
        ["client", "webhook", "payment.authorized", "payment.failed"]
    )
    assert client.captures_at_gateway and authorized.captures_at_gateway
    assert not captured.captures_at_gateway and not failed.captures_at_gateway
    assert failed.marks_failed and not captured.marks_failed


def test_request_aliases_are_accepted() -> None:
    specs = parse_requests(["verify", "payment.captured", "webhook:order.paid"])
    assert [s.kind.token for s in specs] == ["client", "webhook", "order.paid"]


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (["client"], "at least two requests"),
        (["client", "refund"], "unknown request 'refund'"),
        (["client", "duplicate"], "no webhook comes before it"),
        (["client"] * 9, "at most 8"),
    ],
)
def test_bad_request_lists_say_what_to_write(tokens: list[str], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_requests(tokens)


def test_every_kind_has_its_own_id_letter() -> None:
    codes = [k.code for k in KINDS.values()]
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize(
    "choices", [(), (0,), (0, 0, 0, 1, 1, 0), (1,) * 12 + (0,) * 3, (0, 2, 1, 2, 2)]
)
def test_choices_round_trip(choices: tuple[int, ...]) -> None:
    assert decode_choices(encode_choices(choices)) == choices


def test_schedule_ids_are_short_and_round_trip() -> None:
    ref = ScheduleRef("naive", "READ COMMITTED", ("client", "webhook"), (0, 0, 0, 1, 1, 0, 1, 1))
    assert ref.id == "naive.rc.cw.a3b2ab2"
    assert parse_schedule_id(ref.id) == ref
    serializable = ScheduleRef(
        "for_update", "SERIALIZABLE", ("client", "webhook", "duplicate"), (2, 0)
    )
    assert parse_schedule_id(serializable.id) == serializable


def test_an_apps_ids_carry_its_name_and_no_isolation_level() -> None:
    """`payrace explore --app`: the app keeps its own isolation level, payrace sets none."""
    ref = ScheduleRef(app_name("Starlette-Shop v2"), APP_ISOLATION, ("client", "webhook"), (0, 1))
    assert ref.id == "starlette_shop_v2.app.cw.ab"
    assert parse_schedule_id(ref.id) == ref
    assert app_name("2shop") == "app_2shop"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("naive-rc-cw-a3", "not a schedule id"),
        ("naive.xx.cw.a3", "not a schedule id"),
        ("naive.rc.cz.a3", "unknown request code 'z'"),
        ("naive.rc.cw.a3c", "releases request 3 of 2"),
        ("naive.rc.cw.a1", "not in the form"),
        ("naive.rc.cw.a0", "at least 1"),
    ],
)
def test_malformed_ids_are_refused_with_an_example(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_schedule_id(text)


def test_isolation_levels_are_spelled_loosely() -> None:
    assert normalise_isolation("read_committed") == "READ COMMITTED"
    assert normalise_isolation("repeatable-read") == "REPEATABLE READ"
    assert normalise_isolation("sr") == "SERIALIZABLE"
    with pytest.raises(ScenarioError, match="unknown isolation level"):
        normalise_isolation("SNAPSHOT")


@pytest.mark.parametrize("path", SCENARIO_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_scenario_loads(path: Path) -> None:
    scenario = load_scenario(path, strategies=list(STRATEGIES))
    assert scenario.specs and scenario.path == path
    assert scenario.expect in ("valid", "violated")


def test_a_scenario_with_schedules_runs_only_those() -> None:
    doc = {
        "strategy": "naive",
        "requests": ["client", "webhook"],
        "schedule": [
            {"name": "seed", "steps": ["client:payment_read", "webhook-1", "client:end"]},
            {"id": "naive.rc.cw.a5b4", "expect": "valid"},
        ],
    }
    scenario = scenario_from_mapping(doc, "inline")
    assert scenario.mode == "schedules"
    assert scenario.isolation == "READ COMMITTED"
    first, second = scenario.schedules
    assert first.steps == (
        StepSpec("client", "payment_read"),
        StepSpec("webhook-1"),
        StepSpec("client", "end"),
    )
    assert second.id == "naive.rc.cw.a5b4" and second.expect == "valid"


def test_default_mode_follows_the_number_of_requests() -> None:
    two = scenario_from_mapping({"strategy": "naive"}, "inline")
    three = scenario_from_mapping(
        {"strategy": "naive", "requests": ["client", "webhook", "duplicate"]}, "inline"
    )
    assert (two.mode, three.mode) == ("exhaustive", "pct")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"strategy": "naive", "isolaton": "SERIALIZABLE"}, r"unknown key\(s\) \['isolaton'\]"),
        ({"strategy": "fastest"}, "strategy 'fastest' is unknown"),
        ({}, "missing key 'strategy'"),
        ({"strategy": "naive", "schedule": [{"steps": ["webhook:end"]}]}, "names no request"),
        (
            {"strategy": "naive", "schedule": [{"steps": ["client:paid"]}]},
            "unknown pause point 'paid'",
        ),
        ({"strategy": "naive", "schedule": [{"name": "x"}]}, "either steps"),
        (
            {"strategy": "naive", "schedule": [{"id": "for_update.rc.cw.a5b4"}]},
            "is for for_update",
        ),
        ({"strategy": "naive", "mode": "schedules"}, "needs at least one"),
        ({"strategy": "naive", "expect": "fine"}, "expect must be"),
        ({"strategy": "naive", "pct": {"depth": 0}}, "depth must be an integer"),
        ({"strategy": "naive", "pct": {"confidence": 1.5}}, "confidence must be between"),
        ({"strategy": "naive", "bound_s": 0}, "bound_s must be"),
    ],
)
def test_scenario_errors_name_the_key(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        scenario_from_mapping(doc, "inline.toml", strategies=list(STRATEGIES))


def test_an_unreadable_scenario_says_which_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("strategy = \n")
    with pytest.raises(ScenarioError, match=r"broken\.toml is not valid TOML"):
        load_scenario(broken)
    with pytest.raises(ScenarioError, match="cannot read scenario"):
        load_scenario(tmp_path / "missing.toml")
