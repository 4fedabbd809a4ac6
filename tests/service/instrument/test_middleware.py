"""service/instrument/middleware.py over HTTP (ASGI): Server-Timing on capture answers, and
X-Payrace-Pause honoured only with probes on."""

from __future__ import annotations

import asyncio
import time

from conftest import Service, service_settings
from service_calls import assert_error, customer_pays, deliver, verify

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.infra.provider import Database
from payrace.service.instrument.timing import parse_server_timing

# -- Server-Timing -------------------------------------------------------------------------------


async def test_server_timing_on_capture_responses_names_lock_hold_db_gateway(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    captured = await verify(service, order, payment)
    repeat = await deliver(service, "payment.captured", payment)

    for response in (captured, repeat):
        timings = parse_server_timing(response.headers["server-timing"])
        assert set(timings) == {"lock", "hold", "db", "gateway"}
        assert all(value >= 0 for value in timings.values())
    assert parse_server_timing(captured.headers["server-timing"])["gateway"] > 0
    assert parse_server_timing(repeat.headers["server-timing"])["gateway"] == 0


async def test_server_timing_gateway_time_covers_an_injected_capture_latency(
    service: Service, knobs: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, knobs)
    knobs.set_knobs(capture_latency_s=0.1)

    started = time.perf_counter()
    response = await verify(service, order, payment)
    elapsed_ms = (time.perf_counter() - started) * 1000

    timings = parse_server_timing(response.headers["server-timing"])
    assert 100 <= timings["gateway"] <= elapsed_ms
    # The lock is held across the gateway call; the database time excludes it.
    assert timings["hold"] >= timings["gateway"]
    assert timings["db"] < timings["hold"]


# -- X-Payrace-Pause ------------------------------------------------------------------------------


async def test_pause_header_is_ignored_when_probes_are_off(
    service: Service, fake_gateway: FakeRazorpay
) -> None:
    order, payment = await customer_pays(service, fake_gateway)

    malformed = await service.client.get("/healthz", headers={"X-Payrace-Pause": "nonsense"})
    started = time.perf_counter()
    # Honoured, a group of two with one member would hold this request for the full timeout.
    lone = await verify(
        service, order, payment, headers={"X-Payrace-Pause": "group=off; timeout_ms=3000"}
    )
    elapsed = time.perf_counter() - started

    assert malformed.status_code == 200
    assert lone.status_code == 200
    assert elapsed < 1.0
    assert service.runtime.rendezvous == {}


async def test_malformed_pause_header_is_400_when_probes_are_on(
    pg: Database, gateway_url: str
) -> None:
    async with Service(service_settings(pg, gateway_url, payrace_probes=True)) as svc:
        response = await svc.client.get("/healthz", headers={"X-Payrace-Pause": "size=2"})

    error = assert_error(response, 400, "invalid_pause")
    assert "group" in error["message"]


async def test_pause_header_holds_a_lone_request_until_its_timeout_when_probes_are_on(
    pg: Database, gateway_url: str, fake_gateway: FakeRazorpay
) -> None:
    async with Service(service_settings(pg, gateway_url, payrace_probes=True)) as svc:
        order, payment = await customer_pays(svc, fake_gateway)
        started = time.perf_counter()
        response = await verify(
            svc, order, payment, headers={"X-Payrace-Pause": "group=lone; size=2; timeout_ms=250"}
        )
        elapsed = time.perf_counter() - started

    assert response.status_code == 200
    assert response.json()["status"] == "captured"
    assert 0.25 <= elapsed < 2.0


async def test_a_pause_group_that_never_filled_is_forgotten_after_its_timeout(
    pg: Database, gateway_url: str, fake_gateway: FakeRazorpay
) -> None:
    header = {"X-Payrace-Pause": "group=abandoned; size=2; timeout_ms=100"}
    async with Service(service_settings(pg, gateway_url, payrace_probes=True)) as svc:
        order, payment = await customer_pays(svc, fake_gateway)
        await verify(svc, order, payment, headers=header)
        assert "abandoned" in svc.runtime.rendezvous  # one member of two: never done
        await asyncio.sleep(1.3)  # past 2 x timeout + 1 s
        await svc.client.get("/healthz", headers={"X-Payrace-Pause": "group=other; size=1"})
        assert "abandoned" not in svc.runtime.rendezvous
