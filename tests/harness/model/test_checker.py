"""payrace/harness/model/checker.py: every checker on hand-made histories and observations.

Checkers are pure functions of (ops, observation), so each case here is a small history and
the oracle's view of it, written out; test_oracle.py feeds them what a real database saw.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from payrace.harness.model.checker import (
    CHECKERS,
    CheckResult,
    check,
    compose,
    error_classes,
    gateway_capture_once,
    no_5xx,
    no_deadlock,
    no_lost_capture,
    no_phantom_capture,
    service_outages,
    single_capture_write,
    single_invoice_paid,
    single_order_paid,
)
from payrace.harness.model.deadlocks import CycleMember, LockCycle
from payrace.harness.model.history import Operation
from payrace.harness.model.oracle import AuditRow, Observation, PaymentState
from payrace.harness.model.watched import OracleConfig

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
REFERENCE = OracleConfig.reference()


def row(
    id: int,
    table: str,
    payment: int,
    old: str | None,
    new: str | None,
    txid: int,
    *,
    op: str = "UPDATE",
    row_id: int | None = None,
    pid: int = 4242,
    changed: tuple[str, ...] = ("status",),
) -> AuditRow:
    return AuditRow(
        id=id,
        table=table,
        row_id=payment if row_id is None else row_id,
        payment_id=payment,
        op=op,
        old_status=old,
        new_status=new,
        txid=txid,
        backend_pid=pid,
        at=T0 + timedelta(milliseconds=id),
        changed=changed,
    )


def state(
    payment: int,
    status: str = "captured",
    gid: str | None = None,
    invoice: str | None = "paid",
    order: str | None = "paid",
) -> PaymentState:
    return PaymentState(payment, status, gid, invoice, order)


def observation(
    audit: Sequence[AuditRow] = (),
    payments: Sequence[PaymentState] = (),
    *,
    captures: dict[str, int] | None = None,
    accepted: dict[str, int] | None = None,
    deadlocks: int = 0,
    settled: bool = True,
    config: OracleConfig = REFERENCE,
    at_gateway: Collection[str] | None = None,
) -> Observation:
    """`at_gateway`: gateway ids captured at the gateway (default: a gateway that agrees with
    the database: every captured payment's id, `pay_<n>` as Ops sends it, and every id with
    a capture call)."""
    if at_gateway is None:
        at_gateway = {g for g, n in {**(captures or {}), **(accepted or {})}.items() if n}
        at_gateway |= {p.gateway_payment_id or f"pay_{p.payment_id}" for p in payments
                       if p.status == "captured"}  # fmt: skip
    return Observation(
        audit=tuple(audit),
        payments={p.payment_id: p for p in payments},
        gateway_captures=captures or {},
        gateway_accepted=accepted or {},
        deadlocks=deadlocks,
        config=config,
        deadlocks_settled=settled,
        deadlock_note="" if settled else "2 client backend(s) active",
        gateway_captured=frozenset(at_gateway),
        gateway_observed=True,
    )


class Ops:
    """Builds a history: call() appends an invoke and its completion."""

    def __init__(self) -> None:
        self.ops: list[Operation] = []

    def _add(self, **fields: Any) -> Operation:
        op = Operation(index=len(self.ops), time=len(self.ops) * 1000, trial=1, **fields)
        self.ops.append(op)
        return op

    def invoke(self, f: str, process: str, payment: int, value: dict[str, Any]) -> Operation:
        return self._add(type="invoke", f=f, process=process, payment=payment, value=value)

    def done(
        self,
        invoke: Operation,
        type: str,
        status: int | None,
        value: dict[str, Any] | None = None,
    ) -> Operation:
        return self._add(
            type=type,
            f=invoke.f,
            process=invoke.process,
            payment=invoke.payment,
            value=value or {},
            status=status,
        )

    def verify(
        self,
        payment: int,
        status: int | None = 200,
        answer: str = "captured",
        code: str | None = None,
    ) -> None:
        inv = self.invoke("verify", "client", payment, {"gateway_payment_id": f"pay_{payment}"})
        if status is None:
            self.done(inv, "info", None)
        elif status < 300:
            self.done(inv, "ok", status, {"status": answer, "idempotent": False})
        else:
            default = {
                409: "retry_later",
                500: "internal_error",
                502: "gateway_refused",
                503: "database_unavailable",
            }.get(status, "rejected")
            code = code if code is not None else default
            kind = "fail" if status < 500 else "info"
            self.done(inv, kind, status, {"error": {"code": code, "message": "…"}})

    def webhook(self, payment: int, event: str = "payment.captured", status: int = 200) -> None:
        value = {"event": event, "event_id": "evt_1", "gateway_payment_id": f"pay_{payment}"}
        inv = self.invoke("webhook", "webhook-1", payment, value)
        # The answer need not echo the event: the checker pairs it with its invoke.
        self.done(inv, "ok" if status < 300 else "fail", status, {"ignored": False})


def double_capture(payment: int = 7, first_id: int = 1) -> list[AuditRow]:
    """What the naive flow leaves: a second transaction rewrites captured over captured."""
    return [
        row(first_id, "payments", payment, "pending", "captured", 501, pid=11),
        row(first_id + 1, "payments", payment, "captured", "captured", 502, pid=12),
    ]


def single_capture(payment: int = 7, first_id: int = 1) -> list[AuditRow]:
    return [
        row(first_id, "payments", payment, None, "pending", 400, op="INSERT", changed=()),
        row(first_id + 1, "payments", payment, "pending", "captured", 501),
        row(first_id + 2, "invoices", payment, "issued", "paid", 501, row_id=70),
        row(first_id + 3, "orders", payment, "created", "paid", 501, row_id=700),
    ]


# -- no_phantom_capture --------------------------------------------------------------------


def test_no_phantom_capture_is_violated_by_a_capture_the_gateway_never_made() -> None:
    ops = Ops()
    ops.webhook(8)  # a payment.captured the target trusted
    obs = observation(single_capture(8), [state(8, gid="pay_8")], at_gateway=())
    result = no_phantom_capture(ops.ops, obs)
    assert result.valid is False
    assert result.count == 1 and result.payments == frozenset({8})
    assert result.first is not None
    assert result.first["gateway_payment_id"] == "pay_8"
    assert result.first["problem"] == "captured in the database, not at the gateway"


def test_no_phantom_capture_is_valid_when_the_gateway_captured_too() -> None:
    obs = observation(single_capture(8), [state(8, gid="pay_8")], at_gateway={"pay_8"})
    assert no_phantom_capture([], obs).valid is True
    pending = observation([], [state(9, status="pending", gid="pay_9")], at_gateway=())
    assert no_phantom_capture([], pending).valid is True  # nothing booked, nothing to prove


def test_no_phantom_capture_is_unknown_without_the_gateways_state() -> None:
    obs = replace(observation(single_capture(8), [state(8, gid="pay_8")]), gateway_observed=False)
    result = no_phantom_capture([], obs)
    assert result.valid == "unknown"
    assert "not read" in result.note


def test_no_phantom_capture_looks_up_the_id_the_history_sent_when_the_row_has_none() -> None:
    ops = Ops()
    ops.verify(8)  # carries gateway_payment_id pay_8 in its value
    row_without_id = state(8, gid=None)
    assert (
        no_phantom_capture(ops.ops, observation([], [row_without_id], at_gateway=())).valid is False
    )
    assert (
        no_phantom_capture(ops.ops, observation([], [row_without_id], at_gateway={"pay_8"})).valid
        is True
    )


# -- single_capture_write ------------------------------------------------------------------


def test_single_capture_write_is_violated_by_a_second_transaction_rewriting_captured() -> None:
    ops = Ops()
    ops.verify(7)
    ops.webhook(7)
    result = single_capture_write(ops.ops, observation(double_capture(), [state(7)]))
    assert (result.valid, result.count, result.checked) == (False, 1, 1)
    assert result.payments == {7}
    assert result.worst is not None
    assert result.worst["payment"] == 7
    assert result.worst["writes"] == 2
    assert result.worst["rewrites"] == 1
    assert result.worst["txids"] == [501, 502]
    assert result.worst["backend_pids"] == [11, 12]
    assert [r["audit_id"] for r in result.worst["audit"]] == [1, 2]
    assert [o["f"] for o in result.worst["ops"]] == ["verify", "webhook"]


def test_single_capture_write_is_valid_for_one_capturing_transaction() -> None:
    result = single_capture_write([], observation(single_capture(), [state(7)]))
    assert (result.valid, result.count, result.checked) == (True, 0, 1)
    assert result.first is None and result.worst is None


def test_single_capture_write_counts_transactions_not_rows() -> None:
    audit = [
        row(1, "payments", 7, "pending", "captured", 501),
        row(2, "payments", 7, "captured", "captured", 501, changed=("method",)),
    ]
    assert single_capture_write([], observation(audit, [state(7)])).valid is True


def test_single_capture_write_is_unknown_when_the_capture_is_not_in_the_audit() -> None:
    result = single_capture_write([], observation([], [state(7)]))
    assert (result.valid, result.count) == ("unknown", 0)
    assert result.first is not None
    assert result.first["problem"] == "no write seen"


def test_single_capture_write_ignores_rewrites_of_declared_harmless_columns() -> None:
    touch = row(3, "payments", 7, "captured", "captured", 502, changed=("updated_at",))
    audit = [*single_capture(), touch]
    assert single_capture_write([], observation(audit, [state(7)])).valid is False
    payments = replace(REFERENCE.payments, ignore_columns=("updated_at",))
    config = replace(REFERENCE, payments=payments)
    assert single_capture_write([], observation(audit, [state(7)], config=config)).valid is True


def test_single_capture_write_reports_first_worst_and_last() -> None:
    audit = [
        *double_capture(1, first_id=10),
        *double_capture(2, first_id=20),
        row(22, "payments", 2, "captured", "captured", 503),
        *double_capture(3, first_id=30),
        *single_capture(4, first_id=40),
    ]
    result = single_capture_write([], observation(audit, [state(p) for p in (1, 2, 3, 4)]))
    assert (result.valid, result.count, result.checked) == (False, 3, 4)
    assert result.first is not None and result.worst is not None and result.last is not None
    assert (result.first["payment"], result.worst["payment"], result.last["payment"]) == (1, 2, 3)
    assert result.worst["writes"] == 3
    assert result.payments == {1, 2, 3}


# -- single_invoice_paid / single_order_paid -----------------------------------------------


@pytest.mark.parametrize(
    ("checker", "table", "old"),
    [(single_invoice_paid, "invoices", "issued"), (single_order_paid, "orders", "created")],
)
def test_a_second_paid_write_is_a_violation_even_when_only_paid_at_changed(
    checker: Any, table: str, old: str
) -> None:
    audit = [
        *double_capture(),
        row(3, table, 7, old, "paid", 501, row_id=70),
        # The naive second writer read the row after the first committed, so only paid_at
        # changed — still a second "mark paid".
        row(4, table, 7, "paid", "paid", 502, row_id=70, changed=("paid_at",)),
    ]
    result = checker([], observation(audit, [state(7)]))
    assert (result.valid, result.count) == (False, 1)
    assert result.worst["table"] == table
    assert result.worst["row_id"] == 70
    assert result.worst["txids"] == [501, 502]


@pytest.mark.parametrize("checker", [single_invoice_paid, single_order_paid])
def test_one_paid_write_is_valid(checker: Any) -> None:
    result = checker([], observation(single_capture(), [state(7)]))
    assert (result.valid, result.count, result.checked) == (True, 0, 1)


@pytest.mark.parametrize(
    ("checker", "final"),
    [
        (single_invoice_paid, state(7, invoice="issued")),
        (single_order_paid, state(7, order="attempted")),
    ],
)
def test_a_captured_payment_whose_row_was_never_paid_is_a_violation(
    checker: Any, final: PaymentState
) -> None:
    audit = [row(1, "payments", 7, "pending", "captured", 501)]
    result = checker([], observation(audit, [final]))
    assert (result.valid, result.count) == (False, 1)
    assert result.first["problem"] == "no write seen"


@pytest.mark.parametrize("checker", [single_invoice_paid, single_order_paid])
def test_a_paid_row_with_no_write_in_the_window_is_unknown(checker: Any) -> None:
    audit = [row(1, "payments", 7, "pending", "captured", 501)]
    assert checker([], observation(audit, [state(7)])).valid == "unknown"


def test_a_payment_without_an_invoice_is_not_judged_by_single_invoice_paid() -> None:
    audit = [row(1, "payments", 7, "pending", "captured", 501)]
    assert single_invoice_paid([], observation(audit, [state(7, invoice=None)])).valid is True


# -- gateway_capture_once ------------------------------------------------------------------


def test_gateway_capture_once_is_violated_by_a_second_capture_call() -> None:
    ops = Ops()
    ops.verify(7)
    ops.verify(7, status=502)
    obs = observation(
        single_capture(),
        [state(7, gid="pay_7"), state(8, gid="pay_8")],
        captures={"pay_7": 2, "pay_8": 1},
        accepted={"pay_7": 1, "pay_8": 1},
    )
    result = gateway_capture_once(ops.ops, obs)
    assert (result.valid, result.count, result.checked) == (False, 1, 2)
    assert result.worst == {
        "gateway_payment_id": "pay_7",
        "payment": 7,
        "calls": 2,
        "accepted": 1,
        "ops": [
            {
                "index": 1,
                "f": "verify",
                "process": "client",
                "type": "ok",
                "status": 200,
                "trial": 1,
            },
            {
                "index": 3,
                "f": "verify",
                "process": "client",
                "type": "info",
                "status": 502,
                "trial": 1,
            },
        ],
    }
    assert result.payments == {7}


def test_gateway_capture_once_is_valid_with_one_call_per_payment() -> None:
    obs = observation([], [], captures={"pay_7": 1, "pay_8": 1})
    result = gateway_capture_once([], obs)
    assert (result.valid, result.count, result.checked) == (True, 0, 2)


# -- no_lost_capture -----------------------------------------------------------------------


def test_a_verify_answered_captured_must_end_captured() -> None:
    ops = Ops()
    ops.verify(5)
    result = no_lost_capture(ops.ops, observation([], [state(5, status="authorized")]))
    assert (result.valid, result.count, result.checked) == (False, 1, 1)
    assert result.first is not None
    assert result.first["payment"] == 5
    assert result.first["final_status"] == "authorized"
    assert result.first["confirmed_by"] == ["verify answered captured #1"]


def test_an_ok_payment_captured_webhook_confirms_even_if_the_answer_does_not_say_so() -> None:
    ops = Ops()
    ops.webhook(5, "order.paid")
    result = no_lost_capture(ops.ops, observation([], [state(5, status="pending")]))
    assert (result.valid, result.count) == (False, 1)
    assert result.first is not None
    assert result.first["confirmed_by"] == ["webhook order.paid ok #1"]


def test_a_capture_the_gateway_accepted_must_end_captured() -> None:
    ops = Ops()
    ops.verify(5, status=502)  # the answer was lost, but the gateway did capture
    obs = observation([], [state(5, status="failed")], captures={"pay_5": 1}, accepted={"pay_5": 1})
    result = no_lost_capture(ops.ops, obs)
    assert (result.valid, result.count) == (False, 1)
    assert result.first is not None
    assert result.first["confirmed_by"] == ["gateway accepted 1 capture(s) of pay_5"]


def test_no_lost_capture_is_valid_when_confirmed_payments_end_captured() -> None:
    ops = Ops()
    ops.verify(5)
    ops.webhook(5)
    ops.webhook(6, "payment.authorized", status=200)  # answered without "captured": no claim
    ops.verify(6, status=409)  # a refusal confirms nothing
    ops.webhook(6, "payment.failed")
    obs = observation([], [state(5), state(6, status="authorized")], accepted={"pay_5": 1})
    result = no_lost_capture(ops.ops, obs)
    assert (result.valid, result.count, result.checked) == (True, 0, 1)


def test_a_confirmed_payment_outside_the_observation_is_unknown() -> None:
    ops = Ops()
    ops.verify(5)
    result = no_lost_capture(ops.ops, observation([], []))
    assert (result.valid, result.count) == ("unknown", 0)
    assert "outside the observation's scope" in result.note


# -- no_5xx --------------------------------------------------------------------------------


def test_no_5xx_is_violated_by_a_server_error_even_alongside_unanswered_requests() -> None:
    ops = Ops()
    ops.verify(1)
    ops.verify(2, status=None)
    ops.verify(3, status=500)
    result = no_5xx(ops.ops, observation())
    assert (result.valid, result.count, result.checked) == (False, 1, 3)
    assert result.first is not None
    assert (result.first["payment"], result.first["status"]) == (3, 500)
    assert result.first["code"] == "internal_error"
    assert result.payments == {3}


def test_no_5xx_is_unknown_when_a_request_got_no_answer() -> None:
    ops = Ops()
    ops.verify(1)
    ops.verify(2, status=None)
    result = no_5xx(ops.ops, observation())
    assert (result.valid, result.count) == ("unknown", 0)
    assert result.first is not None and result.first["index"] == 3


def _restart(ops: Ops, fault: str, action: str) -> None:
    value = {"fault": fault, "action": action}
    ops.done(ops.invoke("nemesis", "nemesis", 0, value), "info", None, value)


def test_no_5xx_does_not_hold_the_service_killed_by_the_nemesis_against_it() -> None:
    """Requests that ended without an answer while restart-service had the process killed
    (between its down and up operations) are the fault injected, not a hidden crash."""
    ops = Ops()
    ops.verify(1)
    _restart(ops, "restart-service", "down")
    ops.verify(2, status=None)
    _restart(ops, "restart-service", "up")
    ops.verify(3)
    result = no_5xx(ops.ops, observation())
    assert (result.valid, result.count) == (True, 0)
    assert "1 unanswered while the nemesis had killed the service" in result.note
    assert service_outages(ops.ops) == [(ops.ops[3].time, ops.ops[7].time)]

    # The same silence after the service was back up, or under another fault, is unknown.
    for fault, after in (("restart-service", True), ("restart-postgres", False)):
        other = Ops()
        _restart(other, fault, "down")
        if after:
            _restart(other, fault, "up")
        other.verify(2, status=None)
        if not after:
            _restart(other, fault, "up")
        assert no_5xx(other.ops, observation()).valid == "unknown", fault


def test_no_5xx_is_valid_when_every_answer_is_below_500() -> None:
    ops = Ops()
    ops.verify(1)
    ops.verify(1, status=409)
    ops.webhook(1)
    assert no_5xx(ops.ops, observation()).valid is True


def test_no_5xx_accepts_a_handled_fault_but_not_a_crash() -> None:
    handled = Ops()
    handled.verify(1, status=503)  # database_unavailable: a killed backend, retry later
    handled.verify(2, status=502, code="gateway_error")
    result = no_5xx(handled.ops, observation())
    assert (result.valid, result.count, result.checked) == (True, 0, 2)
    assert "2 deliberate 5xx" in result.note
    for status, code in ((500, "internal_error"), (500, "database_unavailable"), (503, "oops")):
        crashed = Ops()
        crashed.verify(1, status=503)
        crashed.verify(2, status=status, code=code)
        result = no_5xx(crashed.ops, observation())
        assert (result.valid, result.count, result.payments) == (False, 1, {2}), (status, code)


# -- no_deadlock ---------------------------------------------------------------------------


def test_no_deadlock_is_violated_by_any_counted_deadlock_settled_or_not() -> None:
    for settled in (True, False):
        result = no_deadlock([], observation(deadlocks=2, settled=settled))
        assert (result.valid, result.count) == (False, 2)


def test_no_deadlock_is_valid_only_for_a_settled_zero() -> None:
    assert no_deadlock([], observation(deadlocks=0, settled=True)).valid is True
    unsettled = no_deadlock([], observation(deadlocks=0, settled=False))
    assert unsettled.valid == "unknown"
    assert unsettled.note == "2 client backend(s) active"


def knot(*members: tuple[int, int, str | None]) -> LockCycle:
    """A wait-for cycle as the LockWatch records it: (pid, xid, fate) per member."""
    return LockCycle(
        T0,
        tuple(
            CycleMember(
                pid, xid, f"UPDATE t SET n = {pid}", "transaction 1 (ShareLock)", (), xid, status
            )
            for pid, xid, status in members
        ),
    )


def watched(obs: Observation, *cycles: LockCycle) -> Observation:
    return replace(obs, cycles=cycles, cycles_watched=True)


def test_no_deadlock_names_the_payment_its_survivor_committed_with_the_statements() -> None:
    ops = Ops()
    ops.verify(7)
    ops.verify(8)
    # 501 wrote payment 7's rows and committed; 502 was the victim, its rows rolled back.
    cycle = knot((11, 501, "committed"), (12, 502, "aborted"))
    obs = watched(observation(single_capture(7), [state(7), state(8)], deadlocks=1), cycle)
    result = no_deadlock(ops.ops, obs)
    assert (result.valid, result.count, result.payments) == (False, 1, {7})
    assert result.first is not None
    assert result.first["statements"] == ["UPDATE t SET n = 11", "UPDATE t SET n = 12"]
    assert (result.first["payment"], result.first["trial"], result.first["deadlocks"]) == (7, 1, 1)
    assert [m["status"] for m in result.first["cycles"][0]["members"]] == ["committed", "aborted"]
    assert result.first["ops"][0]["f"] == "verify"
    assert "1 attributed to 1 payment(s), 0 not attributed" in result.note
    assert check(ops.ops, obs).violating_payments == {7}


def test_no_deadlock_drops_a_cycle_whose_members_all_committed() -> None:
    """A cycle PostgreSQL resolved by reordering a lock queue, aborting nobody."""
    cycle = knot((11, 501, "committed"), (12, 502, "committed"))
    result = no_deadlock([], watched(observation(single_capture(7), [state(7)]), cycle))
    assert (result.valid, result.count) == (True, 0)


def test_a_reply_naming_40p01_ties_its_trial_even_without_a_sampler() -> None:
    ops = Ops()
    inv = ops.invoke("webhook", "webhook-1", 9, {"event": "payment.captured"})
    said = "concurrent update of this payment (deadlock_detected) persisted after 3 attempts"
    ops.done(
        inv, "fail", 409, {"error": {"code": "retry_later", "message": said, "sqlstate": "40P01"}}
    )
    ops.verify(10, status=409)  # a 409 about something else
    result = no_deadlock(ops.ops, observation(deadlocks=1))
    assert (result.valid, result.count, result.payments) == (False, 1, {9})
    assert result.first is not None and result.first["replies"][0]["said"] == said
    assert result.first["statements"] == []


def test_deadlocks_counted_beyond_the_attributed_are_violations_of_no_payment() -> None:
    cycle = knot((11, 501, "committed"), (12, 502, "aborted"))
    lost = knot((13, 900, "committed"), (14, 901, "aborted"))  # its survivor wrote nothing
    obs = watched(observation(single_capture(7), [state(7)], deadlocks=4), cycle, lost)
    result = no_deadlock([], obs)
    # 1 tied to payment 7; of the other 3, 1 was seen as a cycle and 2 never were.
    assert (result.valid, result.count, result.payments) == (False, 4, {7})
    assert result.last is not None and result.last["unattributed"] == 3
    assert (
        "1 wait-for cycle(s) seen whose surviving transaction wrote no row" in (result.last["why"])
    )
    assert (
        "2 counted by pg_stat_database were never seen as a wait-for cycle" in (result.last["why"])
    )
    # An unattributed cycle is a deadlock even while the counter has not settled.
    unsettled = watched(observation(deadlocks=0, settled=False), lost)
    assert no_deadlock([], unsettled).valid is False


# -- error_classes -------------------------------------------------------------------------


def test_error_classes_tabulates_and_accepts_documented_classes() -> None:
    ops = Ops()
    ops.verify(1)
    ops.verify(1)
    ops.verify(2, status=409)
    ops.verify(3, status=502)
    ops.verify(4, status=None)
    ops.verify(5, status=503)
    ops.webhook(1)
    result = error_classes(ops.ops, observation())
    assert (result.valid, result.count, result.checked) == (True, 0, 7)
    assert result.first is not None
    table = {(c["f"], c["status"], c["code"]): c["count"] for c in result.first["classes"]}
    assert table == {
        ("verify", 200, None): 2,
        ("verify", 409, "retry_later"): 1,
        ("verify", 502, "gateway_refused"): 1,
        ("verify", 503, "database_unavailable"): 1,
        ("verify", None, None): 1,
        ("webhook", 200, None): 1,
    }
    assert "verify 409 retry_later: 1" in result.note


def test_error_classes_flags_a_500_and_a_rejection_of_a_valid_request() -> None:
    ops = Ops()
    ops.verify(1)
    ops.verify(2, status=500)
    ops.verify(3, status=400)
    ops.verify(4, status=400)
    result = error_classes(ops.ops, observation())
    assert (result.valid, result.count) == (False, 3)
    assert result.worst is not None
    assert (result.worst["status"], result.worst["code"], result.worst["count"]) == (
        400,
        "rejected",
        2,
    )
    assert "verify 500 internal_error: 1 (unexpected)" in result.note


# -- compose / check -----------------------------------------------------------------------


def _result(valid: Any) -> CheckResult:
    return CheckResult("x", valid, 0, 1)


def test_compose_ranks_false_over_unknown_over_true() -> None:
    assert compose([]) is True
    assert compose([_result(True), _result(True)]) is True
    assert compose([_result(True), _result("unknown")]) == "unknown"
    assert compose([_result("unknown"), _result(False), _result(True)]) is False
    assert compose([_result(False), _result("unknown")]) is False


def test_a_checker_that_raises_is_unknown_and_says_why() -> None:
    def broken(ops: Sequence[Operation], obs: Observation) -> CheckResult:
        raise KeyError("gateway_payment_id")

    verdict = check([], observation(), checkers=(no_deadlock, broken))
    assert verdict.valid == "unknown"
    assert verdict.results["broken"].valid == "unknown"
    assert "KeyError('gateway_payment_id')" in verdict.results["broken"].note
    assert verdict.results["no_deadlock"].valid is True


def test_check_runs_every_checker_and_names_the_violating_payments() -> None:
    ops = Ops()
    ops.verify(7)
    ops.webhook(7)
    ops.verify(8)
    audit = [*double_capture(7), *single_capture(8, first_id=10)]
    obs = observation(audit, [state(7, gid="pay_7"), state(8, gid="pay_8")], captures={"pay_7": 1})
    verdict = check(iter(ops.ops), obs)  # any iterable of operations
    assert set(verdict.results) == {c.__name__ for c in CHECKERS}
    assert verdict.valid is False
    assert verdict.violating_payments == {7}
    assert verdict.results["single_capture_write"].valid is False
    assert verdict.results["no_lost_capture"].valid is True
    doc = json.loads(json.dumps(verdict.to_json()))
    assert doc["valid"] is False
    assert doc["violating_payments"] == [7]
    assert doc["results"]["single_capture_write"]["worst"]["txids"] == [501, 502]


def test_a_clean_run_is_valid() -> None:
    ops = Ops()
    ops.verify(8)
    ops.webhook(8)
    obs = observation(single_capture(8), [state(8, gid="pay_8")], captures={"pay_8": 1})
    verdict = check(ops.ops, obs)
    assert verdict.valid is True, {
        n: r.note for n, r in verdict.results.items() if r.valid is not True
    }
    assert verdict.violating_payments == frozenset()


def test_gateway_capture_once_leaves_out_calls_the_fault_injection_failed() -> None:
    """A callback reloaded after the harness's injected gateway failure calls capture again:
    valid. A second call after any other answer stays a violation."""
    ops = Ops()
    ops.verify(7, status=502)
    ops.verify(7)
    obs = observation([], [state(7, gid="pay_7")], captures={"pay_7": 2}, accepted={"pay_7": 1})
    injected = replace(obs, gateway_injected={"pay_7": 1})
    assert gateway_capture_once(ops.ops, injected).valid is True
    assert gateway_capture_once(ops.ops, obs).valid is False
    twice = replace(obs, gateway_captures={"pay_7": 3}, gateway_injected={"pay_7": 1})
    assert gateway_capture_once(ops.ops, twice).valid is False
