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
reads the payment (SQL on the capture's transaction, `tx`, an asyncpg connection with `$n`
parameters), and whether that read takes a row lock.
"""

from __future__ import annotations

from payrace.service.capture import Strategy
from payrace.service.models import PAYMENT_COLUMNS, PaymentRow
from payrace.service.sql import Tx

# The payment alone: the capture then reads the order's amount and currency itself (one
# more statement; capture.read_with_order reads both in one).
READ = f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = $1"


async def read_no_key_update(tx: Tx, payment_id: int) -> PaymentRow | None:
    return PaymentRow.of(await tx.fetchrow(READ + " FOR NO KEY UPDATE", payment_id))


async def read_for_share(tx: Tx, payment_id: int) -> PaymentRow | None:
    return PaymentRow.of(await tx.fetchrow(READ + " FOR SHARE", payment_id))


NO_KEY_UPDATE = Strategy(
    "no_key_update", "SELECT ... FOR NO KEY UPDATE, status checked after the lock",
    read_no_key_update, lock_rows=True,
)  # fmt: skip
FOR_SHARE = Strategy(
    "for_share", "SELECT ... FOR SHARE: both may hold it, then deadlock on the write",
    read_for_share, lock_rows=True,
)  # fmt: skip
