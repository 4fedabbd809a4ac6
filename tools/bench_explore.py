"""Benchmarks of the explorer, for docs/benchmarks.md.

    pause_overhead()  ns per `await payrace.pause(point)` without a controller, against not
                      calling it and against awaiting an empty coroutine
    _bench()          the command line:
    ├── python tools/bench_explore.py pause-overhead   pause_overhead(), printed
    └── python tools/bench_explore.py bench [--dsn DSN]
                          every schedule of a client callback + payment.captured webhook pair
                          at READ COMMITTED, for naive and for_update, equivalent schedules
                          collapsed and not (explore.plan.execute, timed)

A script, not part of the installed package: run it from a checkout where payrace is
installed (`make test` installs it). tests/tools/test_bench_explore.py runs pause_overhead().
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

from payrace import pause
from payrace.harness.explore.plan import Plan, execute, make_plan
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.provider import provide_postgres


def pause_overhead(iterations: int = 200_000) -> dict[str, float]:
    """ns per `await pause(point)` without a controller, against not calling it at all and
    against awaiting an empty coroutine (what any call point in async code costs)."""

    async def empty() -> None:
        return None

    async def timed(kind: str) -> float:
        started = time.perf_counter_ns()
        if kind == "pause":
            for _ in range(iterations):
                await pause("payment_read", "pending")
        elif kind == "empty":
            for _ in range(iterations):
                await empty()
        else:
            for _ in range(iterations):
                pass
        return (time.perf_counter_ns() - started) / iterations

    async def best() -> dict[str, float]:
        # Best of five: what the call costs, not what else the machine was doing meanwhile.
        return {
            kind: min([await timed(kind) for _ in range(5)]) for kind in ("pause", "empty", "loop")
        }

    ns = asyncio.run(best())
    return {
        "pause_ns": ns["pause"],
        "empty_coroutine_ns": ns["empty"],
        "loop_ns": ns["loop"],
        "overhead_ns": ns["pause"] - ns["loop"],
    }


def _bench(argv: Sequence[str]) -> int:
    """python tools/bench_explore.py [pause-overhead | bench [--dsn DSN]]

    bench: every schedule of a client callback + payment.captured webhook pair at READ
    COMMITTED, for naive and for_update, collapsed and not."""
    if not argv or argv[0] == "pause-overhead":
        figures = pause_overhead()
        print(
            f"await pause() without a controller: {figures['pause_ns']:.0f} ns/call; "
            f"await of an empty coroutine: {figures['empty_coroutine_ns']:.0f} ns; loop without "
            f"either: {figures['loop_ns']:.0f} ns/iteration; pause() costs "
            f"{figures['overhead_ns']:.0f} ns/call more than not calling it"
        )
        return 0
    if argv[0] == "bench":
        dsn = argv[2] if len(argv) > 2 and argv[1] == "--dsn" else None
        with provide_postgres(dsn) as db:
            fake = FakeRazorpay(GatewayKeys())
            with GatewayServer(fake) as server:
                for strategy in ("naive", "for_update"):
                    for reduce in (True, False):
                        plan = make_plan(strategy=strategy, requests=["client", "webhook"],
                                         isolation="READ COMMITTED", pct_runs=None, depth=2,
                                         seed=1, replay=None, scenario=None)  # fmt: skip
                        plan = Plan(replace(plan.scenario, reduce=reduce))
                        started = time.perf_counter()
                        result = asyncio.run(execute(plan, db, fake, server.url))
                        total = time.perf_counter() - started
                        print(
                            f"{strategy:<10} {'collapsed' if reduce else 'every interleaving'}: "
                            f"{len(result.runs)} schedules in {result.duration_s:.2f} s = "
                            f"{result.schedules_per_s:.1f} schedules/s ({total:.2f} s with "
                            f"service start and judging); {len(result.violating())} violating, "
                            f"{len(result.waiting())} with a lock wait"
                        )
        return 0
    print(_bench.__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(_bench(sys.argv[1:]))
