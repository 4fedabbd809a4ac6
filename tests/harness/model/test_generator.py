"""model/generator.py: plans are a pure function of (seed, trial) and have the promised shape."""

from __future__ import annotations

import math

import pytest

from payrace.harness.model.generator import WEBHOOK_VARIANTS, Generator, Step

TRIALS = range(200)


def test_same_seed_and_trial_give_equal_plans_from_separate_generators() -> None:
    a = Generator(7, webhooks=4, jitter_ms=5.0)
    b = Generator(7, webhooks=4, jitter_ms=5.0)
    for trial in TRIALS:
        assert a.plan(trial) == b.plan(trial)


def test_a_plan_does_not_depend_on_which_trials_were_planned_before() -> None:
    gen = Generator(3, webhooks=3, jitter_ms=2.0)
    forwards = [gen.plan(t) for t in TRIALS]
    backwards = [gen.plan(t) for t in reversed(TRIALS)][::-1]
    assert forwards == backwards


def test_a_different_seed_gives_a_different_plan_somewhere() -> None:
    a = Generator(1, webhooks=4, jitter_ms=5.0)
    b = Generator(2, webhooks=4, jitter_ms=5.0)
    differing = [t for t in TRIALS if a.plan(t).steps != b.plan(t).steps]
    assert len(differing) > len(TRIALS) // 2


def test_different_trials_of_one_seed_differ() -> None:
    gen = Generator(1, webhooks=4)
    assert len({gen.plan(t).steps for t in TRIALS}) > 10


@pytest.mark.parametrize(("client", "webhooks"), [(True, 0), (True, 1), (True, 5), (False, 3)])
def test_step_count_is_client_plus_webhooks(client: bool, webhooks: int) -> None:
    gen = Generator(1, webhooks=webhooks, client=client)
    for trial in range(20):
        plan = gen.plan(trial)
        assert plan.trial == trial
        assert len(plan.steps) == int(client) + webhooks
        assert [s.kind for s in plan.steps] == ["verify"] * int(client) + ["webhook"] * webhooks


def test_processes_are_client_then_numbered_webhooks() -> None:
    steps = Generator(1, webhooks=3).plan(0).steps
    assert [s.process for s in steps] == ["client", "webhook-1", "webhook-2", "webhook-3"]
    assert steps[0].event is None
    assert steps[1].event == "payment.captured"
    assert steps[1].same_event_as is None


def test_first_webhook_carries_the_configured_event() -> None:
    steps = Generator(1, webhooks=2, first_event="payment.authorized").plan(0).steps
    assert steps[1].event == "payment.authorized"


@pytest.mark.parametrize("client", [True, False])
def test_duplicates_reuse_the_first_webhooks_index_and_event(client: bool) -> None:
    gen = Generator(5, webhooks=6, client=client)
    first = 1 if client else 0
    duplicates = [
        step for t in TRIALS for step in gen.plan(t).steps if step.same_event_as is not None
    ]
    assert duplicates, "200 trials of 5 extra webhooks drew no duplicate"
    for step in duplicates:
        assert step.same_event_as == first
        assert step.event == "payment.captured"
    for t in range(20):
        assert gen.plan(t).steps[first].kind == "webhook"


def test_extra_webhooks_draw_every_variant() -> None:
    gen = Generator(9, webhooks=4)
    events: set[str] = set()
    duplicates = redeliveries = 0
    for t in TRIALS:
        for step in gen.plan(t).steps[2:]:
            assert step.event in {"payment.captured", "order.paid", "payment.authorized"}
            events.add(step.event)
            if step.same_event_as is not None:
                duplicates += 1
            elif step.event == "payment.captured":
                redeliveries += 1
    assert events == {"payment.captured", "order.paid", "payment.authorized"}
    assert duplicates > 0 and redeliveries > 0
    assert len(WEBHOOK_VARIANTS) == 4


def test_without_jitter_every_offset_is_zero() -> None:
    gen = Generator(1, webhooks=4)
    assert {s.offset_ms for t in range(50) for s in gen.plan(t).steps} == {0.0}


def test_jitter_offsets_lie_within_zero_and_jitter_and_spread_out() -> None:
    gen = Generator(4, webhooks=3, jitter_ms=8.0)
    offsets = [s.offset_ms for t in TRIALS for s in gen.plan(t).steps]
    assert all(0.0 <= o <= 8.0 for o in offsets)
    assert min(offsets) < 1.0 and max(offsets) > 7.0
    assert len(set(offsets)) == len(offsets)


def test_describe_names_what_a_step_is() -> None:
    assert Step("client", "verify").describe() == "client callback"
    assert Step("webhook-1", "webhook", "order.paid").describe() == "order.paid"
    dup = Step("webhook-2", "webhook", "payment.captured", same_event_as=1)
    assert dup.describe() == "payment.captured (duplicate of step 1)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"webhooks": -1}, "between 0 and 16"),
        ({"webhooks": 17}, "between 0 and 16"),
        ({"webhooks": 0, "client": False}, "at least one request"),
        ({"jitter_ms": -0.5}, "jitter must be"),
        ({"jitter_ms": math.nan}, "jitter must be"),
        ({"jitter_ms": math.inf}, "jitter must be"),
    ],
)
def test_bad_arguments_raise_value_error_saying_what_is_wrong(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Generator(1, **kwargs)  # type: ignore[arg-type]


def test_boundary_arguments_are_accepted() -> None:
    assert len(Generator(1, webhooks=16).plan(0).steps) == 17
    assert len(Generator(1, webhooks=1, client=False).plan(0).steps) == 1
