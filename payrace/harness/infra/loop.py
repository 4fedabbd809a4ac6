"""The event loop payrace's own commands run on: uvloop where it is installed (a payrace
dependency everywhere but Windows), asyncio's own loop otherwise.

    new_loop()   a new loop of that kind (the fake gateway's thread, run())
    run(main)    asyncio.run(main) on such a loop: the same Runner, the same Ctrl-C handling
                 (SIGINT cancels the main task), the loop closed after

Why: the explorer's and the trials' requests run in payrace's own process (the reference
service in-process, asyncpg, the lock sampler), so the loop's own cost per socket write and
callback is part of every schedule. `payrace explore --requests client,webhook,webhook`
(155 schedules), alternated in one process on a shared 2-core machine: 47 schedules/s on
asyncio's loop, 83 on uvloop (medians of 4).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # not on Windows: asyncio's own loop
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(main)


__all__ = ["new_loop", "run"]
