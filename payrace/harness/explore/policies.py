"""Schedule policies: which runnable request the Scheduler releases next.

    Policy          the protocol explore.scheduler's Scheduler.drive() asks
    ├── Prefix          follow a choice sequence, then the lowest candidate (exhaustive
    │                   search, next_prefix() gives the next branch; exact: replay an id)
    ├── Steps           an explicit schedule ("client:payment_read", "webhook-1:end", ...)
    └── Pct             PCT: random priorities, d-1 change points, seeded
    next_prefix()   the next branch of the depth-first search over decisions
    PctBound        n, k, d -> p = 1/(n*k^(d-1)) and the runs a confidence needs

A policy sees the runnable requests and the candidates the Scheduler left after pruning
equivalent schedules (by explore.steps.dependent); Prefix chooses among the candidates (an
exact replay among every runnable request), Steps and Pct among every runnable request.
explore.engine picks the policy for each mode: exhaustive, PCT, explicit schedules, replay;
explore.findings reports a PctBound.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from payrace.harness.explore.scenario import StepSpec
from payrace.harness.explore.scheduler import ScheduledRequest, ScheduleError


class Policy(Protocol):
    def choose(
        self, runnable: Sequence[int], candidates: Sequence[int], reqs: Sequence[ScheduledRequest]
    ) -> int: ...


class Prefix:
    """Follow `choices`, then always the lowest candidate (the depth-first order)."""

    def __init__(self, choices: Sequence[int], *, exact: bool = False) -> None:
        self.choices = list(choices)
        self.exact = exact
        self.position = 0
        self.notes: list[str] = []
        self.diverged_at: int | None = None

    def choose(
        self, runnable: Sequence[int], candidates: Sequence[int], reqs: Sequence[ScheduledRequest]
    ) -> int:
        pool = runnable if self.exact else candidates
        if self.position < len(self.choices):
            want = self.choices[self.position]
            self.position += 1
            if want in pool:
                return want
            if self.exact:
                r = reqs[want]
                state = {"blocked": f"waits for {', '.join(r.blocked_by)}", "done": "has answered"}
                raise ScheduleError(
                    f"step {self.position}: the id releases {r.label}, but it "
                    f"{state.get(r.state, r.state)}; this service no longer runs that schedule"
                )
            self.notes.append(f"step {self.position}: {want} not among {list(pool)}")
            self.diverged_at = self.diverged_at or self.position
        elif self.exact and self.position == len(self.choices):
            self.position += 1
            self.notes.append("the id ended before every request answered")
            self.diverged_at = self.diverged_at or self.position
        return min(pool)


def next_prefix(decisions: Sequence[tuple[tuple[int, ...], int]]) -> list[int] | None:
    """The next branch of the depth-first search, or None when every branch was taken."""
    for i in range(len(decisions) - 1, -1, -1):
        candidates, chosen = decisions[i]
        later = [c for c in candidates if c > chosen]
        if later:
            return [c for _, c in decisions[:i]] + [later[0]]
    return None


class Steps:
    """An explicit schedule: `label` = one step, `label:point` = until paused at point."""

    def __init__(self, steps: Sequence[StepSpec]) -> None:
        self.queue = list(steps)
        self.moved = 0  # steps released for queue[0]
        self.mark = 0  # len(trail) when queue[0] began: LOCAL steps may run past its point

    def choose(
        self, runnable: Sequence[int], candidates: Sequence[int], reqs: Sequence[ScheduledRequest]
    ) -> int:
        by_label = {r.label: r for r in reqs}
        while self.queue:
            spec = self.queue[0]
            r = by_label[spec.label]
            if not self.moved:
                self.mark = len(r.trail)
            if self.moved and self._met(spec, r, self.mark):
                self.queue.pop(0)
                self.moved = 0
                continue
            if r.state == "done":
                if spec.until not in (None, "end"):
                    raise ScheduleError(
                        f"{spec}: {r.label} answered without pausing at {spec.until} "
                        f"(it went {r.step_from or 'from the start'} -> answer)"
                    )
                self.queue.pop(0)
                self.moved = 0
                continue
            if r.state == "blocked":
                if not self.moved:
                    raise ScheduleError(
                        f"{spec}: {r.label} is waiting for a lock held by "
                        f"{', '.join(r.blocked_by)}; release that request first"
                    )
                self.queue.pop(0)  # waiting on the way: go on, as the isolation tester does
                self.moved = 0
                continue
            self.moved += 1
            return r.index
        return min(runnable)

    @staticmethod
    def _met(spec: StepSpec, r: ScheduledRequest, mark: int) -> bool:
        if spec.until is None:
            return True
        if spec.until == "end":
            return r.state == "done"
        return spec.until in r.trail[mark:]


class Pct:
    """Probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010): distinct random
    priorities d..d+n-1, d-1 change points drawn from 1..k; at the i-th change point the
    request about to run drops to priority d-i; always run the highest-priority runnable."""

    def __init__(self, n: int, k: int, d: int, rng: random.Random) -> None:
        self.priority = dict(enumerate(rng.sample(range(d, d + n), n)))
        points = rng.sample(range(1, k + 1), min(d - 1, k))
        self.changes = {step: d - i for i, step in enumerate(sorted(points), start=1)}
        self.steps = 0

    def choose(
        self, runnable: Sequence[int], candidates: Sequence[int], reqs: Sequence[ScheduledRequest]
    ) -> int:
        self.steps += 1
        best = max(runnable, key=lambda i: self.priority[i])
        if self.steps in self.changes:
            self.priority[best] = self.changes[self.steps]
            best = max(runnable, key=lambda i: self.priority[i])
        return best


@dataclass(frozen=True)
class PctBound:
    n: int  # requests
    k: int  # steps of one run (estimated from each request running alone)
    d: int  # bug depth

    @property
    def p(self) -> float:
        return 1.0 / (self.n * float(self.k) ** (self.d - 1))

    def runs_for(self, confidence: float) -> int:
        if self.p >= 1.0:
            return 1
        return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - self.p))

    def confidence(self, runs: int) -> float:
        return 1.0 - (1.0 - self.p) ** runs

    def describe(self, runs: int, confidence: float = 0.95) -> str:
        return (
            f"PCT: n={self.n} requests, k={self.k} steps, depth d={self.d}: a run finds a given "
            f"depth-{self.d} bug with p >= 1/(n·k^(d-1)) = 1/{round(1 / self.p)} "
            f"({self.p:.3%}); {confidence:.0%} confidence needs {self.runs_for(confidence)} "
            f"runs; {runs} runs give {self.confidence(runs):.1%}"
        )


__all__ = ["Pct", "PctBound", "Policy", "Prefix", "Steps", "next_prefix"]
