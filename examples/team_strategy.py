"""A team brings its own capture strategy (docs/strategies.md), raced by import path:

    payrace run     --strategy examples.team_strategy:NO_KEY_UPDATE --mode forced
    payrace explore --strategy examples.team_strategy:NO_KEY_UPDATE
    payrace compare --strategy for_update --strategy examples.team_strategy:NO_KEY_UPDATE

NO_KEY_UPDATE   `SELECT ... FOR NO KEY UPDATE`: the lock an UPDATE of non-key columns takes,
                weaker than FOR UPDATE (it lets foreign-key checks through); valid
FOR_SHARE       `SELECT ... FOR SHARE`, a common first attempt: both requests hold the share
                lock, then each waits for the other's to write: a deadlock, which payrace
                reports (no_deadlock), although PostgreSQL breaks it and the retry succeeds

Each is a `payrace.service.capture.Strategy`: a name, a line saying what it does, how it
reads the payment, and whether the invoice and order rows are read FOR UPDATE too.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from payrace.service.capture import Strategy
from payrace.service.models import Payment


async def read_no_key_update(session: AsyncSession, payment_id: int) -> Payment | None:
    stmt = select(Payment).where(Payment.id == payment_id).with_for_update(key_share=True)
    # populate_existing: the status checked after the lock is the committed one.
    result = await session.execute(stmt.execution_options(populate_existing=True))
    return result.scalar_one_or_none()


async def read_for_share(session: AsyncSession, payment_id: int) -> Payment | None:
    stmt = select(Payment).where(Payment.id == payment_id).with_for_update(read=True)
    result = await session.execute(stmt.execution_options(populate_existing=True))
    return result.scalar_one_or_none()


NO_KEY_UPDATE = Strategy(
    "no_key_update", "SELECT ... FOR NO KEY UPDATE, status checked after the lock",
    read_no_key_update, lock_rows=True,
)  # fmt: skip
FOR_SHARE = Strategy(
    "for_share", "SELECT ... FOR SHARE: both may hold it, then deadlock on the write",
    read_for_share, lock_rows=True,
)  # fmt: skip
