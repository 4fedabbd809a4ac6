"""payrace/harness/runner/forcing.py: forced mode from the harness's own row locks and gateway
holds, on a real PostgreSQL; the requests are a team's code written here (a schema of its
own, its own connections), and the reference service over HTTP with nothing of payrace's in it.

The scratch database holds a team's schema (team_schema.py) plus receipts that hang off orders.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import psycopg
import pytest
from psycopg import sql
from team_schema import TEAM_SCHEMA

from payrace.harness.errors import UsageError
from payrace.harness.gateway.controls import LocalGateway
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.processes import ServiceProcess, service_env
from payrace.harness.infra.provider import Database, provide_postgres
from payrace.harness.model.watched import OracleConfig, WatchedTable
from payrace.harness.runner.config import RunConfig
from payrace.harness.runner.forcing import (
    Backend,
    LockForcing,
    Snapshot,
    attributed,
    behind_parked,
)
from payrace.harness.runner.run import run

KEYS = GatewayKeys()
TEAM = OracleConfig(
    payments=WatchedTable(
        "billing.charge", "settled", id_column="charge_no", status_column="state"
    ),
    invoices=WatchedTable(
        "billing.bill", "cleared", payment_column="charge_no", id_column="bill_no",
        status_column="Bill State",
    ),
    orders=WatchedTable(
        "billing.purchase", "complete", id_column="purchase_no", status_column="state"
    ),
    payment_order_column="purchase_no",
    gateway_payment_column="rzp_id",
)  # fmt: skip
RECEIPTS = """
CREATE TABLE billing.receipt (
    receipt_no bigint PRIMARY KEY, purchase_no bigint REFERENCES billing.purchase,
    state text NOT NULL);
"""
_ids = itertools.count(1)


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(pg: Database) -> Iterator[str]:
    name = f"payrace_forcing_{secrets.token_hex(4)}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = urlunsplit(urlsplit(pg.url)._replace(path=f"/{name}"))
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(TEAM_SCHEMA)
            conn.execute(RECEIPTS)
        yield url
    finally:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
async def service_pool(scratch: str) -> AsyncIterator[asyncpg.Pool]:
    """The team service's own connections (not named payrace-…)."""
    pool = await asyncpg.create_pool(
        scratch, min_size=2, max_size=6, server_settings={"application_name": "team-service"}
    )
    try:
        yield pool
    finally:
        await pool.close()


async def new_payment(url: str) -> int:
    """A purchase, its charge (pending), two bills and a receipt; the charge number."""
    n = next(_ids)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO billing.purchase VALUES ($1, 'open')", n)
        await conn.execute(
            "INSERT INTO billing.charge VALUES ($1, $1, $2, 'pending', now())", n, f"pay_{n}"
        )
        for bill in (2 * n, 2 * n + 1):
            await conn.execute("INSERT INTO billing.bill VALUES ($1, $2, 'open')", bill, n)
        await conn.execute("INSERT INTO billing.receipt VALUES ($1, $1, 'open')", n)
    finally:
        await conn.close()
    return n


async def lockable(conn: asyncpg.Connection, table: str, column: str, value: int) -> bool:
    try:
        async with conn.transaction():
            await conn.fetch(f"SELECT 1 FROM {table} WHERE {column} = $1 FOR UPDATE NOWAIT", value)
        return True
    except asyncpg.LockNotAvailableError:
        return False


# -- which waits belong to a trial -------------------------------------------------------------

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def snapshot(parked: tuple[int, ...] = (), **backends: tuple[int, ...]) -> Snapshot:
    """Backends named p<pid>, each with its blockers; every one inside a transaction; those in
    `parked` idle in it (their client waits on something else)."""
    return Snapshot(
        {int(k[1:]): Backend(T0, b, int(k[1:]) in parked) for k, b in backends.items()}, {}
    )


def test_waits_that_lead_to_the_barrier_through_any_chain_are_the_trials() -> None:
    # 11 waits for the barrier (1), 12 queues behind 11 on the row, 13 behind 12; 21 waits for
    # 20, which runs freely (another trial's request): not held by this trial's barrier.
    snap = snapshot(p1=(), p11=(1,), p12=(11,), p13=(12, 20), p20=(), p21=(20,))
    assert attributed(snap, 1, set()) == {(11, T0), (12, T0), (13, T0)}
    assert attributed(snap, 99, set()) == set()


def test_a_wait_behind_a_request_already_seen_held_is_the_trials_and_cycles_end() -> None:
    # 20 was seen blocked by the barrier before and now runs (held at the gateway): 21 waiting
    # for it is held by the trial. A transaction seen before is the same pid *and* start.
    snap = snapshot(p1=(), p20=(), p21=(20,), p30=(31,), p31=(30,))
    assert attributed(snap, 1, {(20, T0)}) == {(21, T0)}
    later = datetime(2024, 1, 2, tzinfo=UTC)
    assert attributed(snap, 1, {(20, later)}) == set()  # the pooled backend's next transaction
    assert attributed(snap, 1, set()) == set()  # a deadlock cycle is nobody's barrier
    # A cycle on the way to the barrier: each member still leads to it, whichever is asked first.
    snap = snapshot(p1=(), p40=(41, 1), p41=(40,))
    assert attributed(snap, 1, set()) == {(40, T0), (41, T0)}


def test_waits_behind_a_parked_request_no_barrier_saw_are_grouped_by_it() -> None:
    # 20 holds an advisory lock and is parked (held at the gateway); 21 and 22 queue behind
    # it. 11 waits for barrier 1, 12 behind 11: a barrier accounts for them. 30 is parked
    # but 1 saw it: not a stranger. 40 waits behind 41, which is busy, not parked.
    snap = snapshot(
        parked=(20, 30), p1=(), p11=(1,), p12=(11,), p20=(), p21=(20,), p22=(21,), p30=(),
        p31=(30,), p40=(41,), p41=(),
    )  # fmt: skip
    groups = behind_parked(snap, [(1, {(30, T0)})])
    assert groups == {20: {(21, T0), (22, T0)}}
    assert behind_parked(snapshot(p20=(), p21=(20,)), []) == {}  # 20 not parked


# -- the barrier on a real database -------------------------------------------------------------


async def test_the_barrier_locks_the_trials_rows_and_lets_go_in_capture_order(
    scratch: str,
) -> None:
    charge, other = await new_payment(scratch), await new_payment(scratch)
    probe = await asyncpg.connect(scratch)
    rows = {
        "payment": ("billing.charge", "charge_no", charge),
        "invoices": ("billing.bill", "charge_no", charge),
        "order": ("billing.purchase", "purchase_no", charge),
    }

    async def still_locked() -> set[str]:
        return {name for name, row in rows.items() if not await lockable(probe, *row)}

    try:
        async with (
            LockForcing(scratch, TEAM, None, timeout_s=5, concurrency=1) as forcing,
            forcing.trial(charge, "pay_unused") as barrier,
        ):
            assert await still_locked() == {"payment", "invoices", "order"}
            # Plain reads pass; another payment's rows are free.
            assert (
                await probe.fetchval(
                    "SELECT state FROM billing.charge WHERE charge_no = $1", charge
                )
                == "pending"
            )
            assert await lockable(probe, "billing.charge", "charge_no", other)
            await barrier._let_go("payment")
            assert await still_locked() == {"invoices", "order"}
            await barrier._let_go("invoice")
            assert await still_locked() == {"order"}
            await barrier._let_go("order")
            assert await still_locked() == set()
    finally:
        await probe.close()


async def test_invoices_that_hang_off_orders_are_locked_through_the_order(scratch: str) -> None:
    # The invoices' link to the order (another change adds it to the oracle's description):
    # the barrier reads it with getattr, so a description of that shape works already.
    receipts = SimpleNamespace(
        table="billing.receipt", payment_column=None, order_column="purchase_no",
        id_column="receipt_no", status_column="state", done_value="paid",
    )  # fmt: skip
    schema: Any = SimpleNamespace(
        payments=TEAM.payments, invoices=receipts, orders=TEAM.orders,
        payment_order_column="purchase_no",
    )  # fmt: skip
    charge = await new_payment(scratch)
    probe = await asyncpg.connect(scratch)
    try:
        async with (
            LockForcing(scratch, schema, None, timeout_s=5, concurrency=1) as forcing,
            forcing.trial(charge, "pay_unused") as barrier,
        ):
            assert not await lockable(probe, "billing.receipt", "purchase_no", charge)
            await barrier._let_go("payment")
            await barrier._let_go("invoice")
            assert await lockable(probe, "billing.receipt", "purchase_no", charge)
    finally:
        await probe.close()


async def test_a_schema_that_does_not_match_the_targets_tables_is_a_usage_error(
    scratch: str,
) -> None:
    async with LockForcing(scratch, TEAM, None, timeout_s=5, concurrency=1) as forcing:
        for missing in (999999, "not-a-number"):
            with pytest.raises(UsageError, match=rf"holds no row for the payment_id '{missing}'"):
                async with forcing.trial(missing, "pay_unused"):
                    pass
    wrong = OracleConfig(
        payments=WatchedTable("billing.charge", "settled", id_column="charge_id"),
        invoices=TEAM.invoices,
        orders=TEAM.orders,
        payment_order_column="purchase_no",
    )
    with pytest.raises(UsageError, match=r"no column 'charge_id' in table 'billing.charge'"):
        async with LockForcing(scratch, wrong, None, timeout_s=5, concurrency=1):
            pass


# -- forcing a team's flows ---------------------------------------------------------------------

Flow = Callable[[int], Awaitable[str]]


async def force(scratch: str, flows: list[Flow], trials: int, **kw: Any) -> list[list[str]]:
    """Each trial: a fresh payment, its flows raced under the barrier; their outcomes, sorted.
    Every trial must have been forced."""
    outcomes = []
    async with LockForcing(scratch, TEAM, kw.get("gateway"), timeout_s=5, concurrency=1) as lf:
        for _ in range(trials):
            charge = await new_payment(scratch)
            async with lf.trial(charge, kw.get("gateway_payment", lambda: "pay_x")()) as barrier:
                results = await barrier.run([partial(f, charge) for f in flows])
            assert barrier.forced and barrier.timeouts == 0, barrier
            outcomes.append(sorted(results))
    return outcomes


def capture_flow(pool: asyncpg.Pool, *, for_update: bool) -> Flow:
    """Read the charge, settle it if pending: the incident (plain read) or its fix."""

    async def flow(charge: int) -> str:
        async with pool.acquire() as conn, conn.transaction():
            lock = " FOR UPDATE" if for_update else ""
            state = await conn.fetchval(
                f"SELECT state FROM billing.charge WHERE charge_no = $1{lock}", charge
            )
            if state == "settled":
                return "repeat"
            await conn.execute(
                "UPDATE billing.charge SET state = 'settled' WHERE charge_no = $1", charge
            )
            await conn.execute(
                """UPDATE billing.bill SET "Bill State" = 'cleared' WHERE charge_no = $1""",
                charge,
            )
            await conn.execute(
                "UPDATE billing.purchase SET state = 'complete' WHERE purchase_no = $1", charge
            )
            return "settled"

    return flow


async def test_a_plain_read_then_write_is_forced_to_settle_twice_and_for_update_once(
    scratch: str, service_pool: asyncpg.Pool
) -> None:
    naive = capture_flow(service_pool, for_update=False)
    assert await force(scratch, [naive, naive], trials=5) == [["settled", "settled"]] * 5
    fixed = capture_flow(service_pool, for_update=True)
    assert await force(scratch, [fixed, fixed], trials=5) == [["repeat", "settled"]] * 5


def ordered_flow(pool: asyncpg.Pool, first: str, second: str) -> Flow:
    """Lock two rows of the payment in the given order (table.column names)."""

    async def flow(charge: int) -> str:
        async with pool.acquire() as conn:
            await conn.execute("SET deadlock_timeout = '100ms'")  # the suite need not wait 1 s
            try:
                async with conn.transaction():
                    for row in (first, second):
                        table, column = row.rsplit(".", 1)
                        await conn.execute(
                            f"SELECT 1 FROM {table} WHERE {column} = $1 FOR UPDATE", charge
                        )
                return "ok"
            except asyncpg.DeadlockDetectedError:
                return "deadlock"

    return flow


async def test_a_lock_order_inversion_deadlocks_in_every_forced_trial(
    scratch: str, service_pool: asyncpg.Pool
) -> None:
    # The callback locks the payment, then the invoice; the webhook the other way round. Let
    # go of the payment first, the callback then queues behind the webhook on the invoice,
    # and letting go of the invoice hands it to the webhook: each now waits for the other.
    callback = ordered_flow(service_pool, "billing.charge.charge_no", "billing.bill.charge_no")
    webhook = ordered_flow(service_pool, "billing.bill.charge_no", "billing.charge.charge_no")
    assert await force(scratch, [callback, webhook], trials=3) == [["deadlock", "ok"]] * 3
    # One lock order for both: no deadlock, however they are forced.
    assert await force(scratch, [callback, callback], trials=3) == [["ok", "ok"]] * 3


def gateway_flow(pool: asyncpg.Pool, http: httpx.AsyncClient, pay: str, lock: str) -> Flow:
    """Read the charge (plainly, FOR UPDATE, or after an advisory lock on it), capture at the
    gateway, then write: the gateway call before any write."""

    async def flow(charge: int) -> str:
        async with pool.acquire() as conn, conn.transaction():
            if lock == "advisory":
                await conn.execute("SELECT pg_advisory_xact_lock(7, $1)", charge)
            suffix = " FOR UPDATE" if lock == "for_update" else ""
            state = await conn.fetchval(
                f"SELECT state FROM billing.charge WHERE charge_no = $1{suffix}", charge
            )
            if state == "settled":
                return "repeat"
            response = await http.post(
                f"/v1/payments/{pay}/capture", json={"amount": 50000, "currency": "INR"}
            )
            if response.status_code != 200:
                return response.json()["error"]["description"]
            await conn.execute(
                "UPDATE billing.charge SET state = 'settled' WHERE charge_no = $1", charge
            )
            return "settled"

    return flow


async def test_captures_held_at_the_gateway_are_let_go_together_or_in_turn(
    scratch: str, service_pool: asyncpg.Pool
) -> None:
    fake = FakeRazorpay(KEYS)
    gateway = LocalGateway(fake)
    with GatewayServer(fake) as server:
        async with httpx.AsyncClient(
            base_url=server.url, auth=(KEYS.key_id, KEYS.key_secret)
        ) as http:
            for lock in ("none", "for_update", "advisory"):
                order = fake.create_order({"amount": 50000, "currency": "INR"})
                pay = fake.authorize_payment(order["id"])["id"]
                flow = gateway_flow(service_pool, http, pay, lock)
                outcomes = await force(
                    scratch, [flow, flow], trials=1, gateway=gateway,
                    gateway_payment=lambda p=pay: p,
                )  # fmt: skip
                if lock == "none":
                    # Both read pending and reach the gateway: let go together, the second
                    # capture is answered as Razorpay answers it.
                    assert outcomes == [["This payment has already been captured", "settled"]]
                    assert fake.counters()["captures"][pay] == 2
                else:
                    # The first holds the row (or the advisory lock, which no barrier sees)
                    # while held at the gateway; the second, queued behind it, counts as held
                    # too, so the gateway is let go without waiting out a timeout.
                    assert outcomes == [["repeat", "settled"]], lock
                    assert fake.counters()["captures"][pay] == 1
                assert fake.holds() == {}


# -- the reference service -------------------------------------------------------------------


async def test_the_reference_service_in_process_is_forced_by_locks_too(
    pg: Database, tmp_path: Path
) -> None:
    # for_update with three webhooks beside the callback; naive with one: its webhooks, each
    # inserting its event (FOR KEY SHARE on the payment) before updating the payment's unique
    # gateway id, deadlock in nearly every trial, which PostgreSQL breaks only after
    # deadlock_timeout (1 s): 11 of this test's 13 s.
    runs = [
        RunConfig(
            strategies=[strategy], trials=12, force="locks", webhooks=webhooks, dsn=pg.url,
            out_dir=tmp_path / strategy,
        )
        for strategy, webhooks in (("naive", 1), ("for_update", 3))
    ]  # fmt: skip
    summaries = [await run(config, announce=lambda line: None) for config in runs]
    naive, fixed = (s["strategies"][c.strategies[0]] for s, c in zip(summaries, runs, strict=True))
    summary = summaries[1]
    assert naive["violating_trials"] == 12
    assert naive["forced"] == {"by": "locks", "trials": 12, "forced": 12, "timeouts": 0}
    # In-process the requests still pass a recorder: the violation comes with its schedule.
    reads = [e for e in naive["first_violation"]["timeline"] if e["text"].startswith("read pay")]
    assert len(reads) >= 2
    assert fixed["valid"] is True, fixed["checks"]
    assert fixed["forced"] == {"by": "locks", "trials": 12, "forced": 12, "timeouts": 0}
    assert summary["force"] == "locks"


# -- the reference service over HTTP, nothing of payrace's inside -----------------------------


@pytest.mark.slow
async def test_a_running_service_without_the_pause_handshake_is_forced_by_locks(
    pg: Database, gateway_url: str, tmp_path: Path
) -> None:
    """The issue's bar: the buggy flow caught in >= 99 % of 200 forced trials with no pause
    header; the fix valid over 200, nothing unknown."""
    configs = []
    with ExitStack() as stack:
        # Each strategy's service in a process of its own, on a database of its own (its
        # deadlock count too); the two runs side by side, each on an event loop of its own in
        # a thread: the oracle's wait for the deadlock count to settle (up to 15 s for a
        # running target) blocks its loop, and would stall the other run's trials.
        for strategy, expect in (("naive", "violated"), ("for_update", "valid")):
            db = stack.enter_context(provide_postgres(pg.url, announce=lambda line: None))
            env = service_env(db, gateway_url, strategy, keys=KEYS, probes=False)
            proc = stack.enter_context(ServiceProcess(env))
            config = RunConfig(
                strategies=["target"], trials=200, mode="forced", target=proc.url,
                target_dsn=db.url, gateway_url=gateway_url, out_dir=tmp_path / strategy,
                expect=expect,
            )  # fmt: skip
            configs.append(config)
        summaries = await asyncio.gather(
            *(asyncio.to_thread(asyncio.run, run(c, announce=lambda line: None)) for c in configs)
        )
    assert all(c.force == "locks" for c in configs)  # the default for a running target
    naive, fixed = (summary["strategies"]["target"] for summary in summaries)
    assert naive["valid"] is False
    assert naive["violating_trials"] >= 0.99 * 200, naive["forced"]
    assert naive["forced"]["by"] == "locks" and naive["forced"]["forced"] >= 0.99 * 200
    assert fixed["valid"] is True, fixed["checks"]
    assert not [n for n, c in fixed["checks"].items() if c["valid"] == "unknown"]
    assert fixed["forced"] == {"by": "locks", "trials": 200, "forced": 200, "timeouts": 0}
    assert fixed["checks"]["single_capture_write"]["checked"] >= 200
