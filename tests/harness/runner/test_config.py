"""runner.config: gates and run configurations, checked before anything starts."""

from __future__ import annotations

from typing import Any

import pytest

from payrace.harness.errors import UsageError
from payrace.harness.runner.config import Gate, RunConfig


def test_gate_parsing() -> None:
    gate = Gate.parse("for_update: lock_webhook_p99_ms <= 100")
    assert (gate.strategy, gate.metric, gate.op, gate.value) == (
        "for_update", "lock_webhook_p99_ms", "<=", 100.0,
    )  # fmt: skip
    result = {"latency_ms": {"lock": {"webhook": {"p99": 120.0}}}, "violating_trials": 0}
    assert gate.judge("for_update", result)["passed"] is False
    with pytest.raises(UsageError, match="unknown metric"):
        Gate.parse("lock_p42_ms<=1")
    with pytest.raises(UsageError, match="form"):
        Gate.parse("lock_p99_ms is small")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"trials": 0}, "--trials"),
        ({"mode": "sideways"}, "--mode"),
        ({"strategies": ["optimistic"]}, "unknown strategy"),
        ({"target": "ftp://x"}, "--target"),
        ({"target": "http://127.0.0.1:1"}, "--target-dsn"),
        ({"hold_ms": 10.0, "mode": "aligned"}, "--hold-ms"),
        ({"isolation": "bogus"}, "--isolation"),
        ({"expect": "fine"}, "--expect must be valid or violated"),
        ({"settle_s": -1.0}, "--settle-s"),
        ({"force": "spin"}, "--force must be locks or pause"),
        ({"force": "locks", "mode": "aligned"}, "--mode aligned forces nothing"),
        ({"force": "locks", "hold_ms": 50.0}, "--hold-ms .* which --force locks does not use"),
        (
            {
                "target": "http://127.0.0.1:1",
                "target_dsn": "postgresql://x@h/db",
                "gateway_url": "http://127.0.0.1:2",
                "isolation": "SERIALIZABLE",
            },
            "a running target keeps its own isolation level",
        ),
    ],
)
def test_bad_configs_say_what_to_fix(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        RunConfig(**fields).validate()


def test_the_settle_wait_is_long_for_a_running_target_and_short_otherwise() -> None:
    assert RunConfig().settle_timeout_s() == 2.0
    running = RunConfig(target="http://127.0.0.1:8000")
    assert running.external and running.settle_timeout_s() >= 11.0
    assert RunConfig(target="http://127.0.0.1:8000", settle_s=0.5).settle_timeout_s() == 0.5


RUNNING = {
    "target": "http://127.0.0.1:8000",
    "target_dsn": "postgresql://x@h/db",
    "gateway_url": "http://127.0.0.1:9000",
}


def test_forced_mode_is_forced_by_locks_for_a_running_target_and_by_pause_otherwise() -> None:
    forced = {"inproc": "pause", "http": "pause", RUNNING["target"]: "locks"}
    for target, force in forced.items():
        config = RunConfig(**{**RUNNING, "target": target})
        config.validate()
        assert config.force == force, target
    chosen = RunConfig(force="locks")
    chosen.validate()
    assert chosen.force == "locks"
    aligned = RunConfig(**RUNNING, mode="aligned")
    aligned.validate()
    assert aligned.force is None  # nothing is forced
    # --hold-ms means the pause handshake's hold: with it against a running target, say pause.
    with pytest.raises(UsageError, match="--hold-ms"):
        RunConfig(**RUNNING, hold_ms=10.0).validate()
    RunConfig(**RUNNING, hold_ms=10.0, force="pause").validate()
