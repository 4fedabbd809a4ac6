"""payrace's database settings in the environment: one name per meaning.

    DSN          PAYRACE_DSN          a PostgreSQL server payrace creates throwaway databases
                                      on (`--dsn` of run, race, explore, load; the pytest
                                      plugin; the provider's first route)
    TARGET_DSN   PAYRACE_TARGET_DSN   a running target's own database, watched where it is
                                      (`--target-dsn` of run and load; the Locust master's gate)
    DEPRECATED   PAYRACE_DATABASE_URL meant either, depending on the command; still read for
                                      one release in both places, with a message naming the
                                      new name for the place it was read
    read(name)   the value of DSN or TARGET_DSN, else of DEPRECATED (and the message once)

Light on purpose (the standard library only): every Locust process reads TARGET_DSN.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping

DSN = "PAYRACE_DSN"
TARGET_DSN = "PAYRACE_TARGET_DSN"
DEPRECATED = "PAYRACE_DATABASE_URL"

MEANING = {
    DSN: "a PostgreSQL server payrace creates its throwaway databases on",
    TARGET_DSN: "the running service's own database, where the oracle watches",
}
_told: set[str] = set()


def deprecation(name: str) -> str:
    return (
        f"payrace: {DEPRECATED} is deprecated and will stop working in the next release; "
        f"set {name} instead ({MEANING[name]})"
    )


def read(
    name: str,
    env: Mapping[str, str] = os.environ,
    *,
    say: Callable[[str], None] | None = None,
) -> str | None:
    """`name`'s value, else the deprecated variable's (said once per process and name)."""
    value = env.get(name)
    if value:
        return value
    old = env.get(DEPRECATED)
    if not old:
        return None
    if name not in _told:
        _told.add(name)
        (say or _to_stderr)(deprecation(name))
    return old


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
