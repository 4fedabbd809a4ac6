"""harness/model/nemesis.py: faults injected for real — a PostgreSQL backend terminated, the fake
gateway failing — and the fixed flow still capturing exactly once under them."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from payrace.harness.errors import UsageError
from payrace.harness.gateway.controls import LocalGateway, RemoteGateway
from payrace.harness.gateway.fake import FakeRazorpay, Knobs, RazorpayError
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.provider import Database
from payrace.harness.model.history import History
from payrace.harness.model.nemesis import Fault, Nemesis, NemesisSpecError, parse_spec
from payrace.harness.runner.config import RunConfig
from payrace.harness.runner.run import run

INVARIANTS = (
    "single_capture_write",
    "single_invoice_paid",
    "single_order_paid",
    "gateway_capture_once",
    "no_lost_capture",
    "no_5xx",
)


# -- the spec ----------------------------------------------------------------------------------


def test_a_spec_names_each_fault_with_its_parameter() -> None:
    faults = parse_spec("gateway-errors:0.2, gateway-latency:50,kill-backends:0.5")
    assert faults == [
        Fault("gateway-errors", 0.2),
        Fault("gateway-latency", 50.0),
        Fault("kill-backends", 0.5),
    ]
    assert [str(f) for f in faults] == [
        "gateway-errors:0.2",
        "gateway-latency:50",
        "kill-backends:0.5",
    ]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("kill-everything:1", "unknown fault 'kill-everything'"),
        ("gateway-errors", "gateway-errors needs a parameter"),
        ("gateway-errors:lots", "'lots' is not a number; use gateway-errors:RATE"),
        ("gateway-errors:1.5", "RATE must be within 0..1"),
        ("kill-backends:0", "SECONDS must be within 0.01..3600"),
        ("kill-backends:1,kill-backends:2", "names kill-backends twice"),
        ("", "--nemesis is empty"),
    ],
)
def test_a_bad_spec_says_what_to_fix(spec: str, says: str) -> None:
    with pytest.raises(NemesisSpecError) as raised:
        parse_spec(spec)
    assert says in str(raised.value)
    if "unknown" in says or "empty" in says:
        # The valid forms are listed, so the user need not look them up.
        for form in ("gateway-errors:RATE", "gateway-latency:MS", "kill-backends:SECONDS"):
            assert form in str(raised.value)


def test_run_config_turns_a_bad_spec_into_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown fault 'restart'"):
        RunConfig(nemesis="restart:1").validate()
    RunConfig(nemesis="gateway-errors:0.3,kill-backends:0.2").validate()


# -- gateway faults ----------------------------------------------------------------------------


async def test_gateway_faults_are_on_inside_the_block_and_restored_after() -> None:
    fake = FakeRazorpay(GatewayKeys(), knobs=Knobs(capture_latency_s=0.001))
    before = fake.knobs()
    nemesis = Nemesis(parse_spec("gateway-errors:1,gateway-latency:20"), gateway=LocalGateway(fake))
    async with nemesis:
        assert fake.knobs() == {**before, "fail_rate": 1.0, "capture_latency_s": 0.02}
    assert fake.knobs() == before
    assert nemesis.report() == {
        "faults": ["gateway-errors:1", "gateway-latency:20"],
        "gateway_errors_injected": 0,
        "gateway_timeouts_injected": 0,
        "backends_killed": 0,
    }


async def test_a_gateway_timeout_takes_the_money_and_loses_the_answer() -> None:
    fake = FakeRazorpay(GatewayKeys())
    order = fake.create_order({"amount": 50_000, "currency": "INR"})
    payment = fake.authorize_payment(order["id"])
    nemesis = Nemesis(parse_spec("gateway-timeout:1"), gateway=LocalGateway(fake))
    async with nemesis:
        with pytest.raises(RazorpayError) as raised:
            fake.capture(payment["id"], {"amount": 50_000, "currency": "INR"})
    assert raised.value.status == 504
    assert fake.payment(payment["id"])["status"] == "captured"  # type: ignore[index]
    counters = fake.counters()
    assert counters["accepted"] == {payment["id"]: 1}  # no_lost_capture's evidence
    assert counters["timed_out"] == {payment["id"]: 1}
    assert nemesis.report()["gateway_timeouts_injected"] == 1
    assert fake.knobs()["timeout_rate"] == 0.0  # restored


async def test_a_remote_gateway_is_driven_through_its_knobs_endpoint() -> None:
    fake = FakeRazorpay(GatewayKeys())
    with GatewayServer(fake) as server:
        remote = RemoteGateway(server.url)
        try:
            async with Nemesis(parse_spec("gateway-errors:0.5"), gateway=remote):
                assert fake.knobs()["fail_rate"] == 0.5
            assert fake.knobs()["fail_rate"] == 0.0
        finally:
            remote.close()


# -- kill-backends -----------------------------------------------------------------------------


def _alive(url: str, pid: int) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
        return (row.fetchone() or (0,))[0] == 1


async def _until(check: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "the nemesis did not act in time"
        await asyncio.sleep(0.02)


async def test_kill_backends_terminates_a_backend_idle_in_transaction_never_payraces_own(
    pg: Database,
) -> None:
    victim = psycopg.connect(pg.url, application_name="some-service")
    own = psycopg.connect(pg.url, application_name="payrace-oracle")
    try:
        victim_pid, own_pid = victim.info.backend_pid, own.info.backend_pid
        # Both inside a transaction that holds a snapshot: only the service's may die.
        victim.execute("SELECT 1")
        own.execute("SELECT 1")
        nemesis = Nemesis(parse_spec("kill-backends:0.02"), dsn=pg.url, seed=7)
        async with nemesis:
            await _until(lambda: not _alive(pg.url, victim_pid))
            await asyncio.sleep(0.1)  # a few more ticks with only payrace's own left
        assert nemesis.report()["backends_killed"] == 1
        assert _alive(pg.url, own_pid)
        assert own.execute("SELECT 2").fetchone() == (2,)
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 2")
    finally:
        victim.close()
        own.close()


async def test_kill_backends_leaves_idle_connections_alone(pg: Database) -> None:
    with psycopg.connect(pg.url, autocommit=True, application_name="pooled") as idle:
        nemesis = Nemesis(parse_spec("kill-backends:0.02"), dsn=pg.url)
        async with nemesis:
            await asyncio.sleep(0.15)
        assert idle.execute("SELECT 1").fetchone() == (1,)
        assert nemesis.report()["backends_killed"] == 0
        assert nemesis.report()["kill_ticks_without_target"] >= 3


async def test_every_fault_is_an_operation_in_the_history(pg: Database) -> None:
    victim = psycopg.connect(pg.url, application_name="some-service")
    try:
        victim_pid = victim.info.backend_pid
        victim.execute("SELECT 1")
        history = History()
        nemesis = Nemesis(parse_spec("kill-backends:0.02"), dsn=pg.url, history=history)
        async with nemesis:
            await _until(lambda: not _alive(pg.url, victim_pid))
        ops = [op for op in history.completions() if op.process == "nemesis"]
        actions = [(op.value["fault"], op.value["action"]) for op in ops]
        assert actions == [
            ("kill-backends:0.02", "start"),
            ("kill-backends", "kill"),
            ("kill-backends:0.02", "stop"),
        ]
        assert ops[1].value["pid"] == victim_pid
        assert all(op.type == "info" for op in ops)
    finally:
        victim.close()


@pytest.fixture
def own_db(pg: Database) -> Iterator[str]:
    """A database of its own: the timeouts nemesis alters it and reopens its idle connections."""
    name = f"nemesis_{secrets.token_hex(4)}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(pg.url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


async def test_lock_timeout_applies_to_the_targets_new_connections_while_on(own_db: str) -> None:
    """lock-timeout:MS sets the database's lock_timeout for the run: an idle pooled connection
    is reopened (terminated) so it applies to it too, and it is reset afterwards."""

    def setting() -> str:
        with psycopg.connect(own_db, application_name="some-service") as conn:
            row = conn.execute("SHOW lock_timeout").fetchone()
            assert row is not None
            return str(row[0])

    before = setting()
    pooled = psycopg.connect(own_db, autocommit=True, application_name="pooled")
    try:
        history = History()
        nemesis = Nemesis(parse_spec("lock-timeout:250"), dsn=own_db, history=history)
        async with nemesis:
            assert setting() == "250ms"
            with pytest.raises(psycopg.OperationalError):
                pooled.execute("SELECT 1")  # reopened by the pool, with the setting
        assert setting() == before
        report = nemesis.report()
        assert report["timeouts"] == {"lock_timeout": 250}
        assert report["pooled_connections_reopened"] >= 1
        assert [op.value["action"] for op in history.completions()] == ["start", "stop"]
    finally:
        pooled.close()


async def test_lock_timeout_with_held_locks_is_retried_never_an_error_out_of_the_service(
    pg: Database, tmp_path: Path
) -> None:
    """--hold-ms 100 keeps the winner's locks past a 50 ms lock_timeout, so the waiter's
    FOR UPDATE expires (55P03) in most trials: the service retries it (or answers a 409), and
    the run is judged valid, not "unknown" with the trials broken by an exception."""
    config = RunConfig(
        strategies=["for_update"],
        trials=20,
        dsn=pg.url,
        out_dir=tmp_path,
        hold_ms=100,
        nemesis="lock-timeout:50",
    )
    summary = await run(config, announce=lambda line: None)
    result = summary["strategies"]["for_update"]
    assert result["trial_errors"]["count"] == 0, result["trial_errors"]
    # The timeout really expired, or a valid verdict would prove nothing.
    assert result["conflicts"]["timeouts_retried"] + result["conflicts"]["answered_409"] > 0
    assert result["valid"] is True, result["checks"]
    assert summary["exit_code"] == 0


def test_timeouts_are_checked_like_every_fault() -> None:
    with pytest.raises(NemesisSpecError, match=r"statement-timeout:0.*MS must be within 1"):
        parse_spec("statement-timeout:0")
    assert [str(f) for f in parse_spec("lock-timeout:100,statement-timeout:2000")] == [
        "lock-timeout:100",
        "statement-timeout:2000",
    ]


# -- a payrace run under faults ----------------------------------------------------------------

FAULTS = "gateway-errors:0.3,kill-backends:0.05"  # kills every 50 ms: several per run


async def faulted_run(pg: Database, tmp_path: Path, strategy: str) -> dict[str, Any]:
    config = RunConfig(
        strategies=[strategy], trials=30, dsn=pg.url, out_dir=tmp_path, nemesis=FAULTS
    )
    summary = await run(config, announce=lambda line: None)
    result: dict[str, Any] = summary["strategies"][strategy]
    return result


async def test_for_update_captures_exactly_once_under_killed_backends_and_gateway_errors(
    pg: Database, tmp_path: Path
) -> None:
    result = await faulted_run(pg, tmp_path, "for_update")
    faults = result["nemesis"]
    assert faults["faults"] == ["gateway-errors:0.3", "kill-backends:0.05"]
    # The faults were really injected, or a clean verdict would prove nothing.
    assert faults["gateway_errors_injected"] > 0
    assert faults["backends_killed"] > 0
    for name in INVARIANTS:
        assert result["checks"][name]["valid"] is True, (name, result["checks"][name])
    # The injected gateway failures reached the client as deliberate 502s, not crashes.
    assert "verify 502 gateway_error" in result["checks"]["error_classes"]["note"]
    assert result["checks"]["error_classes"]["valid"] is True


async def test_the_same_faults_do_not_hide_the_naive_double_capture(
    pg: Database, tmp_path: Path
) -> None:
    result = await faulted_run(pg, tmp_path, "naive")
    assert result["nemesis"]["backends_killed"] > 0
    assert result["valid"] is False
    assert result["checks"]["single_capture_write"]["valid"] is False
    assert result["violating_trials"] > 0
