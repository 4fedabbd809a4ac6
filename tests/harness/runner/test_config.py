"""runner.config: gates and run configurations, checked before anything starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from payrace.harness.errors import UsageError
from payrace.harness.model import profile as profile_module
from payrace.harness.runner.config import Gate, RunConfig


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"trials": 0}, "--trials"),
        ({"mode": "sideways"}, "--mode"),
        ({"strategies": ["fastest"]}, "unknown strategy"),
        ({"target": "ftp://x"}, "--target"),
        ({"target": "http://127.0.0.1:1"}, "--target-dsn"),
        ({"hold_ms": 10.0, "mode": "aligned"}, "--hold-ms"),
        ({"isolation": "bogus"}, "--isolation"),
        ({"expect": "fine"}, "--expect must be valid or violated"),
        ({"settle_s": -1.0}, "--settle-s"),
        ({"force": "spin"}, "--force must be locks or pause"),
        ({"webhooks": -1}, "--webhooks must be between 0 and 16"),
        ({"webhooks": 100_000}, "--webhooks must be between 0 and 16"),
        ({"mode": "jitter", "jitter_ms": float("nan")}, "--jitter-ms must be a number"),
        ({"mode": "jitter", "jitter_ms": 1e9}, "--jitter-ms must be a number"),
        ({"hold_ms": float("inf")}, "--hold-ms must be a number"),
        ({"strategies": [""]}, "--strategy names an empty strategy"),
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
        (
            {
                "target": "http://127.0.0.1:1",
                "target_dsn": "postgresql://x@h/db",
                "gateway_url": "http://127.0.0.1:2",
                "webhook_dedupe": False,
            },
            "a running target dedupes webhooks its own way",
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


def _team_profile(tmp_path: Path, target: str = "") -> Path:
    text = (Path(profile_module.__file__).parent.parent / "profiles/reference.toml").read_text()
    path = tmp_path / "shop.toml"
    # A team's profile: its own [target] lines, not the reference service's pause handshake.
    text = text.replace('force = "pause"\n', "").replace('name = "reference"', target)
    path.write_text(text, encoding="utf-8")
    return path


RUNNING = {"target_dsn": "postgresql://127.0.0.1/shop", "gateway_url": "http://127.0.0.1:9411"}


def test_a_profile_with_a_base_url_races_that_running_service(tmp_path: Path) -> None:
    profile = _team_profile(tmp_path, 'base_url = "https://127.0.0.1:8443/shop"')
    config = RunConfig(profile=profile, **RUNNING)
    config.validate()
    assert config.external and config.target == "https://127.0.0.1:8443/shop"
    assert config.strategies == ["shop"]  # named after the profile file
    explicit = RunConfig(profile=profile, target="http://127.0.0.1:9000", **RUNNING)
    explicit.validate()
    assert explicit.target_profile().base_url == "http://127.0.0.1:9000"  # --target wins


def test_the_reference_service_defaults_to_for_update() -> None:
    config = RunConfig()
    config.validate()
    assert config.strategies == ["for_update"] and not config.external


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"strategies": ["for_update"]}, "--strategy picks a flow of the reference service"),
        ({"oracle_config": Path("oracle.toml")}, "--oracle-config and --profile both"),
        ({"target": "http"}, "--target http starts the reference service"),
    ],
)
def test_a_profile_refuses_what_cannot_apply_to_a_running_service(
    tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    profile = _team_profile(tmp_path, 'base_url = "http://127.0.0.1:8000"')
    with pytest.raises(UsageError, match=message):
        RunConfig(profile=profile, **RUNNING, **fields).validate()


def test_a_profile_without_a_url_needs_one(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"has no \[target\].base_url: add it, or give --target"):
        RunConfig(profile=_team_profile(tmp_path), **RUNNING).validate()


RUNNING_URL = {
    "target": "http://127.0.0.1:8000",
    "target_dsn": "postgresql://x@h/db",
    "gateway_url": "http://127.0.0.1:9000",
}


def test_forced_mode_is_forced_by_locks_for_a_running_target_and_by_pause_otherwise() -> None:
    forced = {"inproc": "pause", "http": "pause", RUNNING_URL["target"]: "locks"}
    for target, force in forced.items():
        config = RunConfig(**{**RUNNING_URL, "target": target})
        config.validate()
        assert config.force == force, target
    chosen = RunConfig(force="locks")
    chosen.validate()
    assert chosen.force == "locks"
    aligned = RunConfig(**RUNNING_URL, mode="aligned")
    aligned.validate()
    assert aligned.force is None  # nothing is forced
    # --hold-ms means the pause handshake's hold: with it against a running target, say pause.
    with pytest.raises(UsageError, match="--hold-ms"):
        RunConfig(**RUNNING_URL, hold_ms=10.0).validate()
    RunConfig(**RUNNING_URL, hold_ms=10.0, force="pause").validate()


def test_a_profile_that_implements_the_pause_handshake_says_so(tmp_path: Path) -> None:
    cooperating = _team_profile(tmp_path, 'base_url = "http://127.0.0.1:8000"\nforce = "pause"')
    config = RunConfig(profile=cooperating, **RUNNING)
    config.validate()
    assert config.force == "pause"
    plain = RunConfig(profile=_team_profile(tmp_path, 'base_url = "http://127.0.0.1:8000"'))
    plain.target_dsn, plain.gateway_url = RUNNING["target_dsn"], RUNNING["gateway_url"]
    plain.validate()
    assert plain.force == "locks"


def test_gates_are_checked_against_the_strategies_the_run_settles_on(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="did you mean 'for_update:lock_p99_ms<=5'"):
        RunConfig(gates=[Gate.parse("for_updte:lock_p99_ms<=5")]).validate()
    with pytest.raises(UsageError, match="add --strategy naive"):
        RunConfig(gates=[Gate.parse("naive:lock_p99_ms<=5")]).validate()
    RunConfig(gates=[Gate.parse("for_update:lock_p99_ms<=5")]).validate()  # the default strategy
    profile = _team_profile(tmp_path, 'base_url = "http://127.0.0.1:8000"')
    with pytest.raises(UsageError, match="named after its profile, 'shop'"):
        RunConfig(
            profile=profile, gates=[Gate.parse("for_update:violations<=0")], **RUNNING
        ).validate()
    RunConfig(profile=profile, gates=[Gate.parse("shop:violations<=0")], **RUNNING).validate()


def test_a_baseline_is_read_before_the_run(tmp_path: Path) -> None:
    gate = Gate.parse("lock_p99_ms<=1.5*baseline")
    with pytest.raises(UsageError, match="give --baseline FILE"):
        RunConfig(gates=[gate]).validate()
    with pytest.raises(UsageError, match="no such file"):
        RunConfig(gates=[gate], baseline=tmp_path / "nope.json").validate()
    path = tmp_path / "baseline.json"
    stats = {"count": 5, "p99": 8.0}
    strategies = {"for_update": {"latency_ms": {"lock": {"all": stats}}}}
    path.write_text(json.dumps({"run_id": "r1", "mode": "forced", "strategies": strategies}))
    config = RunConfig(gates=[gate], baseline=path)
    config.validate()
    assert config.loaded_baseline() is not None
    assert config.loaded_baseline().measure("for_update", "lock_p99_ms") == 8.0  # type: ignore[union-attr]
    with pytest.raises(UsageError, match="is a directory"):
        RunConfig(write_baseline=tmp_path).validate()


def test_an_out_directory_that_cannot_be_written_is_refused_up_front(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UsageError, match=r"--out .* cannot take the reports"):
        RunConfig(out_dir=blocker / "reports").validate()
    RunConfig(out_dir=tmp_path / "new" / "reports").validate()
    assert list((tmp_path / "new" / "reports").iterdir()) == []  # the probe file is gone
