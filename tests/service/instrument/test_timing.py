"""service/instrument/timing.py: per-request timings and the Server-Timing header they become."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from payrace.service.instrument import probes, timing
from payrace.service.instrument.timing import Timings, parse_server_timing


def test_header_lists_lock_hold_db_gateway_in_milliseconds() -> None:
    t = Timings(lock_ms=1.5, hold_ms=250.25, db_ms=3.0, gateway_ms=200.0)

    assert t.header() == "lock;dur=1.500, hold;dur=250.250, db;dur=3.000, gateway;dur=200.000"


def test_header_leaves_out_what_was_not_measured_but_always_names_gateway() -> None:
    assert Timings().header() == "gateway;dur=0.000"
    assert Timings(lock_ms=0.0).header() == "lock;dur=0.000, gateway;dur=0.000"


@pytest.mark.parametrize(
    "values",
    [(1, 2, 3, 0), (0.0005, 0.0015, 2.5e-7, 1e9), (12.3456, 0.001, 7.0, 0.5), (-0.0, 1e-12, 3, 4)],
)
def test_header_of_a_first_attempt_formats_every_figure_as_each_entry_alone_would(
    values: tuple[float, float, float, float],
) -> None:
    lock, hold, db, gateway = values
    entries = [("lock", lock), ("hold", hold), ("db", db), ("gateway", gateway)]

    expected = ", ".join(f"{name};dur={value:.3f}" for name, value in entries)
    assert Timings(lock_ms=lock, hold_ms=hold, db_ms=db, gateway_ms=gateway).header() == expected


def test_header_names_the_retried_attempts_first() -> None:
    t = Timings(lock_ms=1, hold_ms=2, db_ms=3, gateway_ms=4, retried={"serialization": 2})

    assert t.header() == (
        "serialization;dur=2, lock;dur=1.000, hold;dur=2.000, db;dur=3.000, gateway;dur=4.000"
    )
    assert Timings(lock_ms=1, hold_ms=2, retried={}).header() == (
        "lock;dur=1.000, hold;dur=2.000, gateway;dur=0.000"
    )


def test_header_round_trips_through_the_parser() -> None:
    t = Timings(lock_ms=12.3456, hold_ms=0.001, db_ms=7.0, gateway_ms=0.5)

    assert parse_server_timing(t.header()) == {
        "lock": 12.346,
        "hold": 0.001,
        "db": 7.0,
        "gateway": 0.5,
    }


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        ("lock;dur=1.5, hold;dur=3", {"lock": 1.5, "hold": 3.0}),
        ('lock;desc="row lock";dur=2', {"lock": 2.0}),
        ("cache, db;dur=4", {"db": 4.0}),  # an entry without dur is skipped
        ("db;dur=abc, gateway;dur=1", {"gateway": 1.0}),  # so is one that is not a number
        (";dur=5, lock;dur=1", {"lock": 1.0}),  # and one without a name
        ("", {}),
        ("  lock ; dur=0.25  ", {"lock": 0.25}),
    ],
)
def test_parse_server_timing_reads_what_it_can_and_skips_the_rest(
    header: str, parsed: dict[str, float]
) -> None:
    assert parse_server_timing(header) == parsed


async def test_each_task_gets_its_own_timings() -> None:
    async def request(lock_ms: float) -> Timings:
        timing.begin()
        await asyncio.sleep(0)
        timing.current().lock_ms = lock_ms
        await asyncio.sleep(0)
        return timing.current()

    first, second = await asyncio.gather(request(1.0), request(2.0))

    assert (first.lock_ms, second.lock_ms) == (1.0, 2.0)
    assert first is not second


async def test_current_without_begin_starts_fresh_timings_and_keeps_them() -> None:
    async def fresh() -> tuple[Timings, Timings]:
        return timing.current(), timing.current()

    one, same = await asyncio.create_task(fresh(), context=contextvars.Context())

    assert one is same
    assert one == Timings()


class Holder:
    """A pause controller that holds every request at every point for `hold_s`."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s

    async def reached(self, point: str, probe: probes.ProbeContext) -> None:
        await asyncio.sleep(self.hold_s)

    def finished(self, probe: probes.ProbeContext) -> None:
        return None


async def attempt(*, gateway_s: float, paused_s: float, commit: bool) -> Timings:
    """One attempt: a 20 ms lock wait, then a pause and a gateway call while the lock is held."""
    t = timing.begin()
    with probes.controlled(Holder(paused_s), "attempt"):
        clock = timing.AttemptClock()
        with clock.waiting_for_lock():
            await asyncio.sleep(0.02)
        await probes.pause("status_checked")
        t.gateway_ms += gateway_s * 1000
        await asyncio.sleep(gateway_s)
        if commit:
            clock.committed()
        else:
            clock.lock_released()
    return t


async def test_attempt_clock_measures_the_lock_wait_and_the_hold_that_follows_it() -> None:
    t = await asyncio.create_task(
        attempt(gateway_s=0.05, paused_s=0.05, commit=False), context=contextvars.Context()
    )

    assert t.lock_ms is not None and 20 <= t.lock_ms < 150
    assert t.hold_ms is not None and 100 <= t.hold_ms < 1000
    assert t.db_ms is None  # a hold alone: nothing else is reported


async def test_attempt_clock_database_time_leaves_out_gateway_calls_and_pauses() -> None:
    t = await asyncio.create_task(
        attempt(gateway_s=0.1, paused_s=0.1, commit=True), context=contextvars.Context()
    )

    assert t.hold_ms is not None and t.hold_ms >= 200
    # Wall time ~220 ms, of which 100 ms gateway and 100 ms paused: ~20 ms remain.
    assert t.db_ms is not None and 15 <= t.db_ms < 150
