"""payrace/harness/model/deadlocks.py: cycles found, xids placed, deadlocks tied to payments.

The pure parts on hand-made graphs; then real deadlocks on the embedded PostgreSQL: two
connections update a payment's charge and receipt rows in opposite orders while a LockWatch
samples and the oracle audits, and the judge must name that payment with both statements.
Each real test has a database of its own (the deadlock counter is per database).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql
from team_schema import SHOP_SCHEMA, SHOP_TOML

from payrace.harness.infra.provider import Database
from payrace.harness.model import oracle
from payrace.harness.model.deadlocks import (
    CycleMember,
    LockCycle,
    describe_lock,
    find_cycles,
    full_xid,
    names_deadlock,
    verify,
)
from payrace.harness.model.history import Operation
from payrace.harness.model.judge import judge
from payrace.harness.model.lockwatch import LockWatch
from payrace.harness.model.watched import OracleConfig

# -- the pure parts -----------------------------------------------------------------------


def test_find_cycles_finds_each_knot_and_nothing_in_a_queue() -> None:
    assert find_cycles({1: [2], 2: [1]}) == [frozenset({1, 2})]
    assert find_cycles({1: [2], 2: [3], 3: [1], 4: [1]}) == [frozenset({1, 2, 3})]  # 4 waits
    assert find_cycles({1: [2], 2: [3], 3: []}) == []  # a queue behind one holder
    assert find_cycles({1: [9], 2: [1]}) == []  # 9 holds a lock and waits for nothing
    assert sorted(find_cycles({1: [2], 2: [1], 5: [6], 6: [5, 1]}), key=min) == [
        frozenset({1, 2}),
        frozenset({5, 6}),
    ]
    long = {i: [i + 1] for i in range(5000)} | {5000: [0]}  # no recursion limit
    assert find_cycles(long) == [frozenset(range(5001))]


def test_full_xid_places_a_32_bit_xid_in_its_epoch() -> None:
    assert full_xid(812, 900) == 812
    assert full_xid(901, 900) == 901  # a snapshot's xmax may trail a running xid
    epoch = 3 << 32
    assert full_xid(812, epoch + 900) == epoch + 812
    # Across a wraparound, either way.
    assert full_xid(0xFFFFFF00, epoch + 5) == epoch - (1 << 32) + 0xFFFFFF00
    assert full_xid(5, epoch - 2) == epoch + 5


def test_describe_lock_says_what_the_member_waits_for() -> None:
    assert (
        describe_lock({"locktype": "transactionid", "mode": "ShareLock", "transactionid": "813"})
        == "transaction 813 (ShareLock)"
    )
    row = {
        "locktype": "tuple",
        "mode": "ExclusiveLock",
        "relation": "payments",
        "page": 0,
        "tuple": 5,
    }
    assert describe_lock(row) == "row (0,5) of payments (ExclusiveLock)"
    assert describe_lock({"locktype": None}).startswith("a lock (gone")


def _reply(value: dict[str, Any], error: str | None = None, type: str = "fail") -> Operation:
    return Operation(
        index=1,
        time=0,
        type=type,
        f="verify",
        process="client",
        trial=3,
        payment=7,
        value=value,
        status=409,
        error=error,
    )


def test_names_deadlock_reads_the_reply_body_and_the_error_text() -> None:
    retry = {"error": {"code": "retry_later", "sqlstate": "40P01", "message": "retry"}}
    assert names_deadlock(_reply(retry))
    assert names_deadlock(_reply({}, error="ERROR: deadlock detected\nDETAIL: Process 1 ..."))
    assert not names_deadlock(_reply({"error": {"code": "retry_later", "sqlstate": "40001"}}))
    assert not names_deadlock(_reply(retry, type="invoke"))  # what was sent says nothing


def _member(pid: int, xid: int | None, status: str | None = None) -> CycleMember:
    return CycleMember(pid, xid, f"UPDATE t{pid}", "transaction 1 (ShareLock)", (), xid, status)


def test_a_cycle_is_a_deadlock_unless_every_member_committed() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    assert LockCycle(at, (_member(1, 10, "aborted"), _member(2, 11, "committed"))).deadlock
    assert LockCycle(at, (_member(1, None), _member(2, 11, "committed"))).deadlock  # unknown
    assert not LockCycle(at, (_member(1, 10, "committed"), _member(2, 11, "committed"))).deadlock


# -- on a real PostgreSQL -----------------------------------------------------------------


@pytest.fixture
def shop(pg: Database, tmp_path: Path) -> Iterator[tuple[str, OracleConfig]]:
    """A database of its own with the shop schema (invoices hang off orders), audited:
    charge 10 (cart 1, receipt 100) and charge 20 (cart 2, receipt 200)."""
    name = f"payrace_deadlocks_{secrets.token_hex(4)}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    # A URL, not a conninfo: the LockWatch connects with asyncpg.
    url = urlunsplit(urlsplit(pg.url)._replace(path=f"/{name}"))
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SHOP_SCHEMA)
            conn.execute(
                "INSERT INTO shop.cart VALUES (1, 'open'), (2, 'open');"
                "INSERT INTO shop.charge VALUES (10, 1, 'pay_a', 'pending'),"
                " (20, 2, 'pay_b', 'pending');"
                "INSERT INTO shop.receipt VALUES (100, 1, 'due', NULL), (200, 2, 'due', NULL)"
            )
        path = tmp_path / "oracle.toml"
        path.write_text(SHOP_TOML)
        config = OracleConfig.from_toml(path)
        oracle.install(url, config)
        yield url, config
    finally:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(1000):  # 10 s at most
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


CHARGE = "UPDATE shop.charge SET phase = 'captured' WHERE charge_no = 10"
RECEIPT = "UPDATE shop.receipt SET phase = 'paid', paid_at = now() WHERE receipt_no = 100"


def _opposite_orders(url: str) -> list[str]:
    """The capture's two writes in opposite orders on two connections: one takes the charge
    then the receipt, the other the receipt then the charge. PostgreSQL aborts one after
    deadlock_timeout; the other commits. Returns what each saw."""
    a, b = psycopg.connect(url), psycopg.connect(url)
    outcomes: list[str] = []
    try:
        a.execute(CHARGE)
        b.execute(RECEIPT)

        def second(conn: psycopg.Connection[Any], statement: str) -> None:
            try:
                conn.execute(statement)
                conn.commit()
                outcomes.append("committed")
            except psycopg.errors.DeadlockDetected:
                conn.rollback()
                outcomes.append("deadlock")

        t = threading.Thread(target=second, args=(a, RECEIPT))
        t.start()
        second(b, CHARGE)
        t.join()
    finally:
        a.close()
        b.close()
    return outcomes


async def test_a_real_deadlock_is_tied_to_its_payment_with_both_statements(
    shop: tuple[str, OracleConfig],
) -> None:
    url, config = shop
    since = oracle.baseline(url)
    async with LockWatch(url, interval_s=0.005) as watch:
        await _until(lambda: watch.result.samples > 0, "a first sample")
        outcomes = await asyncio.to_thread(_opposite_orders, url)
    assert sorted(outcomes) == ["committed", "deadlock"]
    assert watch.result.to_json()["cycles"] == 1
    (seen,) = watch.result.cycles
    assert {m.query for m in seen.members} == {CHARGE, RECEIPT}
    assert all(m.xid is not None and m.waits_for.startswith("transaction") for m in seen.members)

    # Both connections closed: their backends flushed the counter on exit.
    obs = oracle.observe(
        url,
        config,
        since=since,
        payment_ids=[10, 20],
        settle_timeout_s=10,
        lock_cycles=watch.result.cycles,
    )
    assert (obs.deadlocks, obs.deadlocks_settled, obs.cycles_watched) == (1, True, True)
    assert sorted(str(m.status) for m in obs.cycles[0].members) == ["aborted", "committed"]

    judged = judge([], obs)
    result = judged.verdict.results["no_deadlock"]
    assert (result.valid, result.count, result.payments) == (False, 1, {10})
    assert result.first is not None
    assert set(result.first["statements"]) == {CHARGE, RECEIPT}
    assert judged.verdict.violating_payments == {10}
    assert judged.deadlock_summary() == {
        "counted": 1,
        "settled": True,
        "cycles_seen": 1,
        "attributed": 1,
        "unattributed": 0,
        "why_unattributed": "",
        "payments": [10],
    }
    first = judged.first_violation()
    assert first is not None
    assert first["payment"] == 10 and "no_deadlock" in first["checks"]
    members = first["deadlocks"]["cycles"][0]["members"]
    assert {m["query"] for m in members} == {CHARGE, RECEIPT}
    texts = [e["text"] for e in first["timeline"]]
    assert any("rolled back" in t for t in texts) and any("went on" in t for t in texts)
    # The survivor's writes are in the timeline too, in the same backend's column.
    survivor = next(m["pid"] for m in members if m["status"] == "committed")
    assert any(
        e["process"] == f"backend {survivor}" and "UPDATE" in e["text"] for e in first["timeline"]
    )


async def test_a_lock_wait_that_is_no_deadlock_is_valid(shop: tuple[str, OracleConfig]) -> None:
    """b queues behind a's lock on the charge, seen waiting by the sampler; a commits, then
    b: a wait, no cycle."""
    url, config = shop
    since = oracle.baseline(url)
    release = threading.Event()

    def queue() -> None:
        with psycopg.connect(url) as a, psycopg.connect(url) as b:
            a.execute(CHARGE)
            t = threading.Thread(target=lambda: (b.execute(CHARGE), b.commit()))
            t.start()
            release.wait(10)
            a.commit()
            t.join()

    async with LockWatch(url, interval_s=0.005) as watch:
        await _until(lambda: watch.result.samples > 0, "a first sample")
        done = asyncio.create_task(asyncio.to_thread(queue))
        try:
            await _until(lambda: watch.result.waiting_seen > 0, "b seen waiting")
        finally:
            release.set()
            await done
    assert watch.result.cycles == []
    obs = oracle.observe(
        url,
        config,
        since=since,
        payment_ids=[10],
        settle_timeout_s=10,
        lock_cycles=watch.result.cycles,
    )
    judged = judge([], obs)
    assert (obs.deadlocks, obs.deadlocks_settled) == (0, True)
    assert judged.verdict.results["no_deadlock"].valid is True
    assert judged.deadlock_summary()["unattributed"] == 0


def test_verify_reads_each_members_fate(shop: tuple[str, OracleConfig]) -> None:
    url, _ = shop
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            committed = conn.execute("SELECT txid_current()").fetchone()
        aborted = None
        try:
            with conn.transaction():
                aborted = conn.execute("SELECT txid_current()").fetchone()
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        assert committed is not None and aborted is not None
        at = datetime.now(UTC)
        cycle = LockCycle(
            at,
            (
                CycleMember(1, committed[0] % (1 << 32), "a", "x", (2,), committed[0]),
                CycleMember(2, aborted[0] % (1 << 32), "b", "y", (1,), aborted[0]),
                CycleMember(3, None, "c", "z", (1,)),
            ),
        )
        (read,) = verify(conn, [cycle])
    assert [m.status for m in read.members] == ["committed", "aborted", None]
