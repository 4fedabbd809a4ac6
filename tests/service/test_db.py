"""payrace/service/db.py: engine, sessions and schema, on a database of this module's own.

The module creates a fresh database on the session's server, so "the tables do not exist
yet" is real here, and drops it afterwards.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from payrace.harness.infra.provider import Database
from payrace.service.db import create_schema, make_engine, make_sessionmaker, session_scope
from payrace.service.models import Order
from payrace.service.settings import Settings

TABLES = {"orders", "payments", "invoices", "webhook_events"}


@pytest.fixture(scope="module")
def fresh_url(pg: Database) -> Iterator[str]:
    """libpq URL of an empty database created for this module."""
    name = f"payrace_test_db_{secrets.token_hex(4)}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urlsplit(pg.url)
    try:
        yield urlunsplit(parts._replace(path="/" + name))
    finally:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
async def engine(fresh_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(Settings(database_url=fresh_url, db_pool_size=3, db_max_overflow=2))
    try:
        yield engine
    finally:
        await engine.dispose()


async def tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        )
        return {str(name) for (name,) in rows}


async def test_engine_speaks_asyncpg_even_when_given_a_plain_libpq_url(
    fresh_url: str, engine: AsyncEngine
) -> None:
    assert fresh_url.startswith("postgresql://")
    assert engine.url.drivername == "postgresql+asyncpg"
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT current_database()"))).scalar_one() == (
            urlsplit(fresh_url).path.lstrip("/")
        )


async def test_engine_pool_is_sized_from_the_settings(engine: AsyncEngine) -> None:
    assert engine.pool.size() == 3  # type: ignore[attr-defined]
    assert engine.pool._max_overflow == 2  # type: ignore[attr-defined]


async def test_schema_created_by_several_workers_starting_at_once(fresh_url: str) -> None:
    # Four services booting together on an empty database: without serialising CREATE TABLE
    # the losers would fail on duplicate catalog entries.
    engines = [make_engine(Settings(database_url=fresh_url)) for _ in range(4)]
    try:
        await asyncio.gather(*(create_schema(e) for e in engines))
        assert await tables(engines[0]) >= TABLES
        await create_schema(engines[0])  # and again, once they exist
        assert await tables(engines[0]) >= TABLES
    finally:
        await asyncio.gather(*(e.dispose() for e in engines))


async def test_sessions_keep_loaded_values_after_commit(engine: AsyncEngine) -> None:
    await create_schema(engine)
    maker = make_sessionmaker(engine)

    async with maker() as session, session.begin():
        order = Order(gateway_order_id="order_" + secrets.token_hex(7), amount=100, currency="INR")
        session.add(order)

    # expire_on_commit=False: no lazy load (which would fail outside a greenlet) after commit.
    assert (order.status, order.amount) == ("created", 100)
    assert order.id > 0


async def test_session_scope_yields_one_session_and_closes_it(engine: AsyncEngine) -> None:
    maker = make_sessionmaker(engine)
    scope = session_scope(maker)

    session = await anext(scope)
    assert isinstance(session, AsyncSession)
    assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
    assert session.in_transaction()
    with pytest.raises(StopAsyncIteration):
        await anext(scope)

    assert not session.in_transaction()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
