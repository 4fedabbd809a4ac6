"""Per-request timings, rendered as a W3C Server-Timing header.

    lock     waiting for the payment row lock (the FOR UPDATE statement, or the plain read)
    hold     from the lock being granted until the commit returned
    db       time in the database, pauses and gateway calls excluded
    gateway  time in razorpay SDK calls

Kept in a ContextVar so the capture routine can fill it without threading it through calls.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class Timings:
    lock_ms: float | None = None
    hold_ms: float | None = None
    db_ms: float | None = None
    gateway_ms: float = 0.0
    attempts: int = 0

    def header(self) -> str:
        parts: list[str] = []
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
