"""model.verdict: one verdict word and exit code for run, explore and load."""

from __future__ import annotations

from payrace.harness.model.verdict import (
    RunOutcome,
    against_declared,
    invariants_outcome,
    overall,
    verdict_of,
)


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


def test_a_run_outcome_reads_back_what_its_command_stamped() -> None:
    summary: dict[str, object] = {}
    outcome = invariants_outcome(
        {"naive": {"valid": False}, "for_update": {"valid": True}},
        [{"expr": "lock_p99_ms<=5", "value": 9.0, "passed": False}],
    )
    outcome.stamp(summary)
    assert summary["verdict"] == "violated" and summary["exit_code"] == 1
    assert RunOutcome.of(summary) == outcome
    assert outcome.reasons == ("naive: violated", "gate lock_p99_ms<=5: breached, measured 9.0")
    assert outcome.line() == "violated (exit code 1)"
    # a summary no command stamped is never read as a pass
    assert RunOutcome.of({}).exit_code == 2


def test_a_race_exits_0_only_when_every_strategy_is_as_declared() -> None:
    caught = {
        "naive": {"expected": "violated", "valid": False},
        "fix": {"expected": "valid", "valid": True},
    }
    outcome = against_declared(caught)
    assert (outcome.verdict, outcome.exit_code, outcome.judged) == ("as_declared", 0, "declared")
    assert caught["naive"]["as_declared"] is True
    missed = {"naive": {"expected": "violated", "valid": True}}
    outcome = against_declared(missed)
    assert (outcome.verdict, outcome.exit_code) == ("not_as_declared", 1)
    assert outcome.reasons == ("naive: declared violated, found valid",)
    assert missed["naive"]["as_declared"] is False
    unknown = against_declared({"fix": {"expected": "valid", "valid": "unknown"}})
    assert unknown.exit_code == 1
