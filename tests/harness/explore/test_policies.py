"""explore.policies: the depth-first prefix, explicit replays, PCT and its bound (no database)."""

from __future__ import annotations

import random

import pytest

from payrace.harness.explore.policies import Pct, PctBound, Prefix, next_prefix
from payrace.harness.explore.scenario import parse_requests
from payrace.harness.explore.scheduler import ScheduledRequest, ScheduleError
from payrace.harness.model.client import Prepared


def test_depth_first_search_takes_every_branch_once() -> None:
    # A tree where each decision offers (0, 1) for three steps: 8 leaves, each once.
    seen = []
    prefix: list[int] | None = []
    while prefix is not None:
        choices = list(prefix) + [0] * (3 - len(prefix))
        seen.append(tuple(choices))
        prefix = next_prefix([((0, 1), c) for c in choices])
    assert sorted(seen) == sorted({tuple((n >> i) & 1 for i in (2, 1, 0)) for n in range(8)})
    assert len(seen) == 8


def test_pct_bound_is_one_over_n_k_to_the_d_minus_one() -> None:
    bound = PctBound(n=3, k=20, d=3)
    assert bound.p == pytest.approx(1 / 1200)
    runs = bound.runs_for(0.95)
    assert bound.confidence(runs) >= 0.95 > bound.confidence(runs - 1)
    assert "1/1200" in bound.describe(100)
    assert PctBound(n=1, k=5, d=1).runs_for(0.99) == 1


def test_pct_is_seeded_and_changes_priority_at_its_change_points() -> None:
    def walk(seed: int) -> list[int]:
        pct = Pct(3, 12, 3, random.Random(seed))
        return [pct.choose([0, 1, 2], [0, 1, 2], []) for _ in range(12)]

    assert walk(5) == walk(5)
    pct = Pct(3, 12, 3, random.Random(5))
    assert sorted(pct.priority.values()) == [3, 4, 5]  # d .. d+n-1
    assert sorted(pct.changes.values()) == [1, 2]  # d-1 change points, below every start
    assert len({tuple(walk(s)) for s in range(20)}) > 1


def _requests(*states: str) -> list[ScheduledRequest]:
    specs = parse_requests(["client", "webhook"])
    reqs = [
        ScheduledRequest(i, s, Prepared("POST", "/", b"", {}, s.step.kind))
        for i, s in enumerate(specs)
    ]
    for r, state in zip(reqs, states, strict=True):
        r.state = state
    return reqs


def test_a_prefix_follows_its_choices_then_takes_the_lowest_candidate() -> None:
    reqs = _requests("parked", "parked")
    prefix = Prefix([1, 1])
    assert [prefix.choose([0, 1], [0, 1], reqs) for _ in range(3)] == [1, 1, 0]
    assert prefix.notes == [] and prefix.diverged_at is None
    drifting = Prefix([1])
    assert drifting.choose([0, 1], [0], reqs) == 0  # 1 was pruned: note where it diverged
    assert drifting.diverged_at == 1 and drifting.notes == ["step 1: 1 not among [0]"]


def test_a_replayed_id_that_releases_a_waiting_request_is_an_error() -> None:
    reqs = _requests("parked", "blocked")
    reqs[1].blocked_by = ("client",)
    with pytest.raises(ScheduleError, match="releases webhook-1, but it waits for client"):
        Prefix([1], exact=True).choose([0], [0], reqs)
