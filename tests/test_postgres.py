"""payrace.postgres: the URL and isolation-level spellings every part reads from users."""

from __future__ import annotations

import pytest

from payrace.postgres import DsnError, dialect_url, libpq_url, normalise_isolation


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u@h:5432/db",
        "postgres://u@h:5432/db",
        "postgresql+asyncpg://u@h:5432/db",
        "POSTGRESQL+psycopg://u@h:5432/db",
        "  postgresql://u@h:5432/db\n",
    ],
)
def test_every_spelling_becomes_the_libpq_and_the_dialect_url(dsn: str) -> None:
    assert libpq_url(dsn) == "postgresql://u@h:5432/db"
    assert dialect_url(dsn) == "postgresql+asyncpg://u@h:5432/db"
    assert dialect_url(dsn, "psycopg") == "postgresql+psycopg://u@h:5432/db"


@pytest.mark.parametrize("dsn", ["mysql://u@h/db", "host=h dbname=db", "", "postgresql:/x"])
def test_another_scheme_is_refused_with_an_example(dsn: str) -> None:
    with pytest.raises(DsnError, match=r"expected postgresql://user"):
        libpq_url(dsn)


@pytest.mark.parametrize(
    ("spelling", "level"),
    [
        ("READ COMMITTED", "READ COMMITTED"),
        ("read_committed", "READ COMMITTED"),
        ("repeatable-read", "REPEATABLE READ"),
        ("rr", "REPEATABLE READ"),
        (" serializable ", "SERIALIZABLE"),
    ],
)
def test_isolation_spellings(spelling: str, level: str) -> None:
    assert normalise_isolation(spelling) == level


@pytest.mark.parametrize("spelling", ["bogus", "READ UNCOMMITTED", "readcommitted", ""])
def test_an_unknown_isolation_level_names_the_three(spelling: str) -> None:
    with pytest.raises(ValueError, match="choose READ COMMITTED, REPEATABLE READ or SERIALIZABLE"):
        normalise_isolation(spelling)
