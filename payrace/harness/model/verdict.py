"""One verdict everywhere: how checker results become a run's word and its exit code.

    EXIT_*        0 valid, 1 violated / unknown / gate breached, 2 usage or infrastructure,
                  130 interrupted
    DECLARED      what each reference strategy is declared to be (naive must be caught)
    DECLARED_LEVELS  the isolation levels a strategy is declared at, where not all
    verdict_of()  one composed validity -> (word, exit code)
    overall()     every strategy's validity and every gate -> (word, exit code); a gate that
                  could not be measured (model.gates) leaves the run unknown, never passed
    RunOutcome    the run's verdict word, exit code, how it was judged (invariants or
                  declared) and why; stamp() writes it into the summary, of() reads it back
    invariants_outcome() `payrace run`: overall() as a RunOutcome, with its reasons
    against_declared()   `payrace race`: every strategy against its declared verdict

Run, explore and load all go through these, so the exit code, summary.json, JUnit, HTML and
the console can only say the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# A type only: every Locust process, a light worker too, reads the exit codes from here.
if TYPE_CHECKING:
    from payrace.harness.model.checker import Validity

EXIT_OK, EXIT_VIOLATED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

# What each strategy is declared to be: naive is kept to prove the harness catches the bug.
DECLARED: dict[str, str] = {
    "naive": "violated",
    "for_update": "valid",
    "advisory": "valid",
    "nowait": "valid",
    "skip_locked": "valid",
    "optimistic": "valid",
    "serializable": "valid",
    "atomic": "valid",
}

# Where a strategy is declared valid at some isolation levels only (the isolation matrix,
# explore.matrix): pg_advisory_xact_lock is the transaction's first statement, so at
# REPEATABLE READ and SERIALIZABLE the snapshot is taken before the lock is granted and the
# second request still reads the payment as the first found it. Measured and shown there, not
# judged; every level not listed here is declared for a strategy of DECLARED.
DECLARED_LEVELS: dict[str, tuple[str, ...]] = {"advisory": ("READ COMMITTED",)}


def verdict_of(valid: Validity, *, unknown_exit: int = EXIT_VIOLATED) -> tuple[str, int]:
    """The summary's verdict word and the exit code it sets.

    Not proven is not passed: "unknown" never exits 0. `payrace load` answers it with 2, since
    there it means the gate could not observe at all (no database, a crashed Locust)."""
    if valid is True:
        return "valid", EXIT_OK
    if valid is False:
        return "violated", EXIT_VIOLATED
    return "unknown", unknown_exit


def overall(
    strategies: Mapping[str, Mapping[str, Any]],
    gates: Sequence[Mapping[str, Any]],
    *,
    unknown_exit: int = EXIT_VIOLATED,
) -> tuple[str, int]:
    if any(r["valid"] is False for r in strategies.values()):
        return "violated", EXIT_VIOLATED
    if any(r["valid"] is not True for r in strategies.values()):
        return "unknown", unknown_exit
    # A gate without a measured value or threshold decided nothing (model.gates).
    decided = [
        g for g in gates if g.get("value", 0) is not None and g.get("threshold", 0) is not None
    ]
    if any(not g["passed"] for g in decided):
        return "gate_breached", EXIT_VIOLATED
    if len(decided) < len(gates):
        return "unknown", unknown_exit
    return "valid", EXIT_OK


# ---------------------------------------------------------------------------- the run's word

# The run's verdict word, as summary.json's `verdict` says it, and how a person reads it.
VERDICT_WORDS: dict[str, str] = {
    "valid": "valid",
    "violated": "violated",
    "gate_breached": "gate breached",
    "unknown": "unknown (not proven is not passed)",
    "as_declared": "as declared",
    "not_as_declared": "not as declared",
    "error": "error: the run cannot be trusted",
    "setup_error": "setup error",
    "target_stopped": "target stopped answering: the run is incomplete",
}


@dataclass(frozen=True)
class RunOutcome:
    """A run's outcome, decided once by its command and stamped into the summary; the exit
    code, summary.json, junit.xml, report.html and the console all read it back from there.

    judged: "invariants" (`run`, `load`, `explore`): any violation, unknown or breached gate
    is red, also for a strategy declared unsafe. "declared" (`race`, an explore scenario with
    expectations): a strategy is red only when it is not what it is declared to be, and each
    strategy carries `as_declared`."""

    verdict: str
    exit_code: int
    judged: str = "invariants"
    reasons: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.exit_code == EXIT_OK

    def line(self) -> str:
        """`violated (exit code 1)`: the words the console, the HTML header and JUnit share."""
        word = VERDICT_WORDS.get(self.verdict, self.verdict)
        return f"{word} (exit code {self.exit_code})"

    def stamp(self, summary: dict[str, Any]) -> dict[str, Any]:
        summary["verdict"] = self.verdict
        summary["exit_code"] = self.exit_code
        summary["judged"] = self.judged
        summary["verdict_reasons"] = list(self.reasons)
        return summary

    @classmethod
    def of(cls, summary: Mapping[str, Any]) -> RunOutcome:
        """What the summary says; a summary without an exit code (never written by a
        command) reads as an error, never as a pass."""
        code = summary.get("exit_code")
        return cls(
            verdict=str(summary.get("verdict") or "unknown"),
            exit_code=code if isinstance(code, int) and not isinstance(code, bool) else EXIT_ERROR,
            judged=str(summary.get("judged") or "invariants"),
            reasons=tuple(str(r) for r in summary.get("verdict_reasons") or ()),
        )


def found_word(valid: object) -> str:
    if valid is True:
        return "valid"
    return "violated" if valid is False else "unknown"


def against_declared(
    strategies: Mapping[str, dict[str, Any]], problems: Sequence[str] = ()
) -> RunOutcome:
    """`payrace race`: each strategy against what it is declared to be (`expected`); marks
    each with `as_declared`. Exit 0 only when every one is as declared."""
    misses = []
    for name, result in strategies.items():
        found = found_word(result.get("valid"))
        result["as_declared"] = found == result.get("expected")
        if not result["as_declared"]:
            misses.append(f"{name}: declared {result.get('expected') or 'nothing'}, found {found}")
    if problems:
        return RunOutcome("error", EXIT_ERROR, "declared", (*problems, *misses))
    if misses:
        return RunOutcome("not_as_declared", EXIT_VIOLATED, "declared", tuple(misses))
    return RunOutcome("as_declared", EXIT_OK, "declared")


def invariants_outcome(
    strategies: Mapping[str, Mapping[str, Any]], gates: Sequence[Mapping[str, Any]]
) -> RunOutcome:
    """`payrace run`: overall() with the reasons in words (which strategy, which gate)."""
    verdict, code = overall(strategies, gates)
    reasons = [
        f"{name}: {found_word(r['valid'])}"
        for name, r in strategies.items()
        if r["valid"] is not True
    ]
    reasons += [
        f"gate {g.get('expr', '?')}: "
        + (
            "not measured"
            if g.get("value") is None or g.get("threshold", 0) is None
            else f"breached, measured {g['value']}"
            + (f" against {g['threshold']}" if g.get("threshold") is not None else "")
        )
        for g in gates
        if not g["passed"]
    ]
    return RunOutcome(verdict, code, "invariants", tuple(reasons))
