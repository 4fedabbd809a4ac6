"""payrace/service/reconcile.py: a capture the gateway accepted is never lost.

The loss is made for real: PostgreSQL terminates the capturing request's own backend at a
pause point after the gateway accepted the capture, in every attempt, so the callback
answers 503 and the payment stays `pending`; no webhook follows. Evidence comes from triggers
counting UPDATEs of the payment and its invoice, and from the fake gateway's counters.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from conftest import Service, service_settings
from service_calls import create_order, deliver, verify

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.infra.provider import Database
from payrace.service.instrument import probes
from payrace.service.reconcile import reconcile_once

_AUDIT_SQL = """
CREATE TABLE IF NOT EXISTS test_reconcile_audit (tbl text, payment_id bigint, new_status text);
CREATE OR REPLACE FUNCTION test_reconcile_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_reconcile_audit VALUES
        (TG_TABLE_NAME, (to_jsonb(NEW) ->> TG_ARGV[0])::bigint, NEW.status);
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS test_reconcile_audit ON payments;
DROP TRIGGER IF EXISTS test_reconcile_audit ON invoices;
CREATE TRIGGER test_reconcile_audit AFTER UPDATE ON payments
    FOR EACH ROW EXECUTE FUNCTION test_reconcile_audit_row('id');
CREATE TRIGGER test_reconcile_audit AFTER UPDATE ON invoices
    FOR EACH ROW EXECUTE FUNCTION test_reconcile_audit_row('payment_id');
"""

_UNAUDIT_SQL = """
SET lock_timeout = '10s';
DROP TRIGGER IF EXISTS test_reconcile_audit ON payments;
DROP TRIGGER IF EXISTS test_reconcile_audit ON invoices;
DROP FUNCTION IF EXISTS test_reconcile_audit_row();
DROP TABLE IF EXISTS test_reconcile_audit;
"""


@pytest.fixture
async def svc(pg: Database, gateway_url: str) -> AsyncIterator[Service]:
    async with Service(service_settings(pg, gateway_url)) as service:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(_AUDIT_SQL)
        try:
            yield service
        finally:
            with psycopg.connect(pg.url, autocommit=True) as conn:
                conn.execute(_UNAUDIT_SQL)


def updates(url: str, payment_id: int) -> dict[str, int]:
    """How many UPDATEs moved the payment to captured and its invoice to paid."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tbl, count(*) FROM test_reconcile_audit"
            " WHERE payment_id = %s AND new_status IN ('captured', 'paid') GROUP BY tbl",
            (payment_id,),
        ).fetchall()
    return {"payments": 0, "invoices": 0, **{str(t): int(n) for t, n in rows}}


def states(url: str, payment_id: int) -> tuple[str, str, str, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT p.status, i.status, o.status,"
            " (SELECT count(*) FROM capture_intents c WHERE c.payment_id = p.id)"
            " FROM payments p JOIN invoices i ON i.payment_id = p.id"
            " JOIN orders o ON o.id = p.order_id WHERE p.id = %s",
            (payment_id,),
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2], int(row[3])


class KillOwnBackend:
    """Terminates the request's own backend each time it reaches `point` (kill-backends,
    aimed): after the gateway accepted, before COMMIT."""

    def __init__(self, url: str, point: str) -> None:
        self.url, self.point = url, point
        self.killed = 0

    async def reached(self, point: str, probe: probes.ProbeContext) -> None:
        if point == self.point:
            assert probe.backend_pid is not None
            await asyncio.to_thread(self._terminate, probe.backend_pid)
            self.killed += 1

    def _terminate(self, pid: int) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))

    def finished(self, probe: probes.ProbeContext) -> None:
        return None


async def lost_capture(
    svc: Service, fake: FakeRazorpay, url: str, *, swept: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A callback whose capture the gateway accepted and whose every commit died: a 503."""
    order = await create_order(svc)
    payment = fake.authorize_payment(order["gateway_order_id"])
    killer = KillOwnBackend(url, "before_commit")
    with probes.controlled(killer, "client"):
        response = await verify(svc, order, payment)
    assert response.status_code == 503, response.text
    assert killer.killed == 3
    assert fake.capture_calls(payment["id"]) == 1
    if not swept:  # a running sweeper may already have recorded it
        assert states(url, order["payment_id"]) == ("pending", "issued", "created", 1)
    return order, payment


async def test_a_capture_whose_commit_died_is_recorded_once_by_the_sweep(
    svc: Service, fake_gateway: FakeRazorpay, pg: Database
) -> None:
    order, payment = await lost_capture(svc, fake_gateway, pg.url)

    report = await reconcile_once(svc.runtime.runner, older_than_s=0)
    again = await reconcile_once(svc.runtime.runner, older_than_s=0)

    assert order["payment_id"] in report.captured
    assert order["payment_id"] not in again.captured
    assert states(pg.url, order["payment_id"]) == ("captured", "paid", "paid", 0)
    assert updates(pg.url, order["payment_id"]) == {"payments": 1, "invoices": 1}
    assert fake_gateway.capture_calls(payment["id"]) == 1  # asked, never captured again
    # A late callback or webhook is an idempotent repeat: still one update each.
    late = await verify(svc, order, payment)
    hook = await deliver(svc, "payment.captured", payment)
    assert late.json()["idempotent"] is True
    assert hook.json()["idempotent"] is True
    assert updates(pg.url, order["payment_id"]) == {"payments": 1, "invoices": 1}


async def test_an_intent_younger_than_the_threshold_is_left_alone(
    svc: Service, fake_gateway: FakeRazorpay, pg: Database
) -> None:
    order, _ = await lost_capture(svc, fake_gateway, pg.url)

    report = await reconcile_once(svc.runtime.runner, older_than_s=3600)

    assert order["payment_id"] not in report.captured
    assert states(pg.url, order["payment_id"]) == ("pending", "issued", "created", 1)


async def test_a_capture_the_gateway_refused_is_not_recorded_and_its_intent_stays(
    svc: Service, knobs: FakeRazorpay, pg: Database
) -> None:
    order = await create_order(svc)
    payment = knobs.authorize_payment(order["gateway_order_id"])
    knobs.set_knobs(fail_rate=1.0)
    failed = await verify(svc, order, payment)
    knobs.set_knobs(fail_rate=0.0)
    assert failed.status_code == 502, failed.text

    report = await reconcile_once(svc.runtime.runner, older_than_s=0)

    assert report.not_captured >= 1
    assert order["payment_id"] not in report.captured
    assert states(pg.url, order["payment_id"]) == ("pending", "issued", "created", 1)
    assert knobs.counters()["accepted"].get(payment["id"], 0) == 0
    # The customer's retry captures; the next sweep drops the intent.
    assert (await verify(svc, order, payment)).json()["status"] == "captured"
    await reconcile_once(svc.runtime.runner, older_than_s=0)
    assert states(pg.url, order["payment_id"]) == ("captured", "paid", "paid", 0)


async def test_the_sweeper_in_the_service_lifespan_reconciles_on_its_own(
    pg: Database, gateway_url: str, fake_gateway: FakeRazorpay
) -> None:
    settings = service_settings(pg, gateway_url, reconcile_interval_s=0.2, reconcile_after_s=0)
    async with Service(settings) as service:
        order, payment = await lost_capture(service, fake_gateway, pg.url, swept=True)
        for _ in range(100):  # 10 s at most
            if states(pg.url, order["payment_id"]) == ("captured", "paid", "paid", 0):
                break
            await asyncio.sleep(0.1)

    assert states(pg.url, order["payment_id"]) == ("captured", "paid", "paid", 0)
    assert fake_gateway.capture_calls(payment["id"]) == 1
