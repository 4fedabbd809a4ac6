"""payrace/harness/gateway/controls.py: the same questions asked of a fake in this process and of
one over HTTP get the same answers."""

from __future__ import annotations

import httpx
import pytest

from payrace.harness.gateway.controls import LocalGateway, RemoteGateway
from payrace.harness.gateway.fake import FakeRazorpay, RazorpayError

AMOUNT = 50000


def test_remote_gateway_authorizes_and_reads_counters(
    gateway_url: str, fake_gateway: FakeRazorpay
) -> None:
    order = fake_gateway.create_order({"amount": AMOUNT, "currency": "INR"})
    gateway = RemoteGateway(gateway_url + "/")
    try:
        payment = gateway.authorize(order["id"])
        assert payment["order_id"] == order["id"] and payment["status"] == "authorized"
        assert payment["amount"] == AMOUNT
        assert payment["id"] not in gateway.counters()["captures"]
        fake_gateway.capture(payment["id"], {"amount": AMOUNT, "currency": "INR"})
        counters = gateway.counters()
        assert set(counters) == {
            "captures", "accepted", "rejected", "injected", "auto_captured", "timed_out",
            "captured",
        }  # fmt: skip
        assert counters["captures"][payment["id"]] == 1
        assert counters["accepted"][payment["id"]] == 1
        assert counters["captured"][payment["id"]] == 1
        with pytest.raises(httpx.HTTPStatusError):
            gateway.authorize("order_doesnotexist0")
    finally:
        gateway.close()


@pytest.mark.parametrize("remote", [False, True])
def test_the_gateways_automatic_capture_is_no_capture_call(
    gateway_url: str, fake_gateway: FakeRazorpay, remote: bool
) -> None:
    """What precedes Razorpay's payment.captured: the payment is captured at the gateway,
    and a merchant's capture call afterwards is told it already is."""
    order = fake_gateway.create_order({"amount": AMOUNT, "currency": "INR"})
    gateway = RemoteGateway(gateway_url) if remote else LocalGateway(fake_gateway)
    try:
        payment = gateway.authorize(order["id"])
        captured = gateway.auto_capture(payment["id"])
        assert (captured["status"], captured["captured"]) == ("captured", True)
        assert gateway.auto_capture(payment["id"])["status"] == "captured"  # repeatable
        counters = gateway.counters()
        assert payment["id"] not in counters["captures"]
        assert counters["auto_captured"][payment["id"]] == 1
        assert counters["captured"][payment["id"]] == 1
        assert fake_gateway.order(order["id"])["status"] == "paid"  # type: ignore[index]
        with pytest.raises(RazorpayError, match="already been captured"):
            fake_gateway.capture(payment["id"], {"amount": AMOUNT, "currency": "INR"})
    finally:
        if isinstance(gateway, RemoteGateway):
            gateway.close()


def test_local_gateway_authorizes_and_reads_counters(fake_gateway: FakeRazorpay) -> None:
    order = fake_gateway.create_order({"amount": AMOUNT, "currency": "INR"})
    gateway = LocalGateway(fake_gateway)
    payment = gateway.authorize(order["id"])
    assert payment["order_id"] == order["id"] and payment["status"] == "authorized"
    assert payment["id"] not in gateway.counters()["captures"]
    fake_gateway.capture(payment["id"], {"amount": AMOUNT, "currency": "INR"})
    assert gateway.counters()["captures"][payment["id"]] == 1
    assert gateway.counters()["accepted"][payment["id"]] == 1
    with pytest.raises(KeyError):
        gateway.authorize("order_doesnotexist0")


def test_local_and_remote_controls_turn_the_same_knobs_the_same_way(
    gateway_url: str, knobs: FakeRazorpay
) -> None:
    remote = RemoteGateway(gateway_url)
    try:
        for control in (LocalGateway(knobs), remote):
            before = control.knobs()
            turned = control.set_knobs(fail_rate=0.25, capture_latency_s=None)
            assert turned == {**before, "fail_rate": 0.25} == knobs.knobs() == control.knobs()
            control.set_knobs(**before)
            assert knobs.knobs() == before
        with pytest.raises(ValueError, match="fail_rate must be within"):
            LocalGateway(knobs).set_knobs(fail_rate=2.0)
        with pytest.raises(httpx.HTTPStatusError):
            remote.set_knobs(fail_rate=2.0)
        assert knobs.knobs()["fail_rate"] == 0.0
    finally:
        remote.close()


def test_both_controls_create_an_order_the_gateway_then_knows(
    gateway_url: str, fake_gateway: FakeRazorpay
) -> None:
    """A profile with `by = "payrace"` has payrace create the order at the fake gateway."""
    remote = RemoteGateway(gateway_url)
    try:
        created = [c.create_order(12_300, "INR") for c in (LocalGateway(fake_gateway), remote)]
    finally:
        remote.close()
    for order in created:
        assert order["id"].startswith("order_") and order["amount"] == 12_300
        assert fake_gateway.order(order["id"]) is not None


def test_local_and_remote_controls_arm_release_and_disarm_holds_the_same_way(
    gateway_url: str, fake_gateway: FakeRazorpay
) -> None:
    remote = RemoteGateway(gateway_url)
    try:
        for control in (LocalGateway(fake_gateway), remote):
            control.arm_holds("pay_held0000000000", 5.0)
            assert control.holds() == {"pay_held0000000000": 0} == fake_gateway.holds()
            hold = fake_gateway.hold_capture("pay_held0000000000")
            assert hold is not None and control.holds() == {"pay_held0000000000": 1}
            assert control.release_holds("pay_held0000000000") == 1 and hold.released
            assert fake_gateway.hold_capture("pay_held0000000000") is not None  # still armed
            assert control.disarm_holds("pay_held0000000000") == 1
            assert control.holds() == {} == fake_gateway.holds()
        with pytest.raises(ValueError, match="timeout_s must be within"):
            LocalGateway(fake_gateway).arm_holds("pay_held0000000000", 0.0)
        with pytest.raises(httpx.HTTPStatusError):
            remote.arm_holds("pay_held0000000000", 0.0)
    finally:
        remote.close()
