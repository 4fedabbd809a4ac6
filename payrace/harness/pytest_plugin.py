"""pytest plugin (entry point `pytest11: payrace`): race tests inside a team's own suite.

    --payrace-dsn / PAYRACE_DSN   the PostgreSQL server races create their databases
                       on (default: Docker, then an embedded server, started once per session)
    --payrace-reports DIR   where each race's reports go (default: pytest's basetemp/payrace)
    race               fixture: race(strategy=..., trials=..., mode=..., gate=..., ...) with
                       the keywords of `payrace run`'s flags (payrace.testing.race); returns a
                       RaceResult; in a plain `def` test
    arace              the same, awaitable, for `async def` tests (pytest-asyncio, anyio):
                       `result = await arace(strategy="naive")`
    payrace_postgres   session fixture: that server (harness.infra.provider.Database)
    RaceResult         payrace.testing.RaceResult; .assert_exactly_once() is the one
                       assertion: invariants and gates, failing with the report's path

For the seed's own test — the callback and the webhook gathered by the test itself — use
payrace.testing.capture_race (no fixture needed; it shares this session's server).

race()'s keywords are `payrace run`'s flags (profile, target, target_dsn, gateway_url, expect,
trials, mode, event, gate, ...), so a command that works on a terminal moves into a test
unchanged. A mistake in them (a profile key, an option a running target cannot honour, a
route it does not serve) fails the test with payrace's message, not a traceback.

Examples (tests/harness/test_pytest_plugin.py runs them):

    def test_capture_is_exactly_once(race):
        race(strategy="for_update", trials=50, mode="forced").assert_exactly_once()

    async def test_capture_is_exactly_once_async(arace):
        (await arace(strategy="for_update", trials=50)).assert_exactly_once()

    def test_our_shop_captures_exactly_once(race):
        race(profile="shop.toml", target_dsn=os.environ["SHOP_DSN"],
             gateway_url="http://127.0.0.1:9411", trials=50).assert_exactly_once()
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# pytest loads this module in every session of every project payrace is installed into, so
# it imports nothing but pytest and payrace.testing (itself only the standard library) at
# start: the provider, the runner (FastAPI, SQLAlchemy, the razorpay SDK) and the reports
# load the first time a test races (tests/harness/test_pytest_plugin.py checks).
from payrace import testing
from payrace.testing import RaceResult

if TYPE_CHECKING:
    from payrace.harness.infra.provider import Database

__all__ = ["RaceResult"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("payrace")
    group.addoption(
        "--payrace-dsn",
        default=None,
        help="PostgreSQL server for race tests (default: PAYRACE_DSN, then Docker, "
        "then an embedded server)",
    )
    group.addoption(
        "--payrace-reports",
        default=None,
        help="write each race's reports (summary.json, junit.xml, report.html) under this dir",
    )


def pytest_configure(config: pytest.Config) -> None:
    reports = config.getoption("--payrace-reports")

    def basetemp() -> Path:
        # Created only when a race writes its first report; pytest keeps the last few.
        factory = getattr(config, "_tmp_path_factory", None)  # None under `-p no:tmpdir`
        if factory is None:
            return Path("reports")  # the CLI's default
        return Path(factory.getbasetemp()) / "payrace"

    testing.configure(
        dsn=config.getoption("--payrace-dsn"), reports=Path(reports) if reports else basetemp
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    testing.close_servers()  # the session's server, if a race started one


@pytest.fixture(scope="session")
def payrace_postgres(request: pytest.FixtureRequest) -> Database:
    return testing.server(request.config.getoption("--payrace-dsn"))


@pytest.fixture
def race() -> Callable[..., RaceResult]:
    """`payrace run` in a plain test: race(strategy="naive", trials=20, gate=[...])."""

    @functools.wraps(testing.race)
    def runner(*args: Any, **flags: Any) -> RaceResult:
        try:
            asyncio.get_running_loop()
            in_a_loop = True
        except RuntimeError:
            in_a_loop = False
        if not in_a_loop:  # outside the handler: a failure is the message alone, unchained
            from payrace.harness.infra import loop  # here: the plugin loads nothing at start

            return loop.run(testing.race(*args, **flags))
        pytest.fail(
            "payrace: race() runs its own event loop, and this test already runs in one: in "
            "an `async def` test use the `arace` fixture: `result = await arace(...)`",
            pytrace=False,
        )

    return runner


@pytest.fixture
def arace() -> Callable[..., Awaitable[RaceResult]]:
    """`payrace run` in an async test: `result = await arace(strategy="naive")`. A plain
    fixture handing out a coroutine function: any async plugin's loop runs it."""
    return testing.race
