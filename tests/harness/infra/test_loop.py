"""payrace/harness/infra/loop.py: payrace's commands on uvloop where it is installed, on
asyncio's own loop where it is not, with asyncio.run's handling of the main task."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from payrace.harness.infra import loop


async def _kind() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


def test_run_answers_the_coroutines_result_on_uvloop_and_closes_the_loop() -> None:
    assert loop.run(_kind()) is uvloop.Loop
    seen: list[asyncio.AbstractEventLoop] = []

    async def keep() -> None:
        seen.append(asyncio.get_running_loop())

    loop.run(keep())
    assert seen[0].is_closed()


def test_without_uvloop_the_loop_is_asyncios_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert issubclass(loop.run(_kind()), asyncio.BaseEventLoop)
    made = loop.new_loop()
    try:
        assert not isinstance(made, uvloop.Loop)
    finally:
        made.close()


def test_an_exception_and_the_tasks_left_running_are_handled_as_asyncio_run_does() -> None:
    """The main coroutine's exception reaches the caller; a task it left is cancelled."""
    left: list[asyncio.Task[None]] = []

    async def fails() -> None:
        left.append(asyncio.create_task(asyncio.sleep(60)))
        await asyncio.sleep(0)
        raise ValueError("from the main coroutine")

    with pytest.raises(ValueError, match="from the main coroutine"):
        loop.run(fails())
    assert left[0].cancelled()
