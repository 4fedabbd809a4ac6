"""service/instrument/probes.py: pause points, the Rendezvous controller, the X-Payrace-Pause
header."""

from __future__ import annotations

import asyncio
import time

import pytest

from payrace.service.instrument import probes
from payrace.service.instrument.probes import (
    POINTS,
    PauseHeaderError,
    PauseRequest,
    ProbeContext,
    Rendezvous,
    parse_pause_header,
)


async def never_blocked(pid: int) -> bool:
    return False


async def always_blocked(pid: int) -> bool:
    return True


class Recorder:
    """A controller that only remembers what it was told."""

    def __init__(self) -> None:
        self.reached_points: list[tuple[str, str]] = []
        self.finished_labels: list[str] = []

    async def reached(self, point: str, probe: ProbeContext) -> None:
        self.reached_points.append((probe.label, point))

    def finished(self, probe: ProbeContext) -> None:
        self.finished_labels.append(probe.label)


# -- parse_pause_header ---------------------------------------------------------------------


def test_pause_header_with_only_a_group_takes_the_defaults() -> None:
    assert parse_pause_header("group=g1") == PauseRequest(
        group="g1", size=2, point="payment_read", timeout_ms=5000
    )


def test_pause_header_reads_every_field_and_tolerates_spaces_and_empty_parts() -> None:
    parsed = parse_pause_header(" group = run-7 ; size=3;; point=before_commit ; timeout_ms=250 ;")

    assert parsed == PauseRequest(group="run-7", size=3, point="before_commit", timeout_ms=250)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "group=<id> is required"),
        ("size=2", "group=<id> is required"),
        ("group=", "group=<id> is required"),
        ("group=g; size", "expected key=value"),
        ("group=g; colour=blue", "unknown field(s) colour"),
        ("group=g; size=two", "must be integers"),
        ("group=g; timeout_ms=1.5", "must be integers"),
        ("group=g; size=0", "size must be 1..64"),
        ("group=g; size=65", "size must be 1..64"),
        ("group=g; timeout_ms=0", "timeout_ms 1..60000"),
        ("group=g; timeout_ms=60001", "timeout_ms 1..60000"),
        ("group=g; point=somewhere", "unknown point 'somewhere'"),
    ],
)
def test_malformed_pause_header_raises_a_message_saying_what_is_wrong(
    value: str, says: str
) -> None:
    with pytest.raises(PauseHeaderError) as raised:
        parse_pause_header(value)

    assert says in str(raised.value)
    assert str(raised.value).startswith("X-Payrace-Pause: ")
    assert isinstance(raised.value, ValueError)


# -- pause(), controlled(), finish() ----------------------------------------------------------


async def test_pause_without_a_controller_is_a_no_op() -> None:
    assert not probes.active()
    assert probes.current_probe() is None

    await probes.pause("payment_read", "pending")
    probes.finish()
    probes.set_backend_pid(123)

    assert probes.current_probe() is None


async def test_controlled_reports_points_in_order_and_finishes_once() -> None:
    recorder = Recorder()

    with probes.controlled(recorder, "req-1") as probe:
        assert probes.active()
        assert probes.current_probe() is probe
        probes.set_backend_pid(4242)
        await probes.pause("txn_begun")
        await probes.pause("payment_read", "pending")
        probes.finish()
        probes.finish()

    assert recorder.reached_points == [("req-1", "txn_begun"), ("req-1", "payment_read")]
    assert recorder.finished_labels == ["req-1"]
    assert probe.backend_pid == 4242
    assert [(point, detail) for point, _, detail in probe.points] == [
        ("txn_begun", None),
        ("payment_read", "pending"),
    ]
    assert probe.points[0][1] <= probe.points[1][1]
    assert not probes.active()
    assert probes.current_probe() is None


async def test_controlled_tells_the_controller_a_request_ended_without_reaching_finish() -> None:
    recorder = Recorder()

    with pytest.raises(RuntimeError), probes.controlled(recorder, "rejected") as probe:
        raise RuntimeError("rejected before the capture path")

    assert probe.finished
    assert recorder.finished_labels == ["rejected"]
    assert not probes.active()


async def test_pause_accumulates_the_time_a_controller_held_the_request() -> None:
    class Sleeper(Recorder):
        async def reached(self, point: str, probe: ProbeContext) -> None:
            await asyncio.sleep(0.05)

    with probes.controlled(Sleeper(), "slow") as probe:
        await probes.pause("txn_begun")
        await probes.pause("payment_read")

    assert 0.1 <= probe.paused_s < 1.0


async def test_controllers_of_concurrent_tasks_do_not_leak_into_each_other() -> None:
    first, second = Recorder(), Recorder()

    async def request(controller: Recorder, label: str) -> None:
        with probes.controlled(controller, label):
            await asyncio.sleep(0)
            await probes.pause("payment_read")

    await asyncio.gather(request(first, "a"), request(second, "b"))

    assert first.reached_points == [("a", "payment_read")]
    assert second.reached_points == [("b", "payment_read")]


# -- Rendezvous ---------------------------------------------------------------------------------


def test_rendezvous_rejects_an_empty_group_and_unknown_points() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        Rendezvous(0, never_blocked)
    with pytest.raises(ValueError, match="unknown pause point 'nowhere'"):
        Rendezvous(2, never_blocked, point="nowhere")


def test_pause_points_are_listed_in_the_order_a_capture_passes_them() -> None:
    assert POINTS[0] == "txn_begun"
    assert POINTS[-1] == "before_commit"
    assert POINTS.index("payment_read") < POINTS.index("status_checked")
    assert POINTS.index("payment_written") < POINTS.index("invoice_written")
    assert POINTS.index("invoice_written") < POINTS.index("order_written")


async def test_rendezvous_releases_members_only_when_all_have_arrived() -> None:
    rendezvous = Rendezvous(2, never_blocked, timeout_s=2.0)
    released: dict[str, float] = {}

    async def member(label: str, delay: float) -> ProbeContext:
        with probes.controlled(rendezvous, label) as probe:
            await asyncio.sleep(delay)
            await probes.pause("payment_read")
            released[label] = time.monotonic()
        return probe

    started = time.monotonic()
    early, late = await asyncio.gather(member("early", 0.0), member("late", 0.1))

    assert released["early"] - started >= 0.1  # held until the late one arrived
    assert abs(released["early"] - released["late"]) < 0.05
    assert not early.timed_out and not late.timed_out
    assert rendezvous.timeouts == 0
    assert rendezvous.done()


async def test_rendezvous_ignores_points_other_than_its_own() -> None:
    rendezvous = Rendezvous(2, never_blocked, point="before_commit", timeout_s=2.0)

    with probes.controlled(rendezvous, "alone") as probe:
        started = time.monotonic()
        await probes.pause("payment_read")
        await probes.pause("status_checked")

    assert time.monotonic() - started < 0.05
    assert not probe.timed_out


async def test_rendezvous_gives_up_after_its_timeout_and_says_so() -> None:
    rendezvous = Rendezvous(2, never_blocked, timeout_s=0.1)

    with probes.controlled(rendezvous, "alone") as probe:
        started = time.monotonic()
        await probes.pause("payment_read")
        waited = time.monotonic() - started

    assert probe.timed_out
    assert rendezvous.timeouts == 1
    assert 0.1 <= waited < 1.0
    assert not rendezvous.done()  # the second member never came


async def test_rendezvous_releases_a_member_whose_partner_waits_for_a_lock() -> None:
    # Under FOR UPDATE the partner cannot reach the point until this member commits: waiting
    # for it would hang. PostgreSQL says it is blocked, so this member goes on.
    rendezvous = Rendezvous(2, always_blocked, timeout_s=2.0)
    # The partner registers by reaching an earlier point, then queues for the row lock.
    await rendezvous.reached("txn_begun", ProbeContext(label="partner", backend_pid=99))

    with probes.controlled(rendezvous, "holder") as probe:
        started = time.monotonic()
        await probes.pause("payment_read")

    assert time.monotonic() - started < 0.5
    assert not probe.timed_out


async def test_rendezvous_keeps_waiting_for_a_partner_whose_backend_is_unknown() -> None:
    rendezvous = Rendezvous(2, always_blocked, timeout_s=0.1)
    await rendezvous.reached("txn_begun", ProbeContext(label="no pid yet"))

    with probes.controlled(rendezvous, "holder") as probe:
        await probes.pause("payment_read")

    assert probe.timed_out


async def test_rendezvous_releases_a_member_whose_partner_already_finished() -> None:
    rendezvous = Rendezvous(2, never_blocked, timeout_s=2.0)
    with probes.controlled(rendezvous, "rejected early"):
        pass

    with probes.controlled(rendezvous, "survivor") as probe:
        started = time.monotonic()
        await probes.pause("payment_read")

    assert time.monotonic() - started < 0.5
    assert not probe.timed_out
    assert rendezvous.done()


async def test_rendezvous_asks_postgres_about_the_partners_backend_pid() -> None:
    asked: list[int] = []

    async def is_blocked(pid: int) -> bool:
        asked.append(pid)
        return True

    rendezvous = Rendezvous(2, is_blocked, timeout_s=2.0)
    await rendezvous.reached("txn_begun", ProbeContext(label="partner", backend_pid=31337))
    with probes.controlled(rendezvous, "holder"):
        probes.set_backend_pid(1)
        await probes.pause("payment_read")

    assert asked and set(asked) == {31337}
