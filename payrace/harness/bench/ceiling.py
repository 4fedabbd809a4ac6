"""The ceiling `payrace bench` compares the service with: PostgreSQL alone running exactly
the SQL the service issues for one capture, under pgbench.

    record_capture_sql()   one client callback captured by the reference service in this
                           process, every statement it sends and every BEGIN / COMMIT /
                           ROLLBACK, told by its capture and intents pools (sql.Observer)
                           and its SQLAlchemy engine (the statement log of that one request,
                           nothing rewritten by hand)
    pgbench_script()       that log as a pgbench script: the payment's ids become a variable,
                           a fresh prepared row for every transaction of every client
    find_pgbench()         the pgbench binary shipped in the pgserver wheel (or on PATH)
    run_pgbench()          one pgbench run, a fixed count of transactions per client:
                           transactions per second = captures per second

Every pgbench transaction captures a payment of its own that is still pending, as every
request of the service's window does: a replay over a few thousand rows drawn at random (the
first ceiling) captured each row again and again after its first pass, so its intent INSERT
... ON CONFLICT DO NOTHING inserted nothing and its UPDATEs rewrote hot rows already
captured, work the service never does (a repeated capture takes its idempotent path). The
ceiling was then PostgreSQL doing less than it does under the service.

pgbench is a client: unlike the server it runs as root, so the embedded route needs nothing
more. The gateway call between the reads and the writes is the one thing the script leaves
out: it is not PostgreSQL's work, and the service's share of that time is what the ratio
measures.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import event

from payrace.harness.gateway.signing import GatewayKeys, client_callback
from payrace.service.app import create_app
from payrace.service.settings import Settings
from payrace.service.sql import Observer

_PARAM = re.compile(r"\$(\d+)")
_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)


@dataclass(frozen=True)
class Recorded:
    """The statement log of one capture: SQL with its parameters, or a transaction marker."""

    statements: list[tuple[str, tuple[Any, ...]]]  # ("BEGIN"|"COMMIT"|"ROLLBACK", ()) or SQL
    status: int


@dataclass(frozen=True)
class Prepared:
    """One payment ready to be captured: the ids in the database and at the gateway."""

    payment_id: int  # = its order's id = its invoice's id (bench rows are laid out so)
    gateway_order_id: str
    gateway_payment_id: str


async def record_capture_sql(
    database_url: str, gateway_url: str, strategy: str, keys: GatewayKeys, payment: Prepared
) -> Recorded:
    settings = Settings(
        database_url=database_url,
        capture_strategy=strategy,
        razorpay_key_id=keys.key_id,
        razorpay_key_secret=keys.key_secret,
        razorpay_webhook_secret=keys.webhook_secret,
        razorpay_base_url=gateway_url,
        reconcile_interval_s=0,  # no sweeper statements in the log
    )
    app = create_app(settings)
    runtime = app.state.runtime
    await runtime.startup()
    log: list[tuple[str, tuple[Any, ...]]] = []
    recording = False

    def statement(conn: Any, cursor: Any, sql: str, params: Any, context: Any, many: bool) -> None:
        if recording:
            log.append((sql, tuple(params or ())))

    def marker(word: str) -> Any:
        def listener(conn: Any) -> None:
            if recording:
                log.append((word, ()))

        return listener

    class Log(Observer):
        def on_begin(self, isolation: str) -> None:
            if recording:
                log.append(("BEGIN", ()))

        def on_statement(self, sql: str, args: Sequence[object]) -> None:
            if recording:
                log.append((sql, tuple(args)))

        def on_commit(self) -> None:
            if recording:
                log.append(("COMMIT", ()))

        def on_rollback(self) -> None:
            if recording:
                log.append(("ROLLBACK", ()))

    # The capture path's pools (asyncpg directly), and the engine the other routes use.
    pools = [p for p in (runtime.runner.db, runtime.runner.intents) if p is not None]
    logger = Log()
    for pool in pools:
        pool.observers.append(logger)
    engines = [runtime.engine.sync_engine]
    listeners = [("before_cursor_execute", statement)] + [
        (name, marker(name.upper())) for name in ("begin", "commit", "rollback")
    ]
    for engine in engines:
        for name, fn in listeners:
            event.listen(engine, name, fn)
    body = client_callback(payment.gateway_order_id, payment.gateway_payment_id, keys.key_secret)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            recording = True
            reply = await client.post(
                "/payments/verify", json={**body, "internal_payment_id": payment.payment_id}
            )
            recording = False
    finally:
        for engine in engines:
            for name, fn in listeners:
                event.remove(engine, name, fn)
        for pool in pools:
            pool.observers.remove(logger)
        await runtime.shutdown()
    return Recorded(log, reply.status_code)


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'"
    return "'" + str(value).replace("'", "''") + "'"


def pgbench_script(recorded: Recorded, payment: Prepared) -> str:
    """The log as pgbench SQL. The recorded payment's ids become `:pid` (and its gateway ids
    strings built from it); every other parameter is kept as the literal the service sent.

    `:pid` is a fresh row per transaction: client k's n-th transaction (n from 1) takes row
    `first + k * per + n - 1`, so `clients * per` rows from `first` on, prepared the same way,
    are each captured once (run_pgbench defines `first`, `per` and the counter `n`; pgbench
    keeps a client's variables from one transaction to the next)."""
    swaps: dict[Any, str] = {
        payment.payment_id: "(:pid)",
        payment.gateway_payment_id: "('pay_bench_' || (:pid)::text)",
        payment.gateway_order_id: "('order_bench_' || (:pid)::text)",
    }
    lines = ["\\set n :n + 1", "\\set pid :first + :client_id * :per + :n - 1"]
    for sql, params in recorded.statements:
        if sql in ("BEGIN", "COMMIT", "ROLLBACK"):
            lines.append(f"{sql};")
            continue

        def render(match: re.Match[str], params: tuple[Any, ...] = params) -> str:
            value = params[int(match.group(1)) - 1]
            swap = swaps.get(value) if not isinstance(value, bool) else None
            return swap if swap is not None else _literal(value)

        lines.append(" ".join(_PARAM.sub(render, sql).split()) + ";")
    return "\n".join(lines) + "\n"


def find_pgbench() -> Path | None:
    try:
        import pgserver
    except ImportError:
        pass
    else:
        shipped = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench"
        if shipped.exists():
            return shipped
    found = shutil.which("pgbench")
    return Path(found) if found else None


def run_pgbench(
    pgbench: Path,
    url: str,
    script: Path,
    *,
    clients: int,
    threads: int,
    first: int,
    transactions: int,
) -> float:
    """Transactions (= captures) per second, initial connection time excluded: `clients`
    clients running `transactions` each of a pgbench_script(), on the `clients *
    transactions` rows prepared from `first` on."""
    cmd = [
        str(pgbench), "-n", "-M", "prepared", "-f", str(script),
        "-c", str(clients), "-j", str(max(1, min(clients, threads))), "-t", str(transactions),
        "-D", "n=0", "-D", f"first={first}", "-D", f"per={transactions}", url,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    found = _TPS.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(
            f"pgbench failed (exit {done.returncode}): {(done.stderr or done.stdout)[-600:]}"
        )
    return float(found.group(1))
