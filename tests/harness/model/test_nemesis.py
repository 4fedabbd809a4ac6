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
from payrace.harness.model import nemesis as registry
from payrace.harness.model.history import History
from payrace.harness.model.nemesis import (
    Fault,
    Nemesis,
    NemesisSpecError,
    Restarter,
    described,
    parse_spec,
    unfit,
)
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
        ("restart-postgres:0.1", "SECONDS must be within 0.5..3600"),
        ("restart-service:nan", "SECONDS must be within 0.5..3600"),
        ("kill-after-capture:2", "RATE must be within 0..1 (fraction of captures whose"),
    ],
)
def test_a_bad_spec_says_what_to_fix(spec: str, says: str) -> None:
    with pytest.raises(NemesisSpecError) as raised:
        parse_spec(spec)
    assert says in str(raised.value)
    if "unknown" in says or "empty" in says:
        # The valid forms are listed, so the user need not look them up.
        for name, param in registry.FAULTS.items():
            assert f"{name}:{param.unit}" in str(raised.value)


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
            # Ticks, not a fixed sleep: a loaded machine runs fewer ticks in 0.15 s.
            await _until(lambda: nemesis.report()["kill_ticks_without_target"] >= 3)
        assert idle.execute("SELECT 1").fetchone() == (1,)
        assert nemesis.report()["backends_killed"] == 0


async def test_every_fault_is_an_operation_in_the_history(pg: Database) -> None:
    victim = psycopg.connect(pg.url, application_name="some-service")
    try:
        victim_pid = victim.info.backend_pid
        victim.execute("SELECT 1")
        history = History()
        nemesis = Nemesis(parse_spec("kill-backends:0.02"), dsn=pg.url, history=history)
        async with nemesis:
            # Until the kill is recorded, not until the victim is gone: the backend can exit
            # before pg_terminate_backend()'s answer reaches the killer, and leaving the block
            # then would cancel the killer before it records what it did.
            await _until(lambda: nemesis.report()["backends_killed"] == 1)
        assert not _alive(pg.url, victim_pid)
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

# Kills every 50 ms. The gateway's 20 ms per call keeps each capture's transaction open long
# enough for the killer to find one: without it 30 trials of the faster service could end
# between two ticks with nothing in a transaction to kill.
FAULTS = "gateway-errors:0.3,gateway-latency:20,kill-backends:0.05"


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
    assert faults["faults"] == ["gateway-errors:0.3", "gateway-latency:20", "kill-backends:0.05"]
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


# -- the registry and what a fault needs ---------------------------------------------------------


def test_the_registry_gives_every_fault_a_form_an_example_and_what_it_needs() -> None:
    """`make chaos` and `run --help` enumerate FAULTS: each example parses, lies in its
    range, and the help lists every fault within 80 columns."""
    for name, param in registry.FAULTS.items():
        assert param.low <= param.example <= param.high, name
        assert parse_spec(f"{name}:{param.example:g}") == [Fault(name, param.example)]
        assert param.needs in ("gateway", "database", "own-postgres", "own-service", "own-gateway")
    lines = described()
    assert all(len(line) <= 78 for line in lines), lines
    for name, param in registry.FAULTS.items():
        assert any(line.startswith(f"  {name}:{param.unit}") for line in lines), name


def test_the_readmes_nemesis_table_has_every_fault_of_the_registry() -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text(encoding="utf-8")
    section = readme.split("#### Faults: `--nemesis`", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("`")[1].split(":")[0] for line in section.splitlines() if line[:3] == "| `"}
    rows |= {"statement-timeout"} if "`statement-timeout:MS`" in section else set()
    assert rows == set(registry.FAULTS), rows ^ set(registry.FAULTS)


@pytest.mark.parametrize(
    ("spec", "run", "says"),
    [
        ("restart-postgres:1", {"dsn": "postgresql://u@db/x"}, "--dsn (or PAYRACE_DSN) names"),
        ("restart-postgres:1", {"external": True}, "payrace did not start this target"),
        ("restart-service:1", {}, "--target inproc runs the service inside payrace's own"),
        ("restart-service:1", {"external": True}, "payrace did not start this target"),
        ("kill-after-capture:0.5", {"external": True}, "reaches into the fake gateway"),
    ],
)
def test_a_fault_on_something_payrace_does_not_own_says_why(
    spec: str, run: dict[str, Any], says: str
) -> None:
    kwargs: dict[str, Any] = {"target": "inproc", "external": False, "dsn": None, **run}
    why = unfit(parse_spec(spec), **kwargs)
    assert why is not None and says in why, why
    assert spec.split(":")[0] in why


def test_faults_on_what_payrace_started_fit() -> None:
    spec = parse_spec("restart-postgres:1,kill-after-capture:0.5,kill-backends:1")
    assert unfit(spec, target="inproc", external=False, dsn=None) is None
    assert unfit(parse_spec("restart-service:2"), target="http", external=False, dsn=None) is None
    # A database of any server is enough for the faults that only act on it.
    assert unfit(parse_spec("kill-backends:1"), target="inproc", external=False, dsn="x") is None


def test_run_config_refuses_a_restart_of_what_payrace_does_not_own(tmp_path: Path) -> None:
    config = RunConfig(
        dsn="postgresql://nobody@127.0.0.1:1/none",
        nemesis="restart-postgres:1",
        out_dir=tmp_path / "out",
    )
    with pytest.raises(UsageError, match="leave --dsn out"):
        config.validate()
    with pytest.raises(UsageError, match="use --target http"):
        RunConfig(nemesis="restart-service:1", out_dir=tmp_path / "out").validate()
    assert not (tmp_path / "out").exists()  # refused before anything was written


# -- restarts, killed captures: what payrace started, restarted mid-run -----------------------


class Part:
    """Something to restart that records what was done to it, and whether it is up."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.up = True

    def halt(self) -> None:
        self.calls.append("halt")
        self.up = False

    def resume(self) -> None:
        time.sleep(0.05)
        self.calls.append("resume")
        self.up = True


async def test_a_restart_under_way_when_the_run_ends_is_finished_and_recorded() -> None:
    part, history = Part(), History()
    restarter = Restarter(
        "restart-service",
        0.01,
        part,
        lambda v: history.complete(
            history.invoke("nemesis", "nemesis", -1, None, v), "info", value=v
        ),
    )
    await restarter.start()
    await _until(lambda: not part.up)
    await restarter.stop()  # in the middle of the restart
    assert part.up and part.calls[-1] == "resume"
    await restarter.steady()  # returns: nothing is down
    actions = [op.value["action"] for op in history.completions()]
    assert actions[:2] == ["down", "up"] and actions.count("down") == actions.count("up")
    assert restarter.report()["count"] == actions.count("up")


def _ops(summary: dict[str, Any], strategy: str) -> list[dict[str, Any]]:
    history = summary["strategies"][strategy]["_history"]
    return [op.to_json() for op in history]


async def nemesis_run(
    tmp_path: Path, strategy: str, nemesis: str, trials: int = 30, **options: Any
) -> dict[str, Any]:
    config = RunConfig(
        strategies=[strategy], trials=trials, out_dir=tmp_path, nemesis=nemesis, **options
    )
    return await run(config, announce=lambda line: None)


@pytest.mark.slow
async def test_for_update_stays_exactly_once_while_postgres_restarts(tmp_path: Path) -> None:
    """restart-postgres on the embedded server payrace started (no dsn: its own): no
    webhook follows the callback, so a capture whose answer died with the server is recorded
    by the reconciler alone; the service answers 503, never 500."""
    # The run must outlast the first restart (after 0.5 s) however fast the trials are: each
    # holds its first request 25 ms, so 200 trials at concurrency 4 last over 1.25 s.
    summary = await nemesis_run(
        tmp_path, "for_update", "restart-postgres:0.5", trials=200, webhooks=0, hold_ms=25
    )
    result = summary["strategies"]["for_update"]
    restarts = result["nemesis"]["restarts"]["restart-postgres"]
    assert restarts["count"] >= 1, result["nemesis"]
    assert summary["database"]["route"] == "embedded"
    for name in INVARIANTS:
        assert result["checks"][name]["valid"] is True, (name, result["checks"][name])
    assert result["valid"] is True and summary["exit_code"] == 0
    ops = _ops(summary, "for_update")
    faults = [op["value"] for op in ops if op["f"] == "nemesis" and op["type"] == "info"]
    assert [f["action"] for f in faults].count("down") == restarts["count"]
    assert [f["action"] for f in faults].count("up") == restarts["count"]
    answered = [op for op in ops if op["f"] == "verify" and op["type"] != "invoke"]
    assert all(op["status"] != 500 for op in answered)
    # The reconciler had its chance before the verdict (runner.reconcile), and said so.
    assert "reconciled" in result["reconciliation"], result.get("reconciliation")


@pytest.mark.slow
async def test_naive_is_still_caught_while_postgres_restarts(tmp_path: Path) -> None:
    summary = await nemesis_run(tmp_path, "naive", "restart-postgres:0.5", trials=120, hold_ms=25)
    result = summary["strategies"]["naive"]
    assert result["nemesis"]["restarts"]["restart-postgres"]["count"] >= 1
    assert result["valid"] is False
    assert result["checks"]["single_capture_write"]["valid"] is False


@pytest.mark.slow
async def test_for_update_stays_exactly_once_while_the_service_is_killed_and_restarted(
    tmp_path: Path,
) -> None:
    """restart-service kills the uvicorn process payrace started with SIGKILL: requests in
    flight end `info` (no answer) and are not held against the target; none is lost."""
    # Held 50 ms each, 80 trials at concurrency 4 outlast the first restart (after 0.5 s).
    summary = await nemesis_run(
        tmp_path, "for_update", "restart-service:0.5", trials=80, target="http", hold_ms=50
    )
    result = summary["strategies"]["for_update"]
    restarts = result["nemesis"]["restarts"]["restart-service"]
    assert restarts["count"] >= 1, result["nemesis"]
    for name in INVARIANTS:
        assert result["checks"][name]["valid"] is True, (name, result["checks"][name])
    assert result["valid"] is True and summary["exit_code"] == 0
    ops = _ops(summary, "for_update")
    actions = [op["value"]["action"] for op in ops if op["f"] == "nemesis" and op["type"] == "info"]
    assert actions.count("down") == actions.count("up") == restarts["count"]
    unanswered = [op for op in ops if op["type"] == "info" and op["f"] != "nemesis"]
    assert all(op["status"] is None for op in unanswered)


async def test_a_capture_whose_transaction_is_killed_before_commit_is_recorded(
    tmp_path: Path, pg: Database
) -> None:
    """kill-after-capture: the gateway captures, then the transaction waiting for its answer
    dies; no webhook follows, so the service's retry or its reconciler must record it."""
    summary = await nemesis_run(
        tmp_path, "for_update", "kill-after-capture:0.5", webhooks=0, dsn=pg.url
    )
    result = summary["strategies"]["for_update"]
    faults = result["nemesis"]
    assert faults["captures_killed_before_commit"] > 0, faults
    for name in INVARIANTS:
        assert result["checks"][name]["valid"] is True, (name, result["checks"][name])
    assert result["valid"] is True
    kills = [
        op["value"]
        for op in _ops(summary, "for_update")
        if op["f"] == "nemesis" and op["type"] == "info" and op["value"]["action"] == "kill"
    ]
    assert len(kills) == faults["captures_killed_before_commit"]
    assert all(k["pids"] and k["gateway_payment"].startswith("pay_") for k in kills)


async def test_killed_captures_do_not_hide_the_naive_double_capture(
    tmp_path: Path, pg: Database
) -> None:
    # payment.authorized: the webhook captures at the gateway too, as the callback does.
    summary = await nemesis_run(
        tmp_path, "naive", "kill-after-capture:0.5", dsn=pg.url, first_event="payment.authorized"
    )
    result = summary["strategies"]["naive"]
    assert result["nemesis"]["captures_killed_before_commit"] > 0
    assert result["valid"] is False


async def test_each_injected_gateway_failure_is_an_operation(tmp_path: Path, pg: Database) -> None:
    # No webhook: the gateway has not captured on its own, so the callback's captures are
    # made (and some answered 504).
    summary = await nemesis_run(
        tmp_path, "for_update", "gateway-errors:0.3,gateway-timeout:0.3", dsn=pg.url, webhooks=0
    )
    result = summary["strategies"]["for_update"]["nemesis"]
    ops = [
        op["value"]
        for op in _ops(summary, "for_update")
        if op["f"] == "nemesis" and op["type"] == "info"
    ]
    failed = [op for op in ops if op["fault"] == "gateway-errors"]
    lost = [op for op in ops if op["fault"] == "gateway-timeout"]
    assert len(failed) == result["gateway_errors_injected"] > 0
    assert len(lost) == result["gateway_timeouts_injected"] > 0
    assert {op["status"] for op in failed} <= {502, 503}
    assert {op["status"] for op in lost} == {504}
    # A capture whose answer was lost (504) is recorded by the reconciler: none lost.
    assert summary["strategies"]["for_update"]["checks"]["no_lost_capture"]["valid"] is True
    assert summary["strategies"]["for_update"]["valid"] is True
