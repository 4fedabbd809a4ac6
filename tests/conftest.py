"""Shared fixtures: one embedded PostgreSQL for the session (the default route, as a user's
run would take), one fake Razorpay on loopback, and in-process services per strategy."""

from __future__ import annotations

import compileall
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.provider import Database
from payrace.service.app import Runtime, create_app
from payrace.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# Bytecode is kept even where PYTHONDONTWRITEBYTECODE is set: without it every process the
# suite starts (services, CLIs, Locust) compiles payrace from source again, and every pytest
# worker parses and rewrites each test module again when it collects the suite (9.9 s of CPU
# instead of 5.0 on a 2-core machine). The variable only stops writing bytecode, not reading.
sys.dont_write_bytecode = False


def pytest_configure(config: pytest.Config) -> None:
    """Compile what the suite's processes import (payrace, the examples, tools) before any
    worker starts, once: later runs find it up to date. Errors are not reported here; an
    import reports them."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has done it
        return
    for folder in ("payrace", "examples", "tools", "tests"):
        compileall.compile_dir(ROOT / folder, quiet=2)


# What each test took in one run of the suite (tools/suite_durations.py writes it); a test not
# in it counts as this much.
DURATIONS = ROOT / "tests" / "durations.json"
UNKNOWN_S = 0.05


@pytest.hookimpl(trylast=True)  # after -m / -k deselect: only what runs is weighed
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The test files heaviest first, each file's tests in their own order. pytest-xdist
    (--dist loadfile --no-loadscope-reorder, the Makefile's) hands the files to the workers
    in this order: the long ones start first and the short ones fill in behind them, instead
    of xdist's own order (most tests first), which left the long files of few tests to start
    last and one worker running alone at the end. Only the order changes, never what runs."""
    try:
        known: dict[str, float] = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return
    weight: dict[str, float] = {}
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        path = item.nodeid.split("::", 1)[0]
        weight[path] = weight.get(path, 0.0) + known.get(item.nodeid, UNKNOWN_S)
        first.setdefault(path, index)
    # sort() is stable: within a file the collection's order stays.
    items.sort(
        key=lambda it: (-weight[it.nodeid.split("::", 1)[0]], first[it.nodeid.split("::", 1)[0]])
    )


@pytest.fixture(scope="session")
def pg(payrace_postgres: Database) -> Database:
    """The plugin's session PostgreSQL: the default route, as a user's run would take."""
    return payrace_postgres


@pytest.fixture(scope="session")
def fake_gateway() -> Iterator[FakeRazorpay]:
    yield FakeRazorpay(GatewayKeys())


@pytest.fixture
def knobs(fake_gateway: FakeRazorpay) -> Iterator[FakeRazorpay]:
    """The shared fake gateway, its latency / failure knobs restored after the test."""
    before = fake_gateway.knobs()
    try:
        yield fake_gateway
    finally:
        fake_gateway.set_knobs(**before)


@pytest.fixture(scope="session")
def gateway_url(fake_gateway: FakeRazorpay) -> Iterator[str]:
    with GatewayServer(fake_gateway) as server:
        yield server.url


def service_settings(pg: Database, gateway_url: str, **overrides: object) -> Settings:
    keys = GatewayKeys()
    values: dict[str, object] = {
        "database_url": pg.asyncpg_url(),
        "razorpay_key_id": keys.key_id,
        "razorpay_key_secret": keys.key_secret,
        "razorpay_webhook_secret": keys.webhook_secret,
        "razorpay_base_url": gateway_url,
        "capture_strategy": "for_update",
        # No background sweeper in tests: the database is shared, and a sweep is asked for.
        "reconcile_interval_s": 0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


class Service:
    """An in-process reference service and an httpx client talking ASGI to it."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.runtime: Runtime = self.app.state.runtime
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://service"
        )

    async def __aenter__(self) -> Service:
        await self.runtime.startup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()
        await self.runtime.shutdown()


@pytest.fixture
async def service(pg: Database, gateway_url: str) -> AsyncIterator[Service]:
    async with Service(service_settings(pg, gateway_url)) as svc:
        yield svc


@pytest.fixture
async def naive_service(pg: Database, gateway_url: str) -> AsyncIterator[Service]:
    async with Service(service_settings(pg, gateway_url, capture_strategy="naive")) as svc:
        yield svc
