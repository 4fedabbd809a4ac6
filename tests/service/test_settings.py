"""service/settings.py: DSN normalisation, strategy and isolation spellings, the environment."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from payrace.service.settings import Settings, get_settings, normalise_dsn

ENV = (
    "DATABASE_URL",
    "CAPTURE_STRATEGY",
    "ISOLATION_LEVEL",
    "PAYRACE_PROBES",
    "DB_POOL_SIZE",
    "RAZORPAY_BASE_URL",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:p@db.example:5433/payrace",
        "postgres://u:p@db.example:5433/payrace",
        "postgresql+psycopg://u:p@db.example:5433/payrace",
        "postgresql+asyncpg://u:p@db.example:5433/payrace",
    ],
)
def test_every_usual_postgres_url_becomes_the_asyncpg_dialect_url(dsn: str) -> None:
    assert normalise_dsn(dsn) == "postgresql+asyncpg://u:p@db.example:5433/payrace"
    assert Settings(database_url=dsn).database_url == normalise_dsn(dsn)


def test_normalising_keeps_query_parameters_and_is_idempotent() -> None:
    dsn = "postgresql://u@/payrace?host=/tmp/sock"

    once = normalise_dsn(dsn)

    assert once == "postgresql+asyncpg://u@/payrace?host=/tmp/sock"
    assert normalise_dsn(once) == once


@pytest.mark.parametrize(
    "dsn",
    ["mysql://u@h/db", "sqlite:///payrace.db", "u@127.0.0.1:5432/payrace", "", "postgresql:/x"],
)
def test_a_url_of_another_scheme_is_refused_with_an_example_of_a_good_one(dsn: str) -> None:
    with pytest.raises(ValueError, match=r"must be a PostgreSQL URL such as postgresql://"):
        normalise_dsn(dsn)
    with pytest.raises(ValidationError, match="DATABASE_URL must be a PostgreSQL URL"):
        Settings(database_url=dsn)


@pytest.mark.parametrize(
    ("spelling", "level"),
    [
        ("READ COMMITTED", "READ COMMITTED"),
        ("read committed", "READ COMMITTED"),
        ("read_committed", "READ COMMITTED"),
        ("Repeatable_Read", "REPEATABLE READ"),
        ("repeatable read", "REPEATABLE READ"),
        ("serializable", "SERIALIZABLE"),
    ],
)
def test_isolation_level_accepts_sql_and_snake_case_spellings(spelling: str, level: str) -> None:
    assert Settings(isolation_level=spelling).isolation_level == level


@pytest.mark.parametrize("spelling", ["READ UNCOMMITTED", "dirty", "readcommitted", 3])
def test_an_unknown_isolation_level_is_refused(spelling: object) -> None:
    with pytest.raises(ValidationError, match="isolation_level"):
        Settings(isolation_level=spelling)


def test_strategy_must_be_one_the_service_has() -> None:
    assert Settings(capture_strategy="naive").capture_strategy == "naive"
    with pytest.raises(ValidationError, match="capture_strategy"):
        Settings(capture_strategy="fastest")


@pytest.mark.parametrize(
    ("field", "value"),
    [("db_pool_size", 0), ("db_max_overflow", -1), ("gateway_threads", 0)],
)
def test_pool_sizes_out_of_range_are_refused(field: str, value: int) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})  # type: ignore[arg-type]


def test_defaults_are_the_fixed_strategy_at_read_committed_with_probes_off() -> None:
    settings = Settings()

    assert settings.capture_strategy == "for_update"
    assert settings.isolation_level == "READ COMMITTED"
    assert settings.payrace_probes is False
    assert settings.webhook_dedupe is True
    assert settings.database_url.startswith("postgresql+asyncpg://")


def test_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://env@10.0.0.1/envdb")
    monkeypatch.setenv("CAPTURE_STRATEGY", "naive")
    monkeypatch.setenv("ISOLATION_LEVEL", "repeatable_read")
    monkeypatch.setenv("PAYRACE_PROBES", "true")
    monkeypatch.setenv("DB_POOL_SIZE", "7")
    monkeypatch.setenv("WEBHOOK_DEDUPE", "0")

    settings = get_settings()

    assert settings.database_url == "postgresql+asyncpg://env@10.0.0.1/envdb"
    assert settings.capture_strategy == "naive"
    assert settings.isolation_level == "REPEATABLE READ"
    assert settings.payrace_probes is True
    assert settings.db_pool_size == 7
    assert settings.webhook_dedupe is False
    assert get_settings() is settings  # read once per process


def test_a_bad_environment_fails_at_startup_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://root@localhost/shop")

    with pytest.raises(ValidationError, match="database_url"):
        get_settings()
