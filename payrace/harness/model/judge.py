"""The one judge: checkers over (history, observation), and the first violation drawn.

    Judgement          the observation, the composed verdict, its deadlock account, helpers
      .checks()          every checker's result as summary JSON
      .first_violation() the example a report opens with: trial, payment, the checks that
                         flagged that payment, and its timeline (the audit rows' when the
                         run drew none of its own); a deadlocked payment's also carries
                         `deadlocks` (its cycles, their statements, the replies naming it)
                         and, in a timeline drawn from the audit rows, the cycles
      .deadlock_summary() the summary's `deadlocks` block: counted, attributed, unattributed
                         and why (model.deadlocks.DeadlockAccount)
    judge()            run the checkers (model.checker.check) on one observation

Run, explore and load each observe differently (a finished run, one schedule, a Locust
window) and then judge here, so a payment is flagged, and a violation drawn, one way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from payrace.harness.model import checker, deadlocks
from payrace.harness.model.history import Operation
from payrace.harness.model.oracle import Observation
from payrace.harness.reports.timeline import TimelineEvent, from_audit, from_cycles


@dataclass(frozen=True)
class Judgement:
    observation: Observation
    verdict: checker.Verdict
    deadlocks: deadlocks.DeadlockAccount

    @property
    def valid(self) -> checker.Validity:
        return self.verdict.valid

    def checks(self) -> dict[str, dict[str, Any]]:
        return {name: r.to_json() for name, r in self.verdict.results.items()}

    def first_violation(
        self,
        payment: int | None = None,
        *,
        trial: int | None = None,
        timeline: Sequence[TimelineEvent] = (),
    ) -> dict[str, Any] | None:
        """The violation a report shows first: `payment`, or the lowest violating id."""
        if payment is None:
            if not self.verdict.violating_payments:
                return None
            payment = min(self.verdict.violating_payments)
        deadlocked = self.deadlocks.payments.get(payment)
        drawn = list(timeline)
        if not drawn:
            drawn = from_audit(self.observation.audit, payment)
            if deadlocked is not None:  # the server's clock, as the audit rows' (not probes')
                drawn = sorted([*drawn, *from_cycles(deadlocked.cycles)], key=lambda e: e.time_ns)
        first: dict[str, Any] = {
            "trial": trial,
            "payment": payment,
            "checks": [n for n, r in self.verdict.results.items() if payment in r.payments],
            "timeline": [e.to_json() for e in drawn],
        }
        if deadlocked is not None:
            first["deadlocks"] = deadlocked.to_json()
        return first

    def deadlock_summary(self) -> dict[str, Any]:
        return self.deadlocks.to_json()


def judge(
    ops: Iterable[Operation],
    obs: Observation,
    *,
    checkers: Sequence[checker.Checker] = checker.CHECKERS,
) -> Judgement:
    history = list(ops)
    return Judgement(
        obs, checker.check(history, obs, checkers=checkers), deadlocks.account(history, obs)
    )
