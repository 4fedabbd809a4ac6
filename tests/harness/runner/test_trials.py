"""runner/trials.py: when a target that stopped answering stops the run; callbacks sent again
as a customer reloading the page would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from payrace.harness.errors import UsageError
from payrace.harness.infra.provider import Database
from payrace.harness.runner.config import MAX_CALLBACK_RELOADS, RunConfig
from payrace.harness.runner.run import run
from payrace.harness.runner.trials import Liveness


def test_a_run_of_silent_trials_stops_the_run_naming_the_last_answered_trial() -> None:
    live = Liveness(stop_after=3)
    live.answered(4)
    live.answered(2)  # trials end out of order: the latest answered one is named
    for trial in (5, 6):
        live.unanswered(trial, "ConnectError: connection refused", planned=100)
    assert live.stopped is None
    live.unanswered(7, "ConnectError: connection refused", planned=100)
    assert live.stopped is not None
    assert live.stopped.startswith(
        "the target stopped answering after trial 4: ConnectError: connection refused"
    )


def test_an_answer_between_silent_trials_keeps_the_run_going() -> None:
    live = Liveness(stop_after=3)
    for trial in range(20):
        if trial % 2:
            live.answered(trial)
        else:
            live.unanswered(trial, "ReadError", planned=20)
    assert live.stopped is None


def test_a_target_that_never_answered_is_said_so() -> None:
    live = Liveness(stop_after=2)
    live.unanswered(0, "ConnectError", planned=5)
    live.unanswered(1, "ConnectError", planned=5)
    assert live.stopped is not None and "before any trial" in live.stopped


# -- a customer reloading the return page (--callback-reloads) ---------------------------


def test_callback_reloads_are_bounded() -> None:
    for bad in (-1, MAX_CALLBACK_RELOADS + 1):
        with pytest.raises(UsageError, match="--callback-reloads must be between 0 and 10"):
            RunConfig(callback_reloads=bad).validate()
    RunConfig(callback_reloads=MAX_CALLBACK_RELOADS).validate()


async def _failing_gateway_run(pg: Database, tmp_path: Path, reloads: int) -> dict[str, Any]:
    # No webhook: the callback is the only request that can capture; half the gateway's
    # captures fail (a 502 the service passes on), so a callback that is not reloaded leaves
    # its payment uncaptured.
    config = RunConfig(
        dsn=pg.url, out_dir=tmp_path / str(reloads), strategies=["for_update"], trials=30,
        webhooks=0, nemesis="gateway-errors:0.5", callback_reloads=reloads,
    )  # fmt: skip
    summary = await run(config, announce=lambda line: None)
    result: dict[str, Any] = summary["strategies"]["for_update"]
    return result


async def test_a_reloaded_callback_captures_what_a_failed_one_left(
    pg: Database, tmp_path: Path
) -> None:
    """A callback answered 502 is sent again as a customer would reload the page: each reload
    is an operation of its own, and the payments it captures are captured once."""
    once = await _failing_gateway_run(pg, tmp_path, 0)
    reloaded = await _failing_gateway_run(pg, tmp_path, 5)
    assert once["valid"] is True and reloaded["valid"] is True
    assert once["conflicts"]["callbacks_reloaded"] == 0
    assert reloaded["conflicts"]["callbacks_reloaded"] > 0
    ops = [op.to_json() for op in reloaded["_history"]]
    reloads = [o for o in ops if o["f"] == "verify" and "reload" in (o.get("value") or {})]
    assert (
        len([o for o in reloads if o["type"] == "invoke"])
        == (reloaded["conflicts"]["callbacks_reloaded"])
    )
    # Each reload's completion: the next operation of the same process in the same trial.
    answered = [
        next(
            o
            for o in ops[ops.index(inv) + 1 :]
            if (o["process"], o["trial"]) == (inv["process"], inv["trial"])
        )
        for inv in reloads
    ]
    assert any(o.get("status") == 200 for o in answered), answered
