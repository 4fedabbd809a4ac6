"""Fixtures of the explorer's database tests (test_engine.py, test_plan.py).

explore_db  a database of its own per test module, on the session's PostgreSQL
gateway     a fake gateway of its own per test module, with its server's URL
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.provider import Database, provide_postgres


@pytest.fixture(scope="module")
def explore_db(pg: Database) -> Iterator[Database]:
    """A database of its own: the oracle's deadlock reading must not see other tests."""
    with provide_postgres(pg.url, announce=lambda line: None) as db:
        yield db


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[FakeRazorpay, str]]:
    """A fake gateway of its own, so its latency knobs can be turned here."""
    fake = FakeRazorpay(GatewayKeys())
    with GatewayServer(fake) as server:
        yield fake, server.url
