"""PostgreSQL words that users type and every part reads: connection URLs, isolation levels.

    DsnError             a URL that is not a PostgreSQL one (a ValueError saying what to write)
    libpq_url()          any spelling a user pastes -> postgresql:// (libpq, psycopg, asyncpg)
    dialect_url()        the same URL as SQLAlchemy wants it: postgresql+asyncpg:// ...
    ISOLATION_CODES      the three isolation levels payrace races, with their short codes
    normalise_isolation() read_committed, "read committed", rc ... -> READ COMMITTED
    refused_for_good()   a connection error that waiting cannot mend (a refused login)

The service, the provider, the oracle, the explorer and the CLI all read these words from
users (flags, environment, scenario files); written once here, standard library only, so
the Locust processes and the service can import it without the rest of the harness.
"""

from __future__ import annotations

import re

_SCHEME = re.compile(r"^(?:postgres|postgresql)(?:\+[\w.]+)?://", re.IGNORECASE)
EXPECTED = (
    "expected postgresql://user[:password]@host[:port]/dbname (postgres:// and "
    "postgresql+asyncpg:// work too; a unix socket is postgresql://user@/dbname?host=/socket/dir)"
)

ISOLATION_CODES: dict[str, str] = {
    "READ COMMITTED": "rc",
    "REPEATABLE READ": "rr",
    "SERIALIZABLE": "sr",
}
_SHORT = {code.upper(): level for level, code in ISOLATION_CODES.items()}


class DsnError(ValueError):
    """Not a PostgreSQL URL; the message says what one looks like."""


def libpq_url(dsn: str) -> str:
    """postgres://, postgresql://, postgresql+driver:// -> postgresql:// (what libpq reads)."""
    text = dsn.strip()
    scheme = _SCHEME.match(text)
    if scheme is None:
        raise DsnError(f"not a PostgreSQL URL: {EXPECTED}")
    return "postgresql://" + text[scheme.end() :]


def dialect_url(dsn: str, driver: str = "asyncpg") -> str:
    """The SQLAlchemy spelling of `dsn` for `driver` (asyncpg, psycopg)."""
    return f"postgresql+{driver}://" + libpq_url(dsn).removeprefix("postgresql://")


def normalise_isolation(value: str) -> str:
    """The SQL spelling of an isolation level; ValueError naming the three otherwise."""
    level = value.replace("_", " ").replace("-", " ").strip().upper()
    level = " ".join(level.split())
    level = _SHORT.get(level, level)
    if level not in ISOLATION_CODES:
        raise ValueError(
            f"unknown isolation level {value!r}; choose READ COMMITTED, REPEATABLE READ "
            "or SERIALIZABLE"
        )
    return level


# What a server says when it will never take this login, however long one waits.
_FOR_GOOD = (
    "password authentication failed",
    "authentication failed",
    "does not exist",  # role or database
    "no pg_hba.conf entry",
    "no password supplied",
    "permission denied",
)


def refused_for_good(message: str) -> bool:
    """The server answered and refused the login (SQLSTATE class 28, a missing database):
    retrying cannot help, unlike a server that is starting, restarting or briefly away."""
    low = message.lower()
    return any(marker in low for marker in _FOR_GOOD)
