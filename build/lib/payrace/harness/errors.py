"""The one error a user's mistake raises anywhere in the harness.

    UsageError   the user's input cannot work; the message says what to change (exit 2)

The CLI, the pytest plugin and `payrace load` catch this one type and print its message
without a traceback; everything else is a bug or an infrastructure failure.
"""

from __future__ import annotations


class UsageError(ValueError):
    """The user's input cannot work; the message says what to change."""
