"""Settings of the reference capture service, read from the environment.

DATABASE_URL              postgresql+asyncpg://... (plain postgresql:// is accepted and upgraded)
CAPTURE_STRATEGY          naive | for_update | ... | package.module:Name (service.strategies)
ISOLATION_LEVEL           READ COMMITTED | REPEATABLE READ | SERIALIZABLE
RAZORPAY_KEY_ID / RAZORPAY_KEY_SECRET / RAZORPAY_WEBHOOK_SECRET
RAZORPAY_BASE_URL         where the gateway calls go (the fake gateway in tests)
GATEWAY_CLIENT            lean (default): payrace's asyncio HTTP client speaking the razorpay
                          SDK's wire format on the event loop; sdk: the razorpay SDK itself, in
                          a thread pool (service.gateway_client)
PAYRACE_PROBES            honour the test-only X-Payrace-Pause header (off: it makes requests wait)
DB_POOL_SIZE / DB_MAX_OVERFLOW
GATEWAY_THREADS           gateway calls at once: the SDK's threads; the lean client's cap
RECONCILE_INTERVAL_S      how often the sweeper asks the gateway about captures whose answer was
                          lost (0: no sweeper; payrace.service.reconcile)
RECONCILE_AFTER_S         a capture intent is swept once it is this old and still not captured
MAX_BODY_BYTES            larger request bodies are refused with 413 before they are read whole
WEBHOOK_DEDUPE            record each webhook's X-Razorpay-Event-Id under a unique key and answer
                          a redelivery as a duplicate (default on; off: every delivery is
                          processed, and only the strategy's status check keeps it idempotent)
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from payrace.postgres import DsnError, dialect_url, normalise_isolation
from payrace.service.strategies import resolve

IsolationLevel = Literal["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"]


def normalise_dsn(value: str) -> str:
    """Turn any PostgreSQL URL a user is likely to paste into the asyncpg dialect URL."""
    try:
        return dialect_url(value, "asyncpg")
    except DsnError:
        raise ValueError(
            "DATABASE_URL must be a PostgreSQL URL such as "
            "postgresql://user@127.0.0.1:5432/dbname (got a value with another scheme)"
        ) from None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/payrace"
    capture_strategy: str = "for_update"  # a name or package.module:Name
    isolation_level: IsolationLevel = "READ COMMITTED"
    razorpay_key_id: str = "rzp_test_payrace00000001"
    razorpay_key_secret: str = "payrace_key_secret"
    razorpay_webhook_secret: str = "payrace_webhook_secret"
    razorpay_base_url: str = "https://api.razorpay.com"
    payrace_probes: bool = False
    db_pool_size: int = Field(default=20, ge=1, le=500)
    db_max_overflow: int = Field(default=20, ge=0, le=500)
    gateway_threads: int = Field(default=64, ge=1, le=512)
    # Both speak the same wire format; the lean one costs a fraction of the CPU per call.
    gateway_client: Literal["lean", "sdk"] = "lean"
    # Serialisation failures at REPEATABLE READ / SERIALIZABLE are retried this many times
    # before the caller gets a retryable 409.
    serialization_retries: int = Field(default=3, ge=0, le=20)
    # Razorpay retries a webhook for 24 hours; the sweeper covers the capture no webhook
    # reports. Old enough that a request still in flight is never swept from under itself.
    reconcile_interval_s: float = Field(default=15.0, ge=0, le=86400)
    reconcile_after_s: float = Field(default=30.0, ge=0, le=86400)
    # Razorpay's webhook bodies are a few KiB; 64 KiB leaves room and bounds memory per request.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=64 * 1024 * 1024)
    # Dedupe is a choice of its own, combinable with any strategy (docs/strategies.md).
    webhook_dedupe: bool = True

    @field_validator("database_url")
    @classmethod
    def _dsn(cls, value: str) -> str:
        return normalise_dsn(value)

    @field_validator("capture_strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        resolve(value)  # UnknownStrategy is a ValueError: a validation error naming the fix
        return value

    @field_validator("gateway_client", mode="before")
    @classmethod
    def _client(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("isolation_level", mode="before")
    @classmethod
    def _isolation(cls, value: object) -> object:
        # Accept read_committed / "read committed" / rc as well as the SQL spelling.
        return normalise_isolation(value) if isinstance(value, str) else value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
