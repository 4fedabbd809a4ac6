"""tools/bench_explore.py: the pause point's price (no database).

The script is not a package module: it is loaded from its path.
"""

from __future__ import annotations

from types import ModuleType

from scripts import load_script


def _bench_explore() -> ModuleType:
    return load_script("bench_explore")


def test_a_pause_point_costs_little_without_a_controller() -> None:
    """The micro-benchmark: `await pause()` with no controller against not calling it."""
    figures = _bench_explore().pause_overhead(50_000)
    print(
        f"\nawait pause() without a controller: {figures['pause_ns']:.0f} ns/call, await of an "
        f"empty coroutine {figures['empty_coroutine_ns']:.0f} ns, empty loop "
        f"{figures['loop_ns']:.0f} ns: {figures['overhead_ns']:.0f} ns more than not calling it"
    )
    # One ContextVar.get() and a comparison inside a coroutine call: ~0.1 us here. The bound
    # is far above that so a loaded CI machine cannot trip it, while a regression that puts
    # real work on the no-controller path (a query, a sleep, a log line) still does.
    assert figures["overhead_ns"] < 20_000
