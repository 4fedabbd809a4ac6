"""Pause points: `await pause("after_read")` in a service's own async code, for the explorer.

    pause()           the public hook (`from payrace import pause`): a no-op unless a
                      controller is installed for the current request
    PauseController   what a harness installs: the explorer's scheduler, a forced rendezvous
    ProbeContext      per-request facts a controller reads: label, backend pid, points passed
    controlled()      install a controller for the requests started inside it (ContextVar)
    set_backend_pid() tell the controller which PostgreSQL backend serves the request
    finish()          the request left the code that pauses (a rendezvous stops waiting for it)
    active(), current_probe()

Placing pause points. Put one where the order of two concurrent requests matters: after
reading the row the request decides on, before writing; as many as you like, named as you
like (the explorer discovers the names the requests hit, and enumerates every schedule of
them). `payrace explore --app module:factory --profile file.toml` drives the app in its own
event loop and holds each request at each point until the schedule releases it.

    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT state FROM charges WHERE id = $1", charge_id)
        await pause("charge_read", backend_pid=conn.get_server_pid())
        ...

`detail` is shown in the schedule's timeline ("charge_read (pending)"). `backend_pid` names
the request's PostgreSQL backend (asyncpg `conn.get_server_pid()`, psycopg
`conn.info.backend_pid`: both read it from the driver, no statement runs). It is optional:
the explorer reads lock waits from PostgreSQL (`pg_blocking_pids`) for every backend of the
app's database, and names the waiting request by elimination (only a request that was
released and has not paused again can be waiting). Pass it when a request may wait before
its first pause point while three or more requests race, or uses several connections at
once: then the explorer names each waiter and lock holder exactly.

Cost without a controller (production, every test that does not explore): one
ContextVar.get() and a comparison, and nothing allocated: `pause()` is a plain function
that returns a finished awaitable, so `await` returns at once, in C (the figure is in
docs/benchmarks.md; tests/test_pausing.py measures it). Nothing here imports more than the
standard library, so `import payrace` stays light.

The reference service's capture path (payrace.service.capture) pauses through this same
function; payrace.service.instrument.probes adds its named points, the forced-mode
Rendezvous and the X-Payrace-Pause header on top.
"""

from __future__ import annotations

import time
import types
from collections.abc import Awaitable, Generator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class ProbeContext:
    label: str
    backend_pid: int | None = None
    paused_s: float = 0.0
    # (point, time.monotonic_ns(), detail) in the order reached: the raw material of timelines.
    points: list[tuple[str, int, str | None]] = field(default_factory=list)
    finished: bool = False
    # Set by a controller that had to give up waiting (reported, never silent).
    timed_out: bool = False


class PauseController(Protocol):
    async def reached(self, point: str, probe: ProbeContext) -> None: ...

    def finished(self, probe: ProbeContext) -> None: ...


_controller: ContextVar[PauseController | None] = ContextVar("payrace_controller", default=None)
_probe: ContextVar[ProbeContext | None] = ContextVar("payrace_probe", default=None)


def active() -> bool:
    return _controller.get() is not None


def current_probe() -> ProbeContext | None:
    return _probe.get()


@contextmanager
def controlled(controller: PauseController, label: str) -> Iterator[ProbeContext]:
    """Requests started inside this block report their pause points to `controller`."""
    probe = ProbeContext(label=label)
    t1 = _controller.set(controller)
    t2 = _probe.set(probe)
    try:
        yield probe
    finally:
        # A request rejected before its pause points never reaches finish(); tell the
        # controller here so a rendezvous does not wait for it until its timeout.
        if not probe.finished:
            probe.finished = True
            controller.finished(probe)
        _controller.reset(t1)
        _probe.reset(t2)


def set_backend_pid(pid: int) -> None:
    probe = _probe.get()
    if probe is not None:
        probe.backend_pid = pid


@types.coroutine
def _finished() -> Generator[Any, None, None]:
    return
    yield  # a generator-based coroutine, so that one finished instance can be awaited again


# Exhausted once, here: awaiting it again returns None at once without running any Python
# code or allocating (an awaited finished generator answers StopIteration(None) in C). An
# `async def` would build a new coroutine object on every call.
_DONE = _finished()
for _ in _DONE:  # pragma: no branch
    pass


def pause(
    point: str, detail: str | None = None, *, backend_pid: int | None = None
) -> Awaitable[None]:
    """`await pause("after_read")`: held here while a controller's schedule says so; else
    returns at once. `detail` is drawn in the timeline; `backend_pid` (optional) names the
    request's PostgreSQL backend (see the module docstring)."""
    controller = _controller.get()
    if controller is None:
        return _DONE
    return _reached(controller, point, detail, backend_pid)


async def _reached(
    controller: PauseController, point: str, detail: str | None, backend_pid: int | None
) -> None:
    probe = _probe.get()
    assert probe is not None  # controlled() always sets both
    if backend_pid is not None:
        probe.backend_pid = backend_pid
    probe.points.append((point, time.monotonic_ns(), detail))
    started = time.perf_counter()
    try:
        await controller.reached(point, probe)
    finally:
        probe.paused_s += time.perf_counter() - started


def finish() -> None:
    controller = _controller.get()
    probe = _probe.get()
    if controller is not None and probe is not None and not probe.finished:
        probe.finished = True
        controller.finished(probe)


__all__ = [
    "PauseController",
    "ProbeContext",
    "active",
    "controlled",
    "current_probe",
    "finish",
    "pause",
    "set_backend_pid",
]
