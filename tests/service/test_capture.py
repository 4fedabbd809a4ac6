"""payrace/service/capture.py: the race itself, at the service level, on real PostgreSQL.

The two callbacks of one payment (the browser's verify and Razorpay's webhook) are sent as
concurrent requests, each in its own task under `probes.controlled()`, with a Rendezvous as the
controller: it holds each request after its payment read until the other has read too, or is
waiting for a lock in PostgreSQL. That is the incident's T0-T7 table, every time.

Evidence comes from an audit table filled by triggers this module installs on `payments` and
`invoices` (one row per UPDATE, scoped here to the test's own payments) and from the fake
gateway's capture counters, never from the service's own answers alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy
from conftest import Service, service_settings

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.signing import (
    GatewayKeys,
    client_callback,
    signed_webhook,
    webhook_event,
)
from payrace.harness.infra.provider import Database
from payrace.service.capture import (
    ADVISORY,
    FOR_UPDATE,
    NAIVE,
    STRATEGIES,
    capture,
    mark_failed,
)
from payrace.service.command import CaptureCommand
from payrace.service.errors import NotFound, Rejected
from payrace.service.instrument import probes
from payrace.service.instrument.timing import parse_server_timing
from payrace.service.models import Base
from payrace.service.sql import Observer

KEYS = GatewayKeys()

_AUDIT_SQL = """
CREATE TABLE IF NOT EXISTS test_capture_audit (
    id          bigserial PRIMARY KEY,
    tbl         text   NOT NULL,
    payment_id  bigint NOT NULL,
    old_status  text,
    new_status  text,
    txid        bigint NOT NULL DEFAULT txid_current()
);
CREATE OR REPLACE FUNCTION test_capture_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_capture_audit (tbl, payment_id, old_status, new_status)
    VALUES (TG_TABLE_NAME, (to_jsonb(NEW) ->> TG_ARGV[0])::bigint, OLD.status, NEW.status);
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS test_capture_audit ON payments;
DROP TRIGGER IF EXISTS test_capture_audit ON invoices;
CREATE TRIGGER test_capture_audit AFTER UPDATE ON payments
    FOR EACH ROW EXECUTE FUNCTION test_capture_audit_row('id');
CREATE TRIGGER test_capture_audit AFTER UPDATE ON invoices
    FOR EACH ROW EXECUTE FUNCTION test_capture_audit_row('payment_id');
"""

_UNAUDIT_SQL = """
SET lock_timeout = '10s';
DROP TRIGGER IF EXISTS test_capture_audit ON payments;
DROP TRIGGER IF EXISTS test_capture_audit ON invoices;
DROP FUNCTION IF EXISTS test_capture_audit_row();
DROP TABLE IF EXISTS test_capture_audit;
"""


@dataclass(frozen=True)
class Audit:
    url: str

    def transitions(self, payment_id: int) -> dict[str, int]:
        """How many UPDATEs moved this payment to captured, and its invoice to paid."""
        with psycopg.connect(self.url) as conn:
            rows = conn.execute(
                "SELECT tbl, count(*) FROM test_capture_audit"
                " WHERE payment_id = %s AND new_status IN ('captured', 'paid')"
                " GROUP BY tbl",
                (payment_id,),
            ).fetchall()
        counts = {"payments": 0, "invoices": 0}
        counts.update({str(table): int(n) for table, n in rows})
        return counts


@pytest.fixture(scope="module")
def audit(pg: Database) -> Iterator[Audit]:
    # The services create their tables on startup; this module may run before any service did.
    engine = sqlalchemy.create_engine(pg.psycopg_url())
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(_AUDIT_SQL)
    try:
        yield Audit(pg.url)
    finally:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(_UNAUDIT_SQL)


@pytest.fixture
async def probed_service(pg: Database, gateway_url: str) -> AsyncIterator[Service]:
    async with Service(
        service_settings(pg, gateway_url, capture_strategy="naive", payrace_probes=True)
    ) as svc:
        yield svc


# -- helpers ----------------------------------------------------------------------------------


@dataclass
class Paid:
    order: dict[str, Any]
    payment: dict[str, Any]

    @property
    def payment_id(self) -> int:
        return int(self.order["payment_id"])


async def customer_pays(svc: Service, fake: FakeRazorpay) -> Paid:
    response = await svc.client.post("/orders", json={"amount": 50000, "currency": "INR"})
    assert response.status_code == 201, response.text
    order = response.json()
    return Paid(order, fake.authorize_payment(order["gateway_order_id"]))


Send = Callable[[dict[str, str]], Awaitable[httpx.Response]]


def client_verify(svc: Service, paid: Paid) -> Send:
    body = client_callback(paid.order["gateway_order_id"], paid.payment["id"], KEYS.key_secret)

    async def send(headers: dict[str, str]) -> httpx.Response:
        return await svc.client.post(
            "/payments/verify",
            json={**body, "internal_payment_id": paid.payment_id},
            headers=headers,
        )

    return send


def webhook(svc: Service, paid: Paid, event: str) -> Send:
    body, signed = signed_webhook(webhook_event(event, paid.payment), KEYS.webhook_secret)

    async def send(headers: dict[str, str]) -> httpx.Response:
        return await svc.client.post(
            "/webhooks/razorpay", content=body, headers={**signed, **headers}
        )

    return send


@dataclass
class Outcome:
    response: httpx.Response
    probe: probes.ProbeContext

    @property
    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = self.response.json()
        return body

    @property
    def timings(self) -> dict[str, float]:
        return parse_server_timing(self.response.headers["server-timing"])

    def reads(self) -> list[str | None]:
        """What the payment read saw, once per attempt (a retry reads again)."""
        return [detail for point, _, detail in self.probe.points if point == "payment_read"]


async def controlled(
    rendezvous: probes.Rendezvous,
    label: str,
    send: Send,
    seen: dict[str, probes.ProbeContext] | None = None,
) -> Outcome:
    with probes.controlled(rendezvous, label) as probe:
        if seen is not None:
            seen[label] = probe
        response = await send({})
    return Outcome(response, probe)


async def forced(svc: Service, *sends: tuple[str, Send]) -> list[Outcome]:
    """All requests at once, each held after its payment read until the others read too."""
    rendezvous = probes.Rendezvous(len(sends), svc.runtime.is_blocked, timeout_s=3.0)
    outcomes = await asyncio.gather(*(controlled(rendezvous, label, s) for label, s in sends))
    assert rendezvous.timeouts == 0, "the rendezvous gave up: the interleaving was not forced"
    return list(outcomes)


async def first_then_second(
    svc: Service, first: tuple[str, Send], second: tuple[str, Send]
) -> tuple[Outcome, Outcome]:
    """`first` reads (and under for_update locks) the payment, then `second` starts."""
    rendezvous = probes.Rendezvous(2, svc.runtime.is_blocked, timeout_s=3.0)
    seen: dict[str, probes.ProbeContext] = {}
    none = probes.ProbeContext(label="not started")
    leader = asyncio.create_task(controlled(rendezvous, *first, seen=seen))
    try:
        deadline = time.monotonic() + 3.0
        while not any(point == "payment_read" for point, *_ in seen.get(first[0], none).points):
            assert time.monotonic() < deadline, "the first request never read the payment"
            await asyncio.sleep(0.002)
        follower = await controlled(rendezvous, *second)
    finally:
        outcome = await leader  # never leave it holding a lock behind a failed assertion
    assert rendezvous.timeouts == 0
    return outcome, follower


# -- the race: naive double-captures, for_update does not --------------------------------------


@pytest.mark.parametrize(
    ("event", "gateway_calls"),
    [("payment.captured", 1), ("payment.authorized", 2)],
)
async def test_naive_strategy_under_a_forced_interleaving_captures_twice(
    naive_service: Service,
    fake_gateway: FakeRazorpay,
    audit: Audit,
    event: str,
    gateway_calls: int,
) -> None:
    paid = await customer_pays(naive_service, fake_gateway)

    client, hook = await forced(
        naive_service,
        ("client", client_verify(naive_service, paid)),
        ("webhook", webhook(naive_service, paid, event)),
    )

    # T0/T1: both read "pending"; T4-T7: both write and both say they captured.
    assert client.reads() == hook.reads() == ["pending"]
    for outcome in (client, hook):
        assert outcome.response.status_code == 200, outcome.response.text
        assert (outcome.body["status"], outcome.body["idempotent"]) == ("captured", False)
    assert audit.transitions(paid.payment_id) == {"payments": 2, "invoices": 2}
    # payment.authorized makes both requests call the gateway's capture.
    assert fake_gateway.capture_calls(paid.payment["id"]) == gateway_calls


@pytest.mark.parametrize("event", ["payment.captured", "payment.authorized"])
async def test_for_update_under_a_forced_interleaving_captures_once(
    service: Service, fake_gateway: FakeRazorpay, audit: Audit, event: str
) -> None:
    paid = await customer_pays(service, fake_gateway)

    client, hook = await forced(
        service,
        ("client", client_verify(service, paid)),
        ("webhook", webhook(service, paid, event)),
    )

    assert {client.response.status_code, hook.response.status_code} == {200}
    assert sorted([client.body["idempotent"], hook.body["idempotent"]]) == [False, True]
    # The waiter read only after the winner committed, so it saw the capture.
    assert sorted(map(str, [*client.reads(), *hook.reads()])) == ["captured", "pending"]
    assert audit.transitions(paid.payment_id) == {"payments": 1, "invoices": 1}
    # Either may take the lock first (the client commits its capture intent before it
    # begins); payment.captured reports a capture, so only a winning client calls the gateway.
    calls = 0 if event == "payment.captured" and client.body["idempotent"] else 1
    assert fake_gateway.capture_calls(paid.payment["id"]) == calls


@pytest.mark.parametrize(
    ("leader", "follower"),
    [("client", "payment.captured"), ("payment.authorized", "client")],
)
async def test_for_update_waiter_reports_a_lock_wait_as_long_as_the_winner_held_it(
    service: Service, knobs: FakeRazorpay, audit: Audit, leader: str, follower: str
) -> None:
    paid = await customer_pays(service, knobs)
    knobs.set_knobs(capture_latency_s=0.2)  # the winner holds the row lock across this call

    def send(name: str) -> tuple[str, Send]:
        if name == "client":
            return name, client_verify(service, paid)
        return name, webhook(service, paid, name)

    winner, waiter = await first_then_second(service, send(leader), send(follower))

    assert winner.response.status_code == waiter.response.status_code == 200
    assert (winner.body["idempotent"], waiter.body["idempotent"]) == (False, True)
    assert waiter.reads() == ["captured"]
    held, waited = winner.timings["hold"], waiter.timings["lock"]
    assert winner.timings["gateway"] >= 190
    assert held >= 190
    assert waited >= 150
    # The waiter queued after the winner had locked; it waited for most of the hold.
    assert waited >= held - 100
    assert waiter.timings["gateway"] == 0
    assert audit.transitions(paid.payment_id) == {"payments": 1, "invoices": 1}
    assert knobs.capture_calls(paid.payment["id"]) == 1


async def test_repeatable_read_turns_the_naive_double_update_into_a_retried_serialization_failure(
    pg: Database, gateway_url: str, fake_gateway: FakeRazorpay, audit: Audit
) -> None:
    settings = service_settings(
        pg, gateway_url, capture_strategy="naive", isolation_level="REPEATABLE READ"
    )
    async with Service(settings) as svc:
        paid = await customer_pays(svc, fake_gateway)
        client, hook = await forced(
            svc,
            ("client", client_verify(svc, paid)),
            ("webhook", webhook(svc, paid, "payment.captured")),
        )

    assert client.response.status_code == hook.response.status_code == 200
    winner, loser = (client, hook) if not client.body["idempotent"] else (hook, client)
    assert (winner.body["idempotent"], loser.body["idempotent"]) == (False, True)
    assert winner.reads() == ["pending"]
    # The loser read "pending" too, failed to serialise its UPDATE, retried and saw the capture.
    assert loser.reads() == ["pending", "captured"]
    assert audit.transitions(paid.payment_id) == {"payments": 1, "invoices": 1}
    assert fake_gateway.capture_calls(paid.payment["id"]) == 1


async def test_serialization_failure_without_retries_left_is_a_retryable_409_not_a_500(
    pg: Database, gateway_url: str, knobs: FakeRazorpay, audit: Audit
) -> None:
    settings = service_settings(
        pg,
        gateway_url,
        capture_strategy="naive",
        isolation_level="REPEATABLE READ",
        serialization_retries=0,
    )
    async with Service(settings) as svc:
        paid = await customer_pays(svc, knobs)
        # The client's slow gateway call lets the webhook write first and win.
        knobs.set_knobs(capture_latency_s=0.1)
        client, hook = await forced(
            svc,
            ("client", client_verify(svc, paid)),
            ("webhook", webhook(svc, paid, "payment.captured")),
        )
        retried = await client_verify(svc, paid)({})

    assert hook.response.status_code == 200
    assert client.response.status_code == 409, client.response.text
    assert client.response.headers["retry-after"] == "1"
    error = client.response.json()["error"]
    assert (error["code"], error["sqlstate"]) == ("retry_later", "40001")
    assert audit.transitions(paid.payment_id) == {"payments": 1, "invoices": 1}
    assert retried.status_code == 200
    assert retried.json()["idempotent"] is True


async def test_forced_interleaving_requested_over_http_reproduces_the_double_capture(
    probed_service: Service, fake_gateway: FakeRazorpay, audit: Audit
) -> None:
    paid = await customer_pays(probed_service, fake_gateway)
    pause = {"X-Payrace-Pause": f"group=http-{paid.payment_id}; size=2; timeout_ms=3000"}

    started = time.perf_counter()
    responses = await asyncio.gather(
        client_verify(probed_service, paid)(pause),
        webhook(probed_service, paid, "payment.captured")(pause),
    )
    elapsed = time.perf_counter() - started

    assert [r.status_code for r in responses] == [200, 200]
    assert [r.json()["idempotent"] for r in responses] == [False, False]
    assert audit.transitions(paid.payment_id) == {"payments": 2, "invoices": 2}
    assert elapsed < 2.0  # released by the rendezvous, not by its timeout
    assert probed_service.runtime.rendezvous == {}  # the finished group was dropped


async def test_concurrent_webhooks_under_for_update_never_deadlock(
    service: Service, fake_gateway: FakeRazorpay, audit: Audit
) -> None:
    # Released together right after BEGIN, each webhook races to record its event and lock
    # the payment. Recording first would take FOR KEY SHARE on the payment row (the event's
    # foreign key) in both, and each FOR UPDATE would then wait for the other: a deadlock
    # that PostgreSQL breaks only after deadlock_timeout (1 s).
    for _ in range(4):
        paid = await customer_pays(service, fake_gateway)
        rendezvous = probes.Rendezvous(2, service.runtime.is_blocked, point="txn_begun")
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            controlled(rendezvous, "a", webhook(service, paid, "payment.captured")),
            controlled(rendezvous, "b", webhook(service, paid, "order.paid")),
        )
        elapsed = time.perf_counter() - started

        assert [o.response.status_code for o in outcomes] == [200, 200]
        assert sorted(o.body["idempotent"] for o in outcomes) == [False, True]
        assert elapsed < 0.5
        assert audit.transitions(paid.payment_id) == {"payments": 1, "invoices": 1}


async def test_concurrent_deliveries_of_one_event_id_capture_once(
    service: Service, fake_gateway: FakeRazorpay, audit: Audit
) -> None:
    paid = await customer_pays(service, fake_gateway)
    send = webhook(service, paid, "payment.authorized")  # same body, same event id

    first, second = await forced(service, ("first", send), ("second", send))

    assert first.response.status_code == second.response.status_code == 200
    assert sorted([first.body["duplicate_event"], second.body["duplicate_event"]]) == [False, True]
    assert audit.transitions(paid.payment_id) == {"payments": 1, "invoices": 1}
    assert fake_gateway.capture_calls(paid.payment["id"]) == 1


# -- the routine, called directly ----------------------------------------------------------------


def test_strategies_are_registered_by_name_and_each_serialises_its_own_way() -> None:
    # The first three; payrace.service.strategies registers the others (its own tests).
    assert dict(list(STRATEGIES.items())[:3]) == {
        "naive": NAIVE,
        "for_update": FOR_UPDATE,
        "advisory": ADVISORY,
    }
    assert (NAIVE.lock_rows, FOR_UPDATE.lock_rows, ADVISORY.lock_rows) == (False, True, False)
    assert (NAIVE.advisory, FOR_UPDATE.advisory, ADVISORY.advisory) == (False, False, True)


def _command(paid: Paid, **fields: Any) -> CaptureCommand:
    values: dict[str, Any] = {
        "source": "webhook",
        "payment_id": paid.payment_id,
        "gateway_order_id": paid.order["gateway_order_id"],
        "gateway_payment_id": paid.payment["id"],
        "capture_at_gateway": False,
    }
    values.update(fields)
    return CaptureCommand(**values)


@pytest.mark.parametrize("strategy", ["for_update", "optimistic", "atomic"])
async def test_payment_failed_is_written_once_and_never_over_a_capture(
    pg: Database, gateway_url: str, fake_gateway: FakeRazorpay, strategy: str
) -> None:
    """mark_failed on the locked read (for_update) and on the claim strategies' locked re-read:
    failed once, a repeat answers idempotently, a later capture wins, a late failure after it
    changes nothing."""
    settings = service_settings(pg, gateway_url, capture_strategy=strategy)
    async with Service(settings) as svc:
        runner = svc.runtime.runner
        paid = await customer_pays(svc, fake_gateway)
        failure = _command(paid, event="payment.failed", event_id=f"evt_f_{paid.payment_id}")
        failed = await mark_failed(runner, failure, "BAD_REQUEST_ERROR")
        with psycopg.connect(pg.url) as conn:
            stored = conn.execute(
                "SELECT status, error_code, gateway_payment_id FROM payments WHERE id = %s",
                (paid.payment_id,),
            ).fetchone()
        again = await mark_failed(runner, failure, "BAD_REQUEST_ERROR")
        captured = await capture(
            runner, _command(paid, event="payment.captured", event_id=f"evt_c_{paid.payment_id}")
        )
        late = _command(paid, event="payment.failed", event_id=f"evt_l_{paid.payment_id}")
        after = await mark_failed(runner, late, "LATE")

    assert (failed.status, failed.idempotent, failed.gateway_payment_id) == (
        "failed",
        False,
        paid.payment["id"],
    )
    assert stored == ("failed", "BAD_REQUEST_ERROR", paid.payment["id"])
    assert (again.status, again.idempotent) == ("failed", True)
    # A strategy recording event ids late (after its write) answers the status, not the id.
    assert again.duplicate_event is (strategy == "for_update")
    assert (captured.status, captured.idempotent) == ("captured", False)
    assert (after.status, after.idempotent, after.invoice_status) == ("captured", True, "paid")


async def test_capture_called_directly_reports_the_states_it_wrote(
    service: Service, fake_gateway: FakeRazorpay, audit: Audit
) -> None:
    paid = await customer_pays(service, fake_gateway)

    result = await capture(service.runtime.runner, _command(paid, capture_at_gateway=True))
    repeat = await capture(service.runtime.runner, _command(paid, source="client"))

    assert result.as_json() == {
        "payment_id": paid.payment_id,
        "status": "captured",
        "gateway_payment_id": paid.payment["id"],
        "idempotent": False,
        "duplicate_event": False,
        "invoice_status": "paid",
        "order_status": "paid",
    }
    assert repeat.idempotent is True
    assert (repeat.invoice_status, repeat.order_status) == ("paid", "paid")
    assert fake_gateway.capture_calls(paid.payment["id"]) == 1
    assert audit.transitions(paid.payment_id) == {"payments": 1, "invoices": 1}


async def test_capture_of_a_missing_payment_or_a_foreign_order_raises_and_writes_nothing(
    service: Service, fake_gateway: FakeRazorpay, audit: Audit
) -> None:
    paid = await customer_pays(service, fake_gateway)
    runner = service.runtime.runner

    with pytest.raises(NotFound):
        await capture(runner, _command(paid, payment_id=2**62, event_id="evt_missing_payment"))
    with pytest.raises(Rejected) as rejected:
        await capture(runner, _command(paid, gateway_order_id="order_NotThisOne12345"))

    assert rejected.value.code == "order_mismatch"
    assert audit.transitions(paid.payment_id) == {"payments": 0, "invoices": 0}


async def test_mark_failed_records_the_error_and_never_downgrades_a_capture(
    service: Service, fake_gateway: FakeRazorpay, audit: Audit
) -> None:
    runner = service.runtime.runner
    failing_paid = await customer_pays(service, fake_gateway)
    captured_paid = await customer_pays(service, fake_gateway)

    failed = await mark_failed(runner, _command(failing_paid), "BAD_REQUEST_ERROR")
    await capture(runner, _command(captured_paid))
    kept = await mark_failed(runner, _command(captured_paid), "BAD_REQUEST_ERROR")

    assert (failed.status, failed.idempotent, failed.invoice_status) == ("failed", False, "issued")
    assert (kept.status, kept.idempotent) == ("captured", True)
    assert audit.transitions(captured_paid.payment_id) == {"payments": 1, "invoices": 1}


# -- a killed backend: retried on a fresh connection, else a retryable 503, never a 500 ---------


class KillOwnBackend:
    """Holds a request at `point` while PostgreSQL terminates that request's own backend
    (the nemesis's kill-backends, aimed), then lets it run into the dead connection."""

    def __init__(self, url: str, point: str, times: int) -> None:
        self.url, self.point, self.times = url, point, times
        self.killed: list[int] = []

    async def reached(self, point: str, probe: probes.ProbeContext) -> None:
        if point == self.point and len(self.killed) < self.times:
            assert probe.backend_pid is not None
            await asyncio.to_thread(self._terminate, probe.backend_pid)
            self.killed.append(probe.backend_pid)

    def _terminate(self, pid: int) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            # The timeout form waits until the backend has exited.
            row = conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()
        assert row == (True,)

    def finished(self, probe: probes.ProbeContext) -> None:
        return None


def stored_states(url: str, payment_id: int) -> tuple[str, str, str]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT p.status, i.status, o.status FROM payments p"
            " JOIN invoices i ON i.payment_id = p.id JOIN orders o ON o.id = p.order_id"
            " WHERE p.id = %s",
            (payment_id,),
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


async def test_a_backend_killed_mid_capture_is_retried_on_a_fresh_connection(
    service: Service, fake_gateway: FakeRazorpay, audit: Audit
) -> None:
    paid = await customer_pays(service, fake_gateway)
    killer = KillOwnBackend(audit.url, "payment_written", times=1)

    with probes.controlled(killer, "client") as probe:
        response = await client_verify(service, paid)({})

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "captured"
    assert len(killer.killed) == 1
    # Two attempts on two backends; the gateway accepted the capture in the first, so the
    # retry recorded it instead of capturing again.
    assert [p for p, *_ in probe.points].count("payment_read") == 2
    assert fake_gateway.capture_calls(paid.payment["id"]) == 1
    assert audit.transitions(paid.payment_id) == {"payments": 1, "invoices": 1}
    assert stored_states(audit.url, paid.payment_id) == ("captured", "paid", "paid")


async def test_a_backend_killed_in_every_attempt_is_a_retryable_503_that_wrote_nothing(
    service: Service, fake_gateway: FakeRazorpay, audit: Audit
) -> None:
    paid = await customer_pays(service, fake_gateway)
    killer = KillOwnBackend(audit.url, "payment_written", times=99)

    with probes.controlled(killer, "client"):
        response = await client_verify(service, paid)({})

    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["code"] == "database_unavailable"
    assert "retry" in error["message"]
    assert len(killer.killed) == 3  # the first attempt and two retries, each on a new backend
    assert len(set(killer.killed)) == 3
    # Every attempt's UPDATE died with its backend: nothing partial is left behind.
    assert audit.transitions(paid.payment_id) == {"payments": 0, "invoices": 0}
    assert stored_states(audit.url, paid.payment_id) == ("pending", "issued", "created")
    assert fake_gateway.capture_calls(paid.payment["id"]) == 1
    # Razorpay's payment.captured webhook then records the capture the gateway accepted.
    hook = await webhook(service, paid, "payment.captured")({})
    assert hook.status_code == 200, hook.text
    assert stored_states(audit.url, paid.payment_id) == ("captured", "paid", "paid")
    assert fake_gateway.capture_calls(paid.payment["id"]) == 1


class RollBackAfterTheGateway:
    """Holds request "first" before its COMMIT (it has won the payment and the gateway has
    accepted its capture) until request "second" waits for the payment's row lock, then ends
    first's backend: its transaction rolls back and the lock passes to second, as when
    SERIALIZABLE fails first's COMMIT with 40001."""

    def __init__(self, url: str, is_blocked: Callable[[int], Awaitable[bool]]) -> None:
        self.url, self.is_blocked = url, is_blocked
        self.holding = asyncio.Event()
        self.second: probes.ProbeContext | None = None
        self.killed: list[int] = []

    async def reached(self, point: str, probe: probes.ProbeContext) -> None:
        if probe.label == "second":
            self.second = probe
            return
        if point != "before_commit" or self.killed:
            return
        self.holding.set()
        deadline = time.monotonic() + 5.0
        while (
            self.second is None
            or self.second.backend_pid is None
            or not await self.is_blocked(self.second.backend_pid)
        ):
            assert time.monotonic() < deadline, "the second request never waited for the payment"
            await asyncio.sleep(0.002)
        assert probe.backend_pid is not None
        await asyncio.to_thread(KillOwnBackend(self.url, point, 1)._terminate, probe.backend_pid)
        self.killed.append(probe.backend_pid)

    def finished(self, probe: probes.ProbeContext) -> None:
        return None


async def test_serializable_capture_rolled_back_after_the_gateway_answered_is_not_asked_again(
    pg: Database, gateway_url: str, fake_gateway: FakeRazorpay, audit: Audit
) -> None:
    """The callback wins the payment and the gateway accepts its capture; then its
    transaction rolls back. The payment.authorized webhook waiting behind it wins next and
    must record that capture, not ask the gateway for another: the acceptance was committed
    beside the transaction (command.record_accepted), where the winner reads it."""
    settings = service_settings(pg, gateway_url, capture_strategy="serializable")
    async with Service(settings) as svc:
        paid = await customer_pays(svc, fake_gateway)
        controller = RollBackAfterTheGateway(audit.url, svc.runtime.is_blocked)
        first = asyncio.create_task(controlled(controller, "first", client_verify(svc, paid)))
        try:
            await asyncio.wait_for(controller.holding.wait(), 5.0)
            second = await controlled(
                controller, "second", webhook(svc, paid, "payment.authorized")
            )
        finally:
            callback = await first

    assert len(controller.killed) == 1
    assert callback.response.status_code == second.response.status_code == 200
    assert second.body["idempotent"] is False  # the webhook wrote the capture ...
    assert callback.body["idempotent"] is True  # ... and the callback's re-run found it
    assert fake_gateway.capture_calls(paid.payment["id"]) == 1
    assert second.timings.get("gateway", 0.0) == 0.0
    assert audit.transitions(paid.payment_id) == {"payments": 1, "invoices": 1}
    assert stored_states(audit.url, paid.payment_id) == ("captured", "paid", "paid")


@pytest.mark.parametrize(
    ("strategy", "dedupe", "captures"),
    [("naive", True, 1), ("naive", False, 2), ("for_update", False, 1)],
    ids=["naive-dedupe", "naive-no-dedupe", "for_update-no-dedupe"],
)
async def test_webhook_dedupe_is_an_option_beside_the_strategy(
    strategy: str,
    dedupe: bool,
    captures: int,
    pg: Database,
    gateway_url: str,
    fake_gateway: FakeRazorpay,
    audit: Audit,
) -> None:
    """One payment.authorized event delivered twice at once (Razorpay's at-least-once).
    With dedupe the event id's unique key decides: the second insert waits for the first and
    answers a duplicate, which keeps even naive to one capture. WEBHOOK_DEDUPE off, both
    deliveries are processed: naive captures twice, for_update's status check after the
    lock answers the second idempotently."""
    settings = service_settings(pg, gateway_url, capture_strategy=strategy, webhook_dedupe=dedupe)
    async with Service(settings) as svc:
        paid = await customer_pays(svc, fake_gateway)
        send = webhook(svc, paid, "payment.authorized")  # same body, same event id
        first, second = await forced(svc, ("first", send), ("second", send))

    assert first.response.status_code == second.response.status_code == 200
    duplicates = sorted([first.body["duplicate_event"], second.body["duplicate_event"]])
    assert duplicates == ([False, True] if dedupe else [False, False])
    assert audit.transitions(paid.payment_id) == {"payments": captures, "invoices": captures}
    assert fake_gateway.capture_calls(paid.payment["id"]) == captures
    with psycopg.connect(audit.url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM webhook_events WHERE payment_id = %s", (paid.payment_id,)
        ).fetchone()
    assert row == (1 if dedupe else 0,)
    if not dedupe and strategy == "for_update":
        assert sorted(o.body["idempotent"] for o in (first, second)) == [False, True]


async def test_a_capture_sends_four_statements_under_the_lock_and_a_repeat_two(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    """The round trips while the payment lock is held (issue 12): the payment and its order
    in one locking read, then one UPDATE each for payment, invoice and order, then COMMIT; a
    repeat reads the payment and the statuses it answers. Seen by an observer of the capture
    pool and of the intents pool: the intent is one statement in autocommit, before BEGIN."""
    paid = await customer_pays(service, fake_gateway)
    log: list[str] = []

    class Log(Observer):
        def on_begin(self, isolation: str) -> None:
            log.append(f"BEGIN {isolation}")

        def on_statement(self, sql: str, args: Sequence[object]) -> None:
            log.append(" ".join(sql.split()))

        def on_commit(self) -> None:
            log.append("COMMIT")

        def on_rollback(self) -> None:
            log.append("ROLLBACK")

    runner = service.runtime.runner
    pools = [runner.db, runner.intents]
    for pool in pools:
        pool.observers.append(Log())
    try:
        first = await client_verify(service, paid)({})
        fresh, log[:] = list(log), []
        again = await client_verify(service, paid)({})
        repeat = list(log)
    finally:
        for pool in pools:
            pool.observers.clear()

    assert first.status_code == again.status_code == 200
    assert again.json()["idempotent"] is True
    intent, begin, *locked, commit = fresh
    assert intent.startswith("INSERT INTO capture_intents")
    assert (begin, commit) == ("BEGIN READ COMMITTED", "COMMIT")
    assert len(locked) == 4, locked
    assert locked[0].startswith("SELECT") and locked[0].endswith("FOR UPDATE OF payments")
    assert "JOIN orders" in locked[0]
    assert [s.split()[1] for s in locked[1:]] == ["payments", "invoices", "orders"]
    assert repeat[0].startswith("INSERT INTO capture_intents")
    assert repeat[1] == "BEGIN READ COMMITTED" and repeat[-1] == "COMMIT"
    assert len(repeat[2:-1]) == 2, repeat
    assert repeat[2] == locked[0]
