"""Per-request timings, rendered as a W3C Server-Timing header.

    lock     waiting for the payment row lock (the FOR UPDATE statement, or the plain read)
    hold     from the lock being granted until the commit returned
    db       time in the database, pauses and gateway calls excluded
    gateway  time in razorpay SDK calls
    serialization, deadlock, timeout   a count, not a time: attempts of the request that
             PostgreSQL aborted with 40001 / 40P01 / 55P03 or 57014 (lock_timeout,
             statement_timeout) and the service retried (present when not 0)

    Timings               one request's figures; header() renders Server-Timing
    begin() / current()   the request's Timings (a ContextVar, so the capture routine and the
                          gateway client fill it without threading it through calls)
    AttemptClock          what one capture attempt measures: lock wait, hold, database time
    parse_server_timing() the header back into numbers (the harness, the locustfiles)

The middleware begins a request's Timings and renders them. Light on purpose: Locust
processes import this module for parse_server_timing().
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from payrace.service.instrument import probes

_ALL_FOUR = "lock;dur=%.3f, hold;dur=%.3f, db;dur=%.3f, gateway;dur=%.3f"


@dataclass
class Timings:
    lock_ms: float | None = None
    hold_ms: float | None = None
    db_ms: float | None = None
    gateway_ms: float = 0.0
    retried: dict[str, int] | None = None  # "serialization" / "deadlock" / "timeout" -> count

    def header(self) -> str:
        lock, hold, db = self.lock_ms, self.hold_ms, self.db_ms
        if not self.retried and lock is not None and hold is not None and db is not None:
            # Every capture that committed at its first attempt: the same text as below, in
            # one formatting operation (a third of the CPU; it runs on every such answer).
            return _ALL_FOUR % (lock, hold, db, self.gateway_ms)
        parts: list[str] = [f"{name};dur={n}" for name, n in (self.retried or {}).items()]
        for name, value in (
            ("lock", self.lock_ms),
            ("hold", self.hold_ms),
            ("db", self.db_ms),
            ("gateway", self.gateway_ms),
        ):
            if value is not None:
                parts.append(f"{name};dur={value:.3f}")
        return ", ".join(parts)


_timings: ContextVar[Timings | None] = ContextVar("payrace_timings", default=None)


def begin() -> Timings:
    t = Timings()
    _timings.set(t)
    return t


def current() -> Timings:
    t = _timings.get()
    if t is None:
        t = begin()
    return t


def _paused_s() -> float:
    probe = probes.current_probe()
    return probe.paused_s if probe else 0.0


class AttemptClock:
    """One transaction attempt of the capture path, written into the request's Timings.

    A retried attempt overwrites the figures of the one before: the answer reports the
    attempt that succeeded."""

    def __init__(self) -> None:
        self.timings = current()
        self._started = time.perf_counter()
        self._locked = self._started
        self._gateway_ms = self.timings.gateway_ms
        self._paused_s = _paused_s()

    @contextmanager
    def waiting_for_lock(self) -> Iterator[None]:
        """Around the statement that reads the payment the strategy's way."""
        started = time.perf_counter()
        yield
        self._locked = time.perf_counter()
        self.timings.lock_ms = (self._locked - started) * 1000

    def lock_released(self) -> None:
        """The transaction committed: the hold ends."""
        self.timings.hold_ms = (time.perf_counter() - self._locked) * 1000

    def committed(self) -> None:
        """The hold ends, and the attempt's database time is what remains of its wall time
        once the gateway calls and the pauses a controller imposed are taken out."""
        now = time.perf_counter()
        t = self.timings
        t.hold_ms = (now - self._locked) * 1000
        gateway_ms = t.gateway_ms - self._gateway_ms
        paused_ms = (_paused_s() - self._paused_s) * 1000
        t.db_ms = max(0.0, (now - self._started) * 1000 - gateway_ms - paused_ms)


def parse_server_timing(value: str) -> dict[str, float]:
    """`lock;dur=1.5, hold;dur=3` -> {"lock": 1.5, "hold": 3.0}; entries without dur are skipped."""
    out: dict[str, float] = {}
    for entry in value.split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        for param in params:
            key, _, val = param.partition("=")
            if key == "dur" and name:
                try:
                    out[name] = float(val)
                except ValueError:
                    continue
    return out
