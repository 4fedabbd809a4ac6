"""Engine, sessions and schema of the reference service.

The session dependency hands each request an `AsyncSession` from one
`async_sessionmaker(expire_on_commit=False)`, for the routes off the capture path; the
capture path runs its transactions on asyncpg directly (payrace.service.sql).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from payrace.service.models import Base
from payrace.service.settings import Settings, normalise_dsn


def make_engine(settings: Settings, *, pool_size: int | None = None) -> AsyncEngine:
    return create_async_engine(
        normalise_dsn(settings.database_url),
        pool_size=settings.db_pool_size if pool_size is None else pool_size,
        max_overflow=settings.db_max_overflow,
        pool_pre_ping=False,
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def create_schema(engine: AsyncEngine) -> None:
    """Create the tables if missing (idempotent; a harness may have created them first)."""
    async with engine.begin() as conn:
        # Two workers starting at once would race on CREATE TABLE; a transaction-scoped
        # advisory lock makes the second one find the tables already there.
        await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(720131)")
        await conn.run_sync(Base.metadata.create_all)


async def session_scope(maker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with maker() as session:
        yield session
