"""model.verdict: one verdict word and exit code for run, explore and load."""

from __future__ import annotations

from payrace.harness.model.verdict import overall, verdict_of


def test_unknown_is_not_a_pass() -> None:
    clean = {"valid": True}
    assert overall({"a": clean}, []) == ("valid", 0)
    assert overall({"a": clean, "b": {"valid": "unknown"}}, []) == ("unknown", 1)
    assert overall({"a": {"valid": False}, "b": {"valid": "unknown"}}, []) == ("violated", 1)
    assert overall({"a": clean}, [{"passed": False}]) == ("gate_breached", 1)


def test_one_validity_gives_one_word_and_code() -> None:
    assert verdict_of(True) == ("valid", 0)
    assert verdict_of(False) == ("violated", 1)
    assert verdict_of("unknown") == ("unknown", 1)
    assert verdict_of("unknown", unknown_exit=2) == ("unknown", 2)
