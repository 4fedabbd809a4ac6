"""payrace/pausing.py: `from payrace import pause`, a no-op without a controller, a hold with one.

What a controller does with the pauses is tested with the explorer (tests/harness/explore/)
and the reference service's Rendezvous (tests/service/instrument/test_probes.py); here: the
public hook itself, what it costs when nothing drives it, and that `import payrace` stays light.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import payrace
from payrace import pausing
from payrace.pausing import ProbeContext, controlled, pause
from payrace.service.instrument import probes


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, int | None]] = []
        self.done: list[str] = []

    async def reached(self, point: str, probe: ProbeContext) -> None:
        self.seen.append((point, probe.points[-1][2], probe.backend_pid))

    def finished(self, probe: ProbeContext) -> None:
        self.done.append(probe.label)


def test_the_public_pause_is_the_one_the_reference_service_uses() -> None:
    assert payrace.pause is pause is probes.pause
    assert "pause" in payrace.__all__


async def test_without_a_controller_pause_returns_at_once_and_builds_nothing() -> None:
    assert not pausing.active()
    assert await pause("after_read") is None
    assert await pause("after_read", "pending", backend_pid=42) is None
    # One finished awaitable for every call: nothing is allocated per pause.
    assert pause("a") is pause("b", "x", backend_pid=1)
    # Awaitable from anywhere a coroutine is: a task, gather.
    assert await asyncio.create_task(_twice()) == 2
    assert await asyncio.gather(pause("a"), pause("b")) == [None, None]


async def _twice() -> int:
    await pause("a")
    await pause("a")
    return 2


async def test_with_a_controller_each_point_is_reported_with_its_detail_and_backend() -> None:
    recorder = Recorder()
    with controlled(recorder, "client") as probe:
        assert pausing.active() and pausing.current_probe() is probe
        await pause("charge_read", "pending")
        await pause("charge_written", backend_pid=4242)
        await pause("charge_written")  # the pid, once said, stays the request's
    assert recorder.seen == [
        ("charge_read", "pending", None),
        ("charge_written", None, 4242),
        ("charge_written", None, 4242),
    ]
    assert [p for p, _, _ in probe.points] == ["charge_read", "charge_written", "charge_written"]
    assert recorder.done == ["client"]  # told when the block ends, finish() or not
    assert not pausing.active()


async def test_a_pause_without_a_controller_costs_about_a_function_call() -> None:
    """The figure docs/benchmarks.md reports (tools/bench_explore.py pause-overhead); the
    bound is loose so a loaded machine cannot fail it, and still far below any request."""
    n = 100_000

    async def loop() -> float:
        started = time.perf_counter_ns()
        for _ in range(n):
            await pause("after_read")
        return (time.perf_counter_ns() - started) / n

    best = min([await loop() for _ in range(3)])
    assert best < 2_000, f"{best:.0f} ns per pause() without a controller"


def test_importing_payrace_imports_no_web_stack() -> None:
    code = (
        "import sys, payrace; from payrace import pause; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))"
    )
    heavy = ["fastapi", "starlette", "sqlalchemy", "asyncpg", "httpx", "psycopg", "razorpay"]
    done = subprocess.run(
        [sys.executable, "-c", code, *heavy], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
