"""payrace/harness/infra/env.py: one name per database setting; the old name is still read
for one release, with a message naming the new name for the place it was read."""

from __future__ import annotations

import pytest

from payrace.harness.infra import env


@pytest.fixture(autouse=True)
def _fresh_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(env, "_told", set())


def test_the_new_name_is_read_and_nothing_is_said() -> None:
    said: list[str] = []
    value = env.read(env.DSN, {"PAYRACE_DSN": "postgresql://a@h/db"}, say=said.append)
    assert value == "postgresql://a@h/db" and said == []


def test_the_new_name_wins_over_the_old_one() -> None:
    variables = {"PAYRACE_TARGET_DSN": "postgresql://new@h/shop", env.DEPRECATED: "old"}
    assert env.read(env.TARGET_DSN, variables) == "postgresql://new@h/shop"


@pytest.mark.parametrize(
    ("name", "meaning"),
    [("PAYRACE_DSN", "throwaway databases"), ("PAYRACE_TARGET_DSN", "own database")],
)
def test_the_old_name_still_works_and_says_which_new_name_to_use(name: str, meaning: str) -> None:
    said: list[str] = []
    variables = {"PAYRACE_DATABASE_URL": "postgresql://old@h/db"}
    assert env.read(name, variables, say=said.append) == "postgresql://old@h/db"
    (message,) = said
    assert "PAYRACE_DATABASE_URL is deprecated" in message
    assert f"set {name} instead" in message and meaning in message
    env.read(name, variables, say=said.append)
    assert len(said) == 1  # once per process is enough


def test_nothing_set_is_none() -> None:
    assert env.read(env.DSN, {"PAYRACE_DSN": "", "OTHER": "x"}) is None


def test_the_deprecation_goes_to_stderr_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    env.read(env.DSN, {"PAYRACE_DATABASE_URL": "postgresql://old@h/db"})
    assert "set PAYRACE_DSN instead" in capsys.readouterr().err
