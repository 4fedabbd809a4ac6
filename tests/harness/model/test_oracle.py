"""harness/oracle.py on a real PostgreSQL: triggers, scoping, baselines, deadlocks, config.

The shared session database holds rows from other tests, so every test scopes its
observation to its own payment ids and takes its own baseline. Tests that need a database
to themselves (uninstall, a team's own schema, deadlocks) create a scratch database.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from sqlalchemy import create_engine
from team_schema import SHOP_SCHEMA, SHOP_TOML, TEAM_SCHEMA, TEAM_TOML

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.signing import (
    GatewayKeys,
    client_callback,
    signed_webhook,
    webhook_event,
)
from payrace.harness.infra.provider import Database
from payrace.harness.model import oracle
from payrace.harness.model.checker import check
from payrace.harness.model.history import History, classify
from payrace.harness.model.watched import OracleConfig, OracleError, WatchedTable
from payrace.service.models import Base

KEYS = GatewayKeys()
REFERENCE = OracleConfig.reference()


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def reference_tables(pg: Database) -> str:
    engine = create_engine(pg.psycopg_url())
    try:
        with engine.begin() as conn:
            # Same lock as service.db.create_schema: services may be creating the tables too.
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(720131)")
            Base.metadata.create_all(conn)
    finally:
        engine.dispose()
    return pg.url


@pytest.fixture
def audited(reference_tables: str) -> str:
    """The session database with the reference tables and the oracle installed (again: other
    tests share the database and may have uninstalled it)."""
    oracle.install(reference_tables)
    return reference_tables


@pytest.fixture
def scratch(pg: Database) -> Iterator[str]:
    """A database of its own on the same server, dropped afterwards."""
    name = f"payrace_oracle_{secrets.token_hex(4)}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(pg.url, dbname=name)
    finally:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def team(scratch: str, tmp_path: Path) -> tuple[str, OracleConfig]:
    """A team's own schema (other names, a schema-qualified table, a quoted column)."""
    with psycopg.connect(scratch, autocommit=True) as conn:
        conn.execute(TEAM_SCHEMA)
        conn.execute(
            "INSERT INTO billing.purchase VALUES (1, 'open'), (2, 'open');"
            "INSERT INTO billing.charge VALUES (10, 1, 'pay_a', 'pending', NULL),"
            " (20, 2, 'pay_b', 'pending', NULL);"
            "INSERT INTO billing.bill VALUES (100, 10, 'due'), (200, 20, 'due')"
        )
    path = tmp_path / "oracle.toml"
    path.write_text(TEAM_TOML)
    config = OracleConfig.from_toml(path)
    oracle.install(scratch, config)
    return scratch, config


@pytest.fixture
def shop(scratch: str, tmp_path: Path) -> tuple[str, OracleConfig]:
    """A schema whose invoices hang off orders ([invoices] order_column)."""
    with psycopg.connect(scratch, autocommit=True) as conn:
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
    oracle.install(scratch, config)
    return scratch, config


# -- helpers ------------------------------------------------------------------------------


def _new_payment(url: str) -> int:
    """Order, payment and invoice rows as POST /orders writes them, by plain SQL."""
    gateway_order = f"order_{secrets.token_hex(7)}"
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        order = conn.execute(
            "INSERT INTO orders (gateway_order_id, amount, currency, status) "
            "VALUES (%s, 50000, 'INR', 'created') RETURNING id",
            (gateway_order,),
        ).fetchone()
        assert order is not None
        payment = conn.execute(
            "INSERT INTO payments (order_id, amount, currency, status) "
            "VALUES (%s, 50000, 'INR', 'pending') RETURNING id",
            order,
        ).fetchone()
        assert payment is not None
        conn.execute(
            "INSERT INTO invoices (order_id, payment_id, amount, amount_paid, status) "
            "VALUES (%s, %s, 50000, 0, 'issued')",
            (order[0], payment[0]),
        )
        return int(payment[0])


def _capture_by_sql(url: str, payment: int, *, with_rest: bool = True) -> None:
    """One transaction doing what a capture does: payment, then invoice, then order."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute(
            "UPDATE payments SET status = 'captured', captured_at = clock_timestamp(), "
            "gateway_payment_id = coalesce(gateway_payment_id, %s) WHERE id = %s",
            (f"pay_{secrets.token_hex(7)}", payment),
        )
        if with_rest:
            conn.execute(
                "UPDATE invoices SET status = 'paid', amount_paid = amount, "
                "paid_at = clock_timestamp() WHERE payment_id = %s",
                (payment,),
            )
            conn.execute(
                "UPDATE orders SET status = 'paid', paid_at = clock_timestamp() "
                "WHERE id = (SELECT order_id FROM payments WHERE id = %s)",
                (payment,),
            )


def _rows(obs: oracle.Observation, table: str) -> list[oracle.AuditRow]:
    return [r for r in obs.audit if r.table == table]


# -- install ------------------------------------------------------------------------------


def _triggers(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            # Not the example shops' schema: their tests audit it in the session's database.
            "SELECT tgrelid::regclass::text, count(*) FROM pg_trigger WHERE tgname = %s "
            "AND tgrelid::regclass::text NOT LIKE 'shop.%%' GROUP BY 1",
            (oracle.TRIGGER,),
        ).fetchall()
    return {name: int(n) for name, n in rows}


def test_install_is_idempotent_and_survives_concurrent_installers(audited: str) -> None:
    oracle.install(audited)
    errors: list[BaseException] = []

    def install() -> None:
        try:
            oracle.install(audited)
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=install) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _triggers(audited) == {"payments": 1, "invoices": 1, "orders": 1}
    assert oracle.installed(audited)


def test_install_names_the_config_key_of_a_missing_column(audited: str) -> None:
    config = OracleConfig(
        payments=WatchedTable("payments", "captured", status_column="state"),
        invoices=REFERENCE.invoices,
        orders=REFERENCE.orders,
    )
    with pytest.raises(OracleError, match=r"payments\.status_column = 'state'.*no such column"):
        oracle.install(audited, config)


def test_install_refuses_a_missing_table_before_touching_anything(scratch: str) -> None:
    with pytest.raises(OracleError, match=r"payments\.table = 'payments': no such table"):
        oracle.install(scratch)
    assert not oracle.installed(scratch)


def test_uninstall_removes_triggers_and_schema(team: tuple[str, OracleConfig]) -> None:
    url, config = team
    assert set(_triggers(url)) == {"billing.charge", "billing.bill", "billing.purchase"}
    oracle.uninstall(url, config)
    assert _triggers(url) == {}
    assert not oracle.installed(url)
    oracle.uninstall(url, config)  # a no-op the second time
    with pytest.raises(OracleError, match="not installed"):
        oracle.observe(url, config, since=oracle.Baseline(0, 0))


# -- what the triggers record -------------------------------------------------------------


def test_sql_double_capture_is_caught_as_single_capture_write_violated(audited: str) -> None:
    payment = _new_payment(audited)
    since = oracle.baseline(audited)
    _capture_by_sql(audited, payment)
    _capture_by_sql(audited, payment, with_rest=False)  # a second transaction captures again

    obs = oracle.observe(audited, REFERENCE, since=since, payment_ids=[payment])
    writes = _rows(obs, "payments")
    assert [(r.op, r.old_status, r.new_status) for r in writes] == [
        ("UPDATE", "pending", "captured"),
        ("UPDATE", "captured", "captured"),
    ]
    assert writes[0].txid != writes[1].txid
    assert "captured_at" in writes[1].changed

    verdict = check([], obs)
    result = verdict.results["single_capture_write"]
    assert result.valid is False
    assert result.count == 1
    assert result.worst is not None
    assert result.worst["payment"] == payment
    assert result.worst["writes"] == 2
    assert result.worst["rewrites"] == 1
    assert result.worst["txids"] == [writes[0].txid, writes[1].txid]
    assert verdict.results["single_invoice_paid"].valid is True
    assert verdict.valid is False
    assert verdict.violating_payments == {payment}


def test_sql_clean_capture_is_valid_and_one_transaction_writes_all_three(audited: str) -> None:
    payment = _new_payment(audited)
    since = oracle.baseline(audited)
    _capture_by_sql(audited, payment)

    obs = oracle.observe(audited, REFERENCE, since=since, payment_ids=[payment])
    assert [r.table for r in obs.audit] == ["payments", "invoices", "orders"]
    assert len({r.txid for r in obs.audit}) == 1
    assert {r.payment_id for r in obs.audit} == {payment}
    state = obs.payments[payment]
    assert (state.status, state.invoice_status, state.order_status) == ("captured", "paid", "paid")

    verdict = check([], obs)
    for name in ("single_capture_write", "single_invoice_paid", "single_order_paid"):
        assert verdict.results[name].valid is True, verdict.results[name]
    assert verdict.results["single_capture_write"].checked == 1


def test_observe_scoped_to_payment_ids_ignores_other_payments(audited: str) -> None:
    mine, other = _new_payment(audited), _new_payment(audited)
    since = oracle.baseline(audited)
    _capture_by_sql(audited, mine)
    _capture_by_sql(audited, other)
    _capture_by_sql(audited, other, with_rest=False)  # a violation, but not in scope
    with psycopg.connect(audited) as conn:
        gids: dict[int, str] = dict(
            conn.execute(
                "SELECT id, gateway_payment_id FROM payments WHERE id = ANY(%s)", ([mine, other],)
            ).fetchall()
        )
    counters = {"captures": {gids[mine]: 1, gids[other]: 2}, "accepted": {gids[mine]: 1}}

    obs = oracle.observe(
        audited, REFERENCE, since=since, payment_ids=[mine], gateway_counters=counters
    )
    assert {r.payment_id for r in obs.audit} == {mine}
    assert len(obs.audit) == 3  # payment, invoice and order (mapped through payments.order_id)
    assert set(obs.payments) == {mine}
    assert obs.gateway_captures == {gids[mine]: 1}
    assert check([], obs).results["single_capture_write"].valid is True

    everything = oracle.observe(audited, REFERENCE, since=since, gateway_counters=counters)
    assert {mine, other} <= set(everything.payments)
    assert everything.gateway_captures == counters["captures"]
    assert check([], everything).results["single_capture_write"].valid is False


def test_baseline_excludes_earlier_audit_rows(audited: str) -> None:
    # Not Baseline(0, 0): the session database is shared, and a test that recreated the
    # tables leaves audit rows of an earlier payment with the same id.
    start = oracle.baseline(audited)
    payment = _new_payment(audited)
    _capture_by_sql(audited, payment)
    since = oracle.baseline(audited)

    obs = oracle.observe(audited, REFERENCE, since=since, payment_ids=[payment])
    assert obs.audit == ()
    assert obs.payments[payment].status == "captured"
    # Captured, but the capture is not in this window: the oracle cannot vouch for it.
    result = check([], obs).results["single_capture_write"]
    assert result.valid == "unknown"
    assert result.first is not None and result.first["problem"] == "no write seen"

    before = oracle.observe(audited, REFERENCE, since=start, payment_ids=[payment])
    assert [r.op for r in _rows(before, "payments")] == ["INSERT", "UPDATE"]


def test_a_team_schema_from_toml_is_audited_and_ignore_columns_apply(
    team: tuple[str, OracleConfig],
) -> None:
    url, config = team
    since = oracle.baseline(url)
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("UPDATE billing.charge SET state = 'settled' WHERE charge_no = 10")
            conn.execute("UPDATE billing.bill SET \"Bill State\" = 'cleared' WHERE bill_no = 100")
            conn.execute("UPDATE billing.purchase SET state = 'complete' WHERE purchase_no = 1")
        # An idempotent repeat that only bumps a harmless column: not a second capture.
        conn.execute("UPDATE billing.charge SET touched_at = now() WHERE charge_no = 10")

    obs = oracle.observe(url, config, since=since, payment_ids=[10])
    assert [(r.table, r.row_id, r.payment_id) for r in obs.audit] == [
        ("payments", 10, 10),
        ("invoices", 100, 10),
        ("orders", 1, 10),
        ("payments", 10, 10),
    ]
    assert obs.audit[-1].changed == ("touched_at",)
    state = obs.payments[10]
    assert (state.status, state.gateway_payment_id) == ("settled", "pay_a")
    assert (state.invoice_status, state.order_status) == ("cleared", "complete")
    verdict = check([], obs)
    for name in ("single_capture_write", "single_invoice_paid", "single_order_paid"):
        assert verdict.results[name].valid is True, verdict.results[name]


# -- invoices that hang off orders ---------------------------------------------------------


def _shop_capture(url: str, charge: int, *, invoice_only: bool = False) -> None:
    """One transaction capturing `charge`: the charge, its cart's receipt, its cart."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        if not invoice_only:
            conn.execute(
                "UPDATE shop.charge SET phase = 'captured' WHERE charge_no = %s", (charge,)
            )
        conn.execute(
            "UPDATE shop.receipt SET phase = 'paid', paid_at = clock_timestamp() "
            "WHERE cart_no = (SELECT cart_no FROM shop.charge WHERE charge_no = %s)",
            (charge,),
        )
        if not invoice_only:
            conn.execute(
                "UPDATE shop.cart SET phase = 'paid' "
                "WHERE cart_no = (SELECT cart_no FROM shop.charge WHERE charge_no = %s)",
                (charge,),
            )


def test_invoices_linked_through_orders_map_to_their_payment_and_one_capture_is_valid(
    shop: tuple[str, OracleConfig],
) -> None:
    url, config = shop
    since = oracle.baseline(url)
    _shop_capture(url, 10)
    _shop_capture(url, 20)

    obs = oracle.observe(url, config, since=since, payment_ids=[10])
    assert [(r.table, r.row_id, r.payment_id) for r in obs.audit] == [
        ("payments", 10, 10),
        ("invoices", 100, 10),  # receipt 100 belongs to cart 1, whose charge is 10
        ("orders", 1, 10),
    ]
    state = obs.payments[10]
    assert (state.status, state.invoice_status, state.order_status) == ("captured", "paid", "paid")
    verdict = check([], obs)
    assert verdict.results["single_invoice_paid"].valid is True
    assert verdict.results["single_invoice_paid"].checked == 1
    # No gateway was read here: whether the capture happened there is not known.
    assert verdict.results["no_phantom_capture"].valid == "unknown"
    assert all(r.valid is True for n, r in verdict.results.items() if n != "no_phantom_capture")


def test_a_double_invoice_update_through_orders_is_violated(
    shop: tuple[str, OracleConfig],
) -> None:
    url, config = shop
    since = oracle.baseline(url)
    _shop_capture(url, 10)
    _shop_capture(url, 10, invoice_only=True)  # a racing second writer marks it paid again

    obs = oracle.observe(url, config, since=since, payment_ids=[10, 20])
    verdict = check([], obs)
    result = verdict.results["single_invoice_paid"]
    assert (result.valid, result.count) == (False, 1), result
    assert result.worst is not None
    assert (result.worst["payment"], result.worst["row_id"], result.worst["writes"]) == (10, 100, 2)
    assert verdict.violating_payments == {10}
    assert verdict.results["single_capture_write"].valid is True


@pytest.mark.parametrize(
    ("invoices", "message"),
    [
        (
            WatchedTable(
                "shop.receipt",
                "paid",
                payment_column="cart_no",
                id_column="receipt_no",
                status_column="phase",
            ),
            r"invoices\.payment_column = 'cart_no': shop\.receipt\.cart_no is a foreign key to "
            r"the orders table shop\.cart.*invoices\.order_column = 'cart_no'",
        ),
        (
            WatchedTable(
                "shop.receipt",
                "paid",
                order_column="phase",
                id_column="receipt_no",
                status_column="phase",
            ),
            r"invoices\.order_column = 'phase': the oracle needs an integer id column",
        ),
        (
            WatchedTable(
                "shop.receipt",
                "paid",
                order_column="cart",
                id_column="receipt_no",
                status_column="phase",
            ),
            r"invoices\.order_column = 'cart': table shop\.receipt has no such column",
        ),
    ],
)
def test_install_refuses_an_invoice_link_that_cannot_be_right(
    shop: tuple[str, OracleConfig], invoices: WatchedTable, message: str
) -> None:
    url, config = shop
    with pytest.raises(OracleError, match=message):
        oracle.install(url, replace(config, invoices=invoices))


def test_install_refuses_an_order_column_that_references_payments(
    team: tuple[str, OracleConfig],
) -> None:
    """billing.bill.charge_no is a foreign key to the payments table: a payment id."""
    url, config = team
    invoices = replace(config.invoices, payment_column=None, order_column="charge_no")
    with pytest.raises(
        OracleError,
        match=r"foreign key to the payments table billing\.charge.*"
        r"invoices\.payment_column = 'charge_no'",
    ):
        oracle.install(url, replace(config, invoices=invoices))


# -- deadlocks ----------------------------------------------------------------------------


def _deadlock(url: str) -> None:
    """Two transactions lock two rows in opposite orders; PostgreSQL kills one of them."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS knot (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO knot VALUES (1, 0), (2, 0) ON CONFLICT DO NOTHING")
    a, b = psycopg.connect(url), psycopg.connect(url)
    outcomes: list[str] = []
    try:
        a.execute("UPDATE knot SET v = v + 1 WHERE id = 1")
        b.execute("UPDATE knot SET v = v + 1 WHERE id = 2")

        def second_lock(conn: psycopg.Connection[Any], row: int) -> None:
            try:
                conn.execute("UPDATE knot SET v = v + 1 WHERE id = %s", (row,))
                outcomes.append("ok")
            except psycopg.errors.DeadlockDetected:
                outcomes.append("deadlock")
            finally:
                conn.rollback()

        t = threading.Thread(target=second_lock, args=(a, 2))
        t.start()
        second_lock(b, 1)
        t.join()
    finally:
        a.close()
        b.close()
    assert sorted(outcomes) == ["deadlock", "ok"]


def test_deadlock_is_counted_once_the_backends_have_flushed(
    team: tuple[str, OracleConfig],
) -> None:
    url, config = team
    since = oracle.baseline(url)
    _deadlock(url)
    # Both backends exited, and a backend flushes its counters on exit.
    obs = oracle.observe(url, config, since=since, payment_ids=[], settle_timeout_s=10)
    assert (obs.deadlocks, obs.deadlocks_settled) == (1, True)
    result = check([], obs).results["no_deadlock"]
    assert (result.valid, result.count) == (False, 1)


def test_deadlocks_since_reads_the_delta_alone_from_a_baseline_that_went_through_json(
    team: tuple[str, OracleConfig],
) -> None:
    """payrace load's second reading: the baseline comes back from summary.json."""
    url, _ = team
    since = oracle.Baseline.from_json(json.loads(json.dumps(oracle.baseline(url).to_json())))
    assert oracle.deadlocks_since(url, since, settle_timeout_s=5) == (0, True, "")
    _deadlock(url)
    assert oracle.deadlocks_since(url, since, settle_timeout_s=10) == (1, True, "")
    with psycopg.connect(url, autocommit=True) as busy:  # a pool still open: not settled
        busy.execute("SELECT 1")
        delta, settled, note = oracle.deadlocks_since(url, since, settle_timeout_s=0)
    assert (delta, settled) == (1, False) and "settle_timeout_s" in note


def test_settled_waits_for_the_count_unless_the_run_is_violated_already(
    team: tuple[str, OracleConfig],
) -> None:
    """Read once while a backend may still hold counts; then either waited for (the counts
    flush as that backend exits) or, for a violated run, left as read with the reason."""
    url, config = team
    since = oracle.baseline(url)
    _deadlock(url)
    with psycopg.connect(url, autocommit=True) as busy:
        busy.execute("SELECT 1")
        first = oracle.observe(url, config, since=since, payment_ids=[], settle_timeout_s=0)
    assert not first.deadlocks_settled
    kept = oracle.settled(url, since, first, wait_s=15, violated=True)
    assert (kept.deadlocks, kept.deadlocks_settled) == (first.deadlocks, False)
    assert kept.deadlock_note.startswith("not waited for: the run is violated already")
    assert "--settle-s 15" in kept.deadlock_note
    waited = oracle.settled(url, since, first, wait_s=10, violated=False)
    assert (waited.deadlocks, waited.deadlocks_settled, waited.deadlock_note) == (1, True, "")


def test_a_zero_deadlock_delta_is_not_trusted_while_a_backend_may_hold_counts(
    team: tuple[str, OracleConfig],
) -> None:
    url, config = team
    since = oracle.baseline(url)
    with psycopg.connect(url, autocommit=True) as busy:
        busy.execute("SELECT 1")
        obs = oracle.observe(url, config, since=since, payment_ids=[], settle_timeout_s=0)
        assert (obs.deadlocks, obs.deadlocks_settled) == (0, False)
        assert "settle_timeout_s" in obs.deadlock_note
        assert check([], obs).results["no_deadlock"].valid == "unknown"
        # The harness's own read-only connections are not waited for.
        with psycopg.connect(url, autocommit=True, application_name="payrace-lockwatch") as w:
            w.execute("SELECT 1")
            busy.close()
            settled = oracle.observe(url, config, since=since, payment_ids=[], settle_timeout_s=5)
    assert (settled.deadlocks, settled.deadlocks_settled) == (0, True)
    assert check([], settled).results["no_deadlock"].valid is True


# -- the real reference service ------------------------------------------------------------


async def _order(svc: Any, gateway: FakeRazorpay) -> tuple[dict[str, Any], dict[str, Any]]:
    created = await svc.client.post("/orders", json={"amount": 50000, "currency": "INR"})
    assert created.status_code == 201, created.text
    order = created.json()
    return order, gateway.authorize_payment(order["gateway_order_id"])


async def _fire(
    history: History,
    svc: Any,
    f: str,
    process: str,
    payment: int,
    gw: dict[str, Any],
    event: str = "",
) -> None:
    if f == "verify":
        value: dict[str, Any] = {"gateway_payment_id": gw["id"]}
        body = {
            **client_callback(gw["order_id"], gw["id"], KEYS.key_secret),
            "internal_payment_id": payment,
        }
        send = svc.client.post("/payments/verify", json=body)
    else:
        raw, headers = signed_webhook(webhook_event(event, gw), KEYS.webhook_secret)
        value = {
            "event": event,
            "event_id": headers["X-Razorpay-Event-Id"],
            "gateway_payment_id": gw["id"],
        }
        send = svc.client.post("/webhooks/razorpay", content=raw, headers=headers)
    invoke = history.invoke(f, process, 1, payment, value)
    response = await send
    history.complete(
        invoke, classify(response.status_code), value=response.json(), status=response.status_code
    )


async def _race(
    svc: Any, gateway: FakeRazorpay, url: str
) -> tuple[History, oracle.Observation, int, oracle.Baseline]:
    """Verify and a payment.captured webhook, both held at the payment row, released together.

    The test holds the payment's row lock (an UPDATE that leaves the status alone), so both
    requests have read the payment — or queued for its lock — before either can write."""
    order, gw = await _order(svc, gateway)
    gw = gateway.auto_capture(gw["id"])  # as Razorpay does before its payment.captured
    payment = order["payment_id"]
    since = oracle.baseline(url)
    history = History()
    holder = await psycopg.AsyncConnection.connect(url)
    watcher = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        await holder.execute("UPDATE payments SET method = method WHERE id = %s", (payment,))
        tasks = [
            asyncio.create_task(_fire(history, svc, "verify", "client", payment, gw)),
            asyncio.create_task(
                _fire(history, svc, "webhook", "webhook-1", payment, gw, "payment.captured")
            ),
        ]
        for _ in range(400):
            cur = await watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND cardinality(pg_blocking_pids(pid)) > 0"
            )
            row = await cur.fetchone()
            if (row and row[0] >= 2) or any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.025)
        assert not any(t.done() for t in tasks), "a request finished while the row was held"
        await holder.commit()
        await asyncio.gather(*tasks)
    finally:
        await holder.close()
        await watcher.close()
    obs = oracle.observe(
        url,
        REFERENCE,
        since=since,
        payment_ids=[payment],
        gateway_counters=gateway.counters(),
        gateway_payment_ids=[gw["id"]],
        settle_timeout_s=0,  # the service's pool is still open: it would not settle anyway
    )
    return history, obs, payment, since


async def test_for_update_service_captures_once_when_callback_and_webhook_race(
    audited: str, service: Any, fake_gateway: FakeRazorpay
) -> None:
    history, obs, payment, since = await _race(service, fake_gateway, audited)
    answers = [op.value for op in history.completions()]
    assert sorted(a["idempotent"] for a in answers) == [False, True]
    writes = [r for r in obs.audit if r.new_status in ("captured", "paid")]
    assert [r.table for r in writes] == ["payments", "invoices", "orders"]
    assert len({r.txid for r in writes}) == 1  # one transaction captured
    # The holder's UPDATE left the status alone: logged, but not a write of "captured".
    held = _rows(obs, "payments")[0]
    assert (held.op, held.old_status, held.new_status, held.changed) == (
        "UPDATE",
        "pending",
        "pending",
        (),
    )

    verdict = check(history.ops(), obs)
    for name, result in verdict.results.items():
        if name != "no_deadlock":
            assert result.valid is True, result
    # The service's pool is still open, so a zero deadlock delta cannot be trusted yet ...
    assert verdict.results["no_deadlock"].valid in (True, "unknown")
    # ... until its backends exit and flush their counters.
    await service.runtime.engine.dispose()
    await service.runtime.runner.close()  # the capture and capture intents pools
    settled = oracle.observe(
        audited,
        REFERENCE,
        since=since,
        payment_ids=[payment],
        settle_timeout_s=5,
        gateway_counters=fake_gateway.counters(),
    )
    assert (settled.deadlocks, settled.deadlocks_settled) == (0, True), settled.deadlock_note
    assert check(history.ops(), settled).valid is True


async def test_naive_service_double_captures_when_callback_and_webhook_race(
    audited: str, naive_service: Any, fake_gateway: FakeRazorpay
) -> None:
    history, obs, payment, _ = await _race(naive_service, fake_gateway, audited)
    answers = [op.value for op in history.completions()]
    assert [a["idempotent"] for a in answers] == [False, False]  # both think they captured

    verdict = check(history.ops(), obs)
    assert verdict.valid is False
    assert verdict.violating_payments == {payment}
    for name in ("single_capture_write", "single_invoice_paid", "single_order_paid"):
        result = verdict.results[name]
        assert (result.valid, result.count) == (False, 1), result
        assert result.worst is not None and result.worst["writes"] == 2
        assert len(set(result.worst["backend_pids"])) == 2
    capture = verdict.results["single_capture_write"].worst
    assert capture is not None
    assert capture["rewrites"] == 1
    assert {op["f"] for op in capture["ops"]} == {"verify", "webhook"}
    # Only the callback path calls the gateway here, so the gateway saw one capture.
    assert verdict.results["gateway_capture_once"].valid is True


@pytest.mark.parametrize("gateway_captured_first", [False, True])
async def test_a_capture_webhook_the_gateway_never_backed_is_a_phantom_capture(
    audited: str, service: Any, fake_gateway: FakeRazorpay, gateway_captured_first: bool
) -> None:
    """The reference service trusts payment.captured (it does not call the gateway for it).
    Sent for a payment the gateway only authorized — what the harness did before it let the
    gateway capture first — it books money never taken: no_phantom_capture says violated.
    Sent after the gateway's own capture, as Razorpay does, it is valid."""
    order, gw = await _order(service, fake_gateway)
    payment = order["payment_id"]
    if gateway_captured_first:
        gw = fake_gateway.auto_capture(gw["id"])
    since = oracle.baseline(audited)
    history = History()
    await _fire(history, service, "webhook", "webhook-1", payment, gw, "payment.captured")
    obs = oracle.observe(
        audited,
        REFERENCE,
        since=since,
        payment_ids=[payment],
        gateway_counters=fake_gateway.counters(),
        gateway_payment_ids=[gw["id"]],
        settle_timeout_s=0,
    )
    assert obs.payments[payment].status == "captured"
    result = check(history.ops(), obs).results["no_phantom_capture"]
    assert result.valid is gateway_captured_first, result
    assert fake_gateway.capture_calls(gw["id"]) == 0  # the automatic capture is not a call
