"""Who decides what to fire: per payment, one client callback plus one or more webhooks.

    Step        one request of a trial: which process carries it, what it is, when (offset)
    TrialPlan   the steps of one trial (one payment)
    Generator   seeded; plan(trial) is a pure function of (seed, trial), so a trial replays

The extra webhooks model what Razorpay documents: at-least-once delivery (a duplicate with
the same X-Razorpay-Event-Id), a redelivery with a new id, and other events about the same
payment (order.paid, payment.authorized) arriving in any order.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

StepKind = Literal["verify", "webhook"]
WEBHOOK_VARIANTS = ("duplicate", "redelivery", "order.paid", "payment.authorized")


@dataclass(frozen=True)
class Step:
    process: str  # "client", "webhook-1", ...
    kind: StepKind
    event: str | None = None
    # Index of an earlier webhook step whose event id this one reuses (a duplicate delivery).
    same_event_as: int | None = None
    offset_ms: float = 0.0

    def describe(self) -> str:
        if self.kind == "verify":
            return "client callback"
        dup = f" (duplicate of step {self.same_event_as})" if self.same_event_as is not None else ""
        return f"{self.event}{dup}"


@dataclass(frozen=True)
class TrialPlan:
    trial: int
    steps: tuple[Step, ...]


# Webhooks per trial besides the callback. Razorpay's at-least-once delivery rarely puts more
# than a couple of copies of one event in flight at once; forced mode holds every request of
# a trial open together, and 17 requests x 4 trials already fill the reference service's pool
# of 40 connections, so more only measures pool queueing, not the race.
MAX_WEBHOOKS = 16


class Generator:
    def __init__(
        self,
        seed: int = 1,
        *,
        webhooks: int = 1,
        first_event: str = "payment.captured",
        jitter_ms: float = 0.0,
        client: bool = True,
    ) -> None:
        if webhooks < 0 or webhooks > MAX_WEBHOOKS:
            raise ValueError(f"webhooks per trial must be between 0 and {MAX_WEBHOOKS}")
        if not client and webhooks == 0:
            raise ValueError("a trial needs at least one request")
        # NaN passes a plain `< 0` check and inf makes an offset infinite: both reach sleep().
        if not (math.isfinite(jitter_ms) and jitter_ms >= 0):
            raise ValueError(f"jitter must be a finite number of ms >= 0, got {jitter_ms!r}")
        self.seed = seed
        self.webhooks = webhooks
        self.first_event = first_event
        self.jitter_ms = jitter_ms
        self.client = client

    def plan(self, trial: int) -> TrialPlan:
        rng = random.Random(self.seed * 1_000_003 + trial)

        def offset() -> float:
            return rng.uniform(0.0, self.jitter_ms) if self.jitter_ms else 0.0

        steps: list[Step] = []
        if self.client:
            steps.append(Step("client", "verify", offset_ms=offset()))
        first_webhook = len(steps)
        for n in range(self.webhooks):
            process = f"webhook-{n + 1}"
            if n == 0:
                steps.append(Step(process, "webhook", self.first_event, offset_ms=offset()))
                continue
            variant = rng.choice(WEBHOOK_VARIANTS)
            if variant == "duplicate":
                step = Step(process, "webhook", self.first_event, first_webhook, offset())
            elif variant == "redelivery":
                step = Step(process, "webhook", self.first_event, offset_ms=offset())
            else:
                step = Step(process, "webhook", variant, offset_ms=offset())
            steps.append(step)
        return TrialPlan(trial, tuple(steps))
