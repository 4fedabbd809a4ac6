"""payrace/harness/gateway/fake.py: orders, payments and capture counters as Razorpay keeps them,
driven the way the service drives them: the real SDK over real HTTP; the fault knobs."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import pytest
import razorpay
from razorpay.errors import BadRequestError, GatewayError, ServerError

from payrace.harness.gateway.fake import FakeRazorpay, Knobs
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys

KEYS = GatewayKeys()
ORDER_ID = re.compile(r"^order_[A-Za-z0-9]{14}$")
PAY_ID = re.compile(r"^pay_[A-Za-z0-9]{14}$")
AuthorizedOrder = Callable[[], tuple[dict[str, Any], str]]


def test_order_is_created_and_fetched_in_razorpays_shape(client: Any) -> None:
    order = client.order.create({"amount": 50000, "currency": "INR", "receipt": "rcpt-1"})

    assert ORDER_ID.match(order["id"])
    assert order["entity"] == "order"
    assert (order["amount"], order["amount_paid"], order["amount_due"]) == (50000, 0, 50000)
    assert (order["status"], order["attempts"], order["receipt"]) == ("created", 0, "rcpt-1")
    assert client.order.fetch(order["id"]) == order


def test_payment_is_captured_once_and_a_second_capture_is_rejected_and_counted(
    client: Any, fake: FakeRazorpay, authorized_order: AuthorizedOrder
) -> None:
    order, payment_id = authorized_order()
    assert PAY_ID.match(payment_id)
    assert client.order.fetch(order["id"])["status"] == "attempted"
    assert client.payment.fetch(payment_id)["status"] == "authorized"

    captured = client.payment.capture(payment_id, 50000, {"currency": "INR"})
    assert (captured["status"], captured["captured"]) == ("captured", True)
    assert fake.capture_calls(payment_id) == 1

    with pytest.raises(BadRequestError, match=r"^This payment has already been captured$"):
        client.payment.capture(payment_id, 50000, {"currency": "INR"})
    assert fake.capture_calls(payment_id) == 2
    assert fake.counters()["accepted"] == {payment_id: 1}
    assert fake.counters()["rejected"] == {payment_id: 1}
    paid = client.order.fetch(order["id"])
    assert (paid["status"], paid["amount_paid"], paid["amount_due"]) == ("paid", 50000, 0)


def test_capture_with_another_amount_is_rejected(
    client: Any, fake: FakeRazorpay, authorized_order: AuthorizedOrder
) -> None:
    _, payment_id = authorized_order()

    with pytest.raises(BadRequestError, match="Capture amount must be equal to the amount"):
        client.payment.capture(payment_id, 49999, {"currency": "INR"})
    assert fake.payment(payment_id)["status"] == "authorized"  # type: ignore[index]


def test_concurrent_captures_of_one_payment_accept_exactly_one(
    server: GatewayServer, fake: FakeRazorpay, authorized_order: AuthorizedOrder
) -> None:
    # The slow capture keeps all calls in flight together, as the racing service paths would.
    _, payment_id = authorized_order()
    fake.set_knobs(capture_latency_s=0.2)
    outcomes: list[str] = []

    def capture() -> None:
        own = razorpay.Client(auth=(KEYS.key_id, KEYS.key_secret), base_url=server.url)
        try:
            own.payment.capture(payment_id, 50000, {"currency": "INR"})
            outcomes.append("ok")
        except BadRequestError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=capture) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes) == ["This payment has already been captured"] * 3 + ["ok"]
    assert fake.counters()["captures"] == {payment_id: 4}
    assert fake.counters()["accepted"] == {payment_id: 1}


def test_unknown_ids_are_bad_requests_and_unknown_captures_are_counted(
    client: Any, fake: FakeRazorpay
) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: client.order.fetch("order_00000000000000"),
        lambda: client.payment.fetch("pay_00000000000000"),
        lambda: client.payment.capture("pay_00000000000000", 100, {"currency": "INR"}),
    ]
    for call in calls:
        with pytest.raises(BadRequestError, match=r"^The id provided does not exist$"):
            call()
    assert fake.capture_calls("pay_00000000000000") == 1


def test_injected_failures_raise_server_errors_and_are_counted(
    client: Any, fake: FakeRazorpay, authorized_order: AuthorizedOrder
) -> None:
    _, payment_id = authorized_order()
    fake.set_knobs(fail_rate=1.0)

    for _ in range(3):
        with pytest.raises((ServerError, GatewayError)):
            client.payment.capture(payment_id, 50000, {"currency": "INR"})
    counters = fake.counters()
    assert counters["captures"] == counters["rejected"] == counters["injected"] == {payment_id: 3}
    assert fake.payment(payment_id)["status"] == "authorized"  # type: ignore[index]

    fake.set_knobs(fail_rate=0.0)
    assert client.payment.capture(payment_id, 50000, {"currency": "INR"})["captured"] is True
    assert fake.capture_calls(payment_id) == 4


def test_after_capture_hooks_run_once_captured_and_before_the_answer(
    client: Any, fake: FakeRazorpay, authorized_order: AuthorizedOrder
) -> None:
    """kill-after-capture's moment: the money is taken, the caller not yet told."""
    _, payment_id = authorized_order()
    seen: list[tuple[str, str, int]] = []

    def hook(pid: str) -> None:
        state = fake.payment(pid)
        assert state is not None
        seen.append((pid, state["status"], fake.capture_calls(pid)))

    fake.add_after_capture(hook)
    try:
        client.payment.capture(payment_id, 50000, {"currency": "INR"})
        with pytest.raises(BadRequestError):  # a rejected capture took no money: no hook
            client.payment.capture(payment_id, 50000, {"currency": "INR"})
    finally:
        fake.remove_after_capture(hook)
    assert seen == [(payment_id, "captured", 1)]
    assert fake.after_capture() == []


def test_each_injected_failure_is_told_to_the_fault_hooks(
    client: Any, fake: FakeRazorpay, authorized_order: AuthorizedOrder
) -> None:
    _, payment_id = authorized_order()
    told: list[tuple[str, str, int]] = []

    def hook(fault: str, pid: str, status: int) -> None:
        told.append((fault, pid, status))

    fake.add_on_fault(hook)
    try:
        fake.set_knobs(fail_rate=1.0)
        with pytest.raises((ServerError, GatewayError)):
            client.payment.capture(payment_id, 50000, {"currency": "INR"})
        fake.set_knobs(fail_rate=0.0, timeout_rate=1.0)
        with pytest.raises((ServerError, GatewayError)):
            client.payment.capture(payment_id, 50000, {"currency": "INR"})
        fake.set_knobs(timeout_rate=0.0)
        with pytest.raises(BadRequestError):  # already captured: Razorpay's answer, no fault
            client.payment.capture(payment_id, 50000, {"currency": "INR"})
    finally:
        fake.remove_on_fault(hook)
    assert [(f, p) for f, p, _ in told] == [
        ("gateway-errors", payment_id),
        ("gateway-timeout", payment_id),
    ]
    assert told[0][2] in (502, 503) and told[1][2] == 504


def test_injected_failures_follow_the_seed(client: Any, fake: FakeRazorpay) -> None:
    def pattern() -> list[bool]:
        fake.set_knobs(fail_rate=0.5)
        failed = []
        for _ in range(24):
            try:
                client.payment.capture("pay_00000000000000", 100, {"currency": "INR"})
            except ServerError:
                failed.append(True)
            except BadRequestError:
                failed.append(False)
        return failed

    first = pattern()
    fake.reset()
    assert pattern() == first
    assert 0 < sum(first) < len(first)


def test_knobs_change_only_what_is_named_and_refuse_what_is_not_a_knob_value() -> None:
    knobs = Knobs(latency_s=0.1)
    assert knobs.changed({"fail_rate": 0.5, "latency_s": None}) == Knobs(0.1, 0.0, 0.5)
    assert knobs.changed({"capture_latency_s": "0.25"}).capture_latency_s == 0.25
    for changes, message in (
        ({"fail_rate": 2}, "fail_rate must be within"),
        ({"latency_s": -1}, "latencies must be >= 0"),
        ({"fail_rate": "often"}, "fail_rate must be a number"),
        ({"fail_rate": [0.5]}, "fail_rate must be a number"),
        ({"failrate": 0.5}, "unknown knob"),
    ):
        with pytest.raises(ValueError, match=message):
            knobs.changed(changes)
    assert knobs.as_dict() == {
        "latency_s": 0.1,
        "capture_latency_s": 0.0,
        "fail_rate": 0.0,
        "timeout_rate": 0.0,
    }


def test_reset_restores_the_knobs_the_fake_was_built_with() -> None:
    fake = FakeRazorpay(KEYS, knobs=Knobs(capture_latency_s=0.05))
    assert fake.set_knobs(fail_rate=1.0, capture_latency_s=None)["capture_latency_s"] == 0.05
    assert fake.delay_s(capture=True) == 0.05 and fake.delay_s(capture=False) == 0.0
    fake.reset()
    assert fake.knobs() == {
        "latency_s": 0.0,
        "capture_latency_s": 0.05,
        "fail_rate": 0.0,
        "timeout_rate": 0.0,
    }


# -- the capture barrier ------------------------------------------------------------------------


def test_an_armed_payment_holds_its_capture_calls_until_released(fake: FakeRazorpay) -> None:
    assert fake.hold_capture("pay_notarmed0000000") is None  # unarmed: the call goes on
    fake.arm_holds("pay_armed000000000", timeout_s=5.0)
    first, second = (fake.hold_capture("pay_armed000000000") for _ in range(2))
    assert first is not None and second is not None and first.timeout_s == 5.0
    assert fake.holds() == {"pay_armed000000000": 2}
    woken: list[str] = []
    first.on_release(lambda: woken.append("first"))

    assert fake.release_holds("pay_armed000000000") == 2
    assert woken == ["first"] and first.released and second.released
    second.on_release(lambda: woken.append("late"))  # already released: called at once
    assert woken == ["first", "late"]
    # Still armed: the next call is held again, until the payment is disarmed.
    third = fake.hold_capture("pay_armed000000000")
    assert third is not None and fake.holds() == {"pay_armed000000000": 1}
    assert fake.disarm_holds("pay_armed000000000") == 1 and third.released
    assert fake.holds() == {} and fake.hold_capture("pay_armed000000000") is None
    assert fake.hold_timeouts == 0


def test_a_hold_that_times_out_is_counted_and_reset_releases_every_hold(
    fake: FakeRazorpay,
) -> None:
    fake.arm_holds("pay_a0000000000000", timeout_s=1.0)
    hold = fake.hold_capture("pay_a0000000000000")
    assert hold is not None
    fake.leave_hold(hold, timed_out=True)
    assert fake.hold_timeouts == 1 and fake.holds() == {"pay_a0000000000000": 0}
    other = fake.hold_capture("pay_a0000000000000")
    assert other is not None
    fake.reset()
    assert other.released and fake.holds() == {} and fake.hold_timeouts == 0
    for bad in (0.0, -1.0, 601.0):
        with pytest.raises(ValueError, match="timeout_s must be within"):
            fake.arm_holds("pay_a0000000000000", timeout_s=bad)
