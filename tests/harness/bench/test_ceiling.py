from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg

from payrace.harness.bench.ceiling import (
    Prepared,
    Recorded,
    find_pgbench,
    pgbench_script,
    record_capture_sql,
    run_pgbench,
)
from payrace.harness.bench.run import _create_schema, _prepare
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.provider import Database


def test_the_script_swaps_the_payment_ids_and_keeps_every_other_parameter() -> None:
    payment = Prepared(77, "order_X", "pay_X")
    recorded = Recorded(
        [
            ("BEGIN", ()),
            (
                "SELECT 1 FROM payments WHERE id = $1::BIGINT AND g = $2 AND note = $3",
                (77, "pay_X", "it's"),
            ),
            ("UPDATE orders SET status=$1, g=$2 WHERE id = $3", ("paid", "order_X", 77)),
            ("COMMIT", ()),
        ],
        200,
    )
    script = pgbench_script(recorded, payment).splitlines()
    assert script[:2] == ["\\set n :n + 1", "\\set pid :first + :client_id * :per + :n - 1"]
    assert script[2] == "BEGIN;"
    assert script[3] == (
        "SELECT 1 FROM payments WHERE id = (:pid)::BIGINT AND g = ('pay_bench_' || (:pid)::text)"
        " AND note = 'it''s';"
    )
    assert script[4] == (
        "UPDATE orders SET status='paid', g=('order_bench_' || (:pid)::text) WHERE id = (:pid);"
    )
    assert script[5] == "COMMIT;"


async def test_each_pgbench_transaction_captures_a_pending_payment_of_its_own(
    pg: Database, fake_gateway: FakeRazorpay, gateway_url: str, tmp_path: Path
) -> None:
    keys = GatewayKeys()
    first, clients, per_client = 8_700_001, 3, 7
    rows = clients * per_client
    await _create_schema(pg)
    # Two rows more than the transactions: a client reusing or skipping a row would show.
    await asyncio.to_thread(_prepare, pg, None, iter(range(first, first + rows + 2)), rows + 2)
    (recorded_payment,) = await asyncio.to_thread(_prepare, pg, fake_gateway, iter([8_799_999]), 1)
    recorded = await record_capture_sql(
        pg.asyncpg_url(), gateway_url, "for_update", keys, recorded_payment
    )
    assert recorded.status == 200
    sql = [s for s, _ in recorded.statements]
    # The intent in autocommit, then the capture's transaction: the locking read, 3 UPDATEs.
    assert [s.split()[0] for s in sql] == [
        "INSERT", "BEGIN", "SELECT", "UPDATE", "UPDATE", "UPDATE", "COMMIT"
    ]  # fmt: skip
    assert sql[0].startswith("INSERT INTO capture_intents")
    assert sql[2].endswith("FOR UPDATE OF payments")
    script = tmp_path / "capture.sql"
    script.write_text(pgbench_script(recorded, recorded_payment))
    pgbench = find_pgbench()
    assert pgbench is not None
    tps = await asyncio.to_thread(
        run_pgbench, pgbench, pg.url, script, clients=clients, threads=2, first=first,
        transactions=per_client,
    )  # fmt: skip
    assert tps > 0
    with psycopg.connect(pg.url) as conn:
        captured = conn.execute(
            "SELECT array_agg(id ORDER BY id) FROM payments WHERE id >= %s AND id < %s"
            " AND status = 'captured' AND gateway_payment_id = 'pay_bench_' || id",
            (first, first + rows + 2),
        ).fetchone()
        intents = conn.execute(
            "SELECT count(*) FROM capture_intents WHERE payment_id >= %s AND payment_id < %s",
            (first, first + rows + 2),
        ).fetchone()
    assert captured is not None and captured[0] == list(range(first, first + rows))
    assert intents is not None and intents[0] == rows  # every intent INSERT inserted
