"""What a target's error answers mean, read without a database or a web stack.

    DELIBERATE_CODES   error codes a target answers on purpose, with a status it chose
    is_crash()         (status, code) -> a crash, as checker.no_5xx judges a 5xx

Kept apart from checker (which reads PostgreSQL's audit rows through psycopg) because every
Locust process classifies the target's answers as they arrive, and a load machine runs with
nothing but Locust and hdrhistogram installed (locustfiles/README.md, "Light workers").
"""

from __future__ import annotations

# A 5xx carrying one of these is an answer about a fault (the gateway's, the database's), not
# a crash of the target (no_5xx).
DELIBERATE_CODES = frozenset(
    {"gateway_error", "gateway_refused", "database_unavailable", "retry_later"}
)


def is_crash(status: int, code: str | None) -> bool:
    """As checker.no_5xx judges a 5xx: a 500, or no deliberate error code."""
    return status == 500 or code not in DELIBERATE_CODES
