"""After the trials, before the verdict: the target's reconciliation gets its chance.

    await_reconciled()   poll until every payment the gateway captured shows captured in the
                         target's database, or the window closes; what it waited for -> dict
    Reconciler           how the target reconciles, as the harness can drive or watch it
    pending()            the run's payments the gateway captured and the database does not show

A capture can be accepted by the gateway and then lost before the target commits it (a killed
backend in every attempt, a crashed process). Razorpay's answer is a webhook, and for a missed
one a reconciler that fetches the payment (payrace.service.reconcile). The checker
no_lost_capture judges the final state, so judging the moment the last trial ends would call a
capture lost that the target is about to recover, as its design says it will. The harness
therefore waits, boundedly, for what it can see itself: the fake gateway's state (captured)
against the target's payments table (the oracle's read). It waits only while such a payment
exists; a run without one is judged at once. What is still pending when the window closes
stays a lost capture: the window is a chance, not an excuse.

How the wait is spent depends on the target:
- the reference service in this process: one sweep (reconcile_once) at a time, as its sweeper
  would run it, but now instead of after RECONCILE_AFTER_S; stopped early once a sweep that
  hit no error leaves nothing to do (asking the gateway again would answer the same);
- the reference service payrace starts over HTTP: its own sweeper, started with
  RECONCILE_INTERVAL_S / RECONCILE_AFTER_S short (HTTP_SWEEP) unless the environment sets them;
- a running target: polling only, for `--reconcile-s` (default RUNNING_WINDOW_S, which covers
  the reference service's own defaults of a sweep every 15 s for intents 30 s old).
RECONCILE_INTERVAL_S=0 in the environment turns the reference service's reconciler off; the
wait then only polls, and what it finds pending at the end is judged lost.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from payrace.harness.gateway.controls import GatewayControl
from payrace.harness.model import oracle, watched
from payrace.harness.runner.config import RunConfig, oracle_config

# Seconds between two looks at the gateway and the database while waiting.
POLL_S = 0.2
# The default window: payrace's own targets reconcile at once (in-process) or within about
# 1.5 s (HTTP_SWEEP); a running target is given the reference service's default cadence.
OWN_WINDOW_S = 10.0
RUNNING_WINDOW_S = 60.0
# The reference service payrace starts over HTTP: sweep every 0.5 s, intents 1 s old.
HTTP_SWEEP = {"RECONCILE_INTERVAL_S": "0.5", "RECONCILE_AFTER_S": "1"}


def http_sweep_env() -> dict[str, str]:
    """HTTP_SWEEP for a reference service payrace starts, each setting unless the environment
    sets it (RECONCILE_INTERVAL_S=0 there keeps the reconciler off)."""
    return {k: v for k, v in HTTP_SWEEP.items() if k not in os.environ}


@dataclass
class Reconciler:
    """How the target reconciles: `sweep` runs one pass now and says whether another could
    change anything (None: the target sweeps on its own, the harness only watches)."""

    how: str  # in words, for the summary
    sweep: Callable[[], Awaitable[bool]] | None = None


@dataclass
class Waited:
    window_s: float
    how: str
    waited_for: str = (
        "payments the fake gateway captured that the target's database did not show "
        "captured, until none was left or the window closed"
    )
    pending_before: list[int] = field(default_factory=list)
    pending_after: list[int] = field(default_factory=list)
    waited_s: float = 0.0
    sweeps: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        before, after = len(self.pending_before), len(self.pending_after)
        return {
            "waited_for": self.waited_for,
            "how": self.how,
            "window_s": self.window_s,
            "waited_s": round(self.waited_s, 3),
            "pending_before": before,
            "reconciled": before - after,
            "pending_after": after,
            "sweeps": self.sweeps,
            "first_pending": self.pending_after[:5],
            "errors": self.errors[:3],
        }


def window_s(config: RunConfig) -> float:
    if config.reconcile_s is not None:
        return config.reconcile_s
    return RUNNING_WINDOW_S if config.external else OWN_WINDOW_S


def pending(
    payments: Mapping[int, str],
    counters: Mapping[str, Mapping[str, int]],
    statuses: Mapping[int, str | None],
    done: str,
) -> list[int]:
    """Payments (id -> gateway id) the gateway captured or accepted a capture of whose row
    does not say `done`: what no_lost_capture would call lost from the gateway's evidence."""
    at_gateway = {g for g, n in counters.get("captured", {}).items() if n}
    at_gateway |= {g for g, n in counters.get("accepted", {}).items() if n > 0}
    return sorted(p for p, g in payments.items() if g in at_gateway and statuses.get(p) != done)


async def await_reconciled(
    config: RunConfig,
    reconciler: Reconciler,
    gateway: GatewayControl,
    oracle_url: str,
    payments: Mapping[int, str],
) -> Waited:
    """Wait, at most the window, for the gateway's captures to show in the database."""
    watched_config = oracle_config(config)
    done = watched_config.payments.done_value
    waited = Waited(window_s(config), reconciler.how)

    async def look() -> list[int]:
        counters = await asyncio.to_thread(gateway.counters)
        statuses = await asyncio.to_thread(oracle.statuses, oracle_url, watched_config, payments)
        return pending(payments, counters, statuses, done)

    left = await look()
    waited.pending_before = left
    started = time.monotonic()  # the wait is what follows the first look
    deadline = started + waited.window_s
    more = True
    while left and time.monotonic() < deadline:
        if reconciler.sweep is not None and more:
            try:
                more = await reconciler.sweep()
            except Exception as exc:  # the database or gateway still recovering: try again
                waited.errors.append(f"{type(exc).__name__}: {exc}")
                more = True
            waited.sweeps += 1
        elif reconciler.sweep is not None:
            break  # the last sweep hit no error and left these: another would do the same
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        try:
            left = await look()
        except (psycopg.Error, watched.OracleError) as exc:
            waited.errors.append(f"{type(exc).__name__}: {exc}")
    waited.pending_after = left
    waited.waited_s = time.monotonic() - started
    return waited
