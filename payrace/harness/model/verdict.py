"""One verdict everywhere: how checker results become a run's word and its exit code.

    EXIT_*        0 valid, 1 violated / unknown / gate breached, 2 usage or infrastructure,
                  130 interrupted
    DECLARED      what each reference strategy is declared to be (naive must be caught)
    verdict_of()  one composed validity -> (word, exit code)
    overall()     every strategy's validity and every gate -> (word, exit code)

Run, explore and load all go through these, so the exit code, summary.json, JUnit, HTML and
the console can only say the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

# A type only: every Locust process, a light worker too, reads the exit codes from here.
if TYPE_CHECKING:
    from payrace.harness.model.checker import Validity

EXIT_OK, EXIT_VIOLATED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

# What each strategy is declared to be: naive is kept to prove the harness catches the bug.
DECLARED: dict[str, str] = {"naive": "violated", "for_update": "valid", "advisory": "valid"}


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
    strategies: Mapping[str, Mapping[str, Any]], gates: Sequence[Mapping[str, Any]]
) -> tuple[str, int]:
    if any(r["valid"] is False for r in strategies.values()):
        return "violated", EXIT_VIOLATED
    if any(r["valid"] is not True for r in strategies.values()):
        return "unknown", EXIT_VIOLATED
    if any(not g["passed"] for g in gates):
        return "gate_breached", EXIT_VIOLATED
    return "valid", EXIT_OK
