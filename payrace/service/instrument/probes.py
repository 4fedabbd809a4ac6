"""Pause points: named places in the capture path where a controller may hold a request.

    POINTS            the names, in the order one capture passes them
    (from payrace.pausing, the public mechanism, re-exported here:)
    PauseController   what a harness installs (forced rendezvous, the explorer's scheduler)
    ProbeContext      per-request facts a controller needs: label, backend pid, time paused
    controlled()      install a controller for the requests started inside it (contextvar)
    pause()           the hook the capture path awaits; a no-op without a controller
    finish()          the request left the capture path (every outcome)
    set_backend_pid(), active(), current_probe()
    record_backend()  tell the controller which PostgreSQL backend serves the request
    Rendezvous        "hold at POINT until every other member has arrived, finished or is
                      blocked by PostgreSQL" — forced mode, in-process or via X-Payrace-Pause
    parse_pause_header()  X-Payrace-Pause: group=<id>; size=<n>[; point=...][; timeout_ms=...]

Without a controller `pause()` costs one ContextVar.get() and a comparison and allocates
nothing (payrace.pausing), which is why the capture path can keep its pause points in
production. The capture path
(payrace.service.capture) calls pause() / record_backend() / finish(); the middleware
installs a Rendezvous from X-Payrace-Pause; the harness installs its own controllers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

# The mechanism is payrace's public one (`from payrace import pause`): the reference
# service's points are calls of the same function a team places in its own code.
from payrace.pausing import (
    PauseController,
    ProbeContext,
    active,
    controlled,
    current_probe,
    finish,
    pause,
    set_backend_pid,
)

if TYPE_CHECKING:
    from payrace.service.sql import Tx

POINTS: tuple[str, ...] = (
    "txn_begun",
    "payment_read",
    "status_checked",
    "gateway_called",
    "payment_written",
    "invoice_written",
    "order_written",
    "before_commit",
)


def record_backend(tx: Tx) -> None:
    """With a controller installed, note the backend pid of the request's connection."""
    if active():
        # Controllers tell "waiting for a lock" from pg_blocking_pids of this backend. The
        # driver knows the pid already: asking the server would run a statement, and at
        # REPEATABLE READ the first statement takes the snapshot earlier than production.
        set_backend_pid(tx.backend_pid)


BlockedProbe = Callable[[int], Awaitable[bool]]
"""Answers "is the backend with this pid waiting for a lock?" (pg_blocking_pids non-empty)."""


class Rendezvous:
    """Hold each member at `point` until every other member has arrived there too, has
    finished, or is waiting on a lock in PostgreSQL.

    The last clause is what keeps it from hanging under `for_update`: the second request
    cannot *read* until the first commits, so a plain barrier would wait forever. Whether a
    backend waits is read from PostgreSQL (`pg_blocking_pids`), not guessed from time.
    """

    def __init__(
        self,
        size: int,
        is_blocked: BlockedProbe,
        *,
        point: str = "payment_read",
        timeout_s: float = 5.0,
        poll_s: float = 0.002,
        hold_s: float = 0.0,
    ) -> None:
        if size < 1:
            raise ValueError("a rendezvous needs at least one member")
        if point not in POINTS:
            raise ValueError(f"unknown pause point {point!r}; choose one of {', '.join(POINTS)}")
        self.size = size
        self.created = time.monotonic()
        self.point = point
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        # An injected hold before commit: the lock holder keeps its locks this long, so a
        # harness can check that the waiter's measured lock wait means what it says.
        self.hold_s = hold_s
        self._is_blocked = is_blocked
        self._members: list[ProbeContext] = []
        self._arrived: set[int] = set()
        self.timeouts = 0

    def _register(self, probe: ProbeContext) -> None:
        if all(m is not probe for m in self._members):
            self._members.append(probe)

    def finished(self, probe: ProbeContext) -> None:
        self._register(probe)

    def done(self) -> bool:
        return len(self._members) >= self.size and all(m.finished for m in self._members)

    async def reached(self, point: str, probe: ProbeContext) -> None:
        self._register(probe)
        if point == "before_commit" and self.hold_s > 0:
            await asyncio.sleep(self.hold_s)
        if point != self.point:
            return
        self._arrived.add(id(probe))
        deadline = time.monotonic() + self.timeout_s
        while not await self._all_settled(probe):
            if time.monotonic() > deadline:
                probe.timed_out = True
                self.timeouts += 1
                return
            await asyncio.sleep(self.poll_s)

    async def _all_settled(self, me: ProbeContext) -> bool:
        if len(self._members) < self.size:
            return False
        for other in self._members:
            if other is me or other.finished or id(other) in self._arrived:
                continue
            if other.backend_pid is None or not await self._is_blocked(other.backend_pid):
                return False
        return True


@dataclass(frozen=True)
class PauseRequest:
    group: str
    size: int
    point: str = "payment_read"
    timeout_ms: int = 5000
    hold_ms: int = 0


class PauseHeaderError(ValueError):
    pass


def parse_pause_header(value: str) -> PauseRequest:
    """Parse `group=<id>; size=<n>[; point=<name>][; timeout_ms=<ms>][; hold_ms=<ms>]`."""
    fields: dict[str, str] = {}
    for part in value.split(";"):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        if not sep:
            raise PauseHeaderError(f"X-Payrace-Pause: expected key=value, got {part.strip()!r}")
        fields[key.strip()] = val.strip()
    unknown = set(fields) - {"group", "size", "point", "timeout_ms", "hold_ms"}
    if unknown:
        raise PauseHeaderError(f"X-Payrace-Pause: unknown field(s) {', '.join(sorted(unknown))}")
    if not fields.get("group"):
        raise PauseHeaderError("X-Payrace-Pause: group=<id> is required")
    try:
        size = int(fields.get("size", "2"))
        timeout_ms = int(fields.get("timeout_ms", "5000"))
        hold_ms = int(fields.get("hold_ms", "0"))
    except ValueError as exc:
        raise PauseHeaderError(
            "X-Payrace-Pause: size, timeout_ms and hold_ms must be integers"
        ) from exc
    if not 1 <= size <= 64 or not 1 <= timeout_ms <= 60_000 or not 0 <= hold_ms <= 60_000:
        raise PauseHeaderError(
            "X-Payrace-Pause: size must be 1..64, timeout_ms 1..60000 and hold_ms 0..60000"
        )
    point = fields.get("point", "payment_read")
    if point not in POINTS:
        raise PauseHeaderError(f"X-Payrace-Pause: unknown point {point!r}")
    return PauseRequest(
        group=fields["group"], size=size, point=point, timeout_ms=timeout_ms, hold_ms=hold_ms
    )


__all__ = [
    "POINTS",
    "BlockedProbe",
    "PauseController",
    "PauseHeaderError",
    "PauseRequest",
    "ProbeContext",
    "Rendezvous",
    "active",
    "controlled",
    "current_probe",
    "finish",
    "parse_pause_header",
    "pause",
    "record_backend",
    "set_backend_pid",
]
