"""runner/trials.py: when a target that stopped answering stops the run."""

from __future__ import annotations

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
