"""pytest plugin (entry point `pytest11: payrace`): race tests inside a team's own suite.

    --payrace-dsn / PAYRACE_DSN   use that server instead of the default provider
    payrace_postgres   session fixture: a provisioned PostgreSQL (harness.infra.provider.Database)
    race               fixture: race(strategy=..., trials=..., mode=..., **RunConfig fields)
                       runs trials of the reference service on a fresh database of that
                       server, or race(profile=..., target_dsn=..., gateway_url=...) of a
                       running service (docs/profile.md); returns a RaceResult
    RaceResult         .valid, .violating_trials, .summary; .assert_exactly_once() fails the
                       test with the first violating schedule drawn as a timeline

race()'s keywords are `payrace run`'s flags (profile, target, target_dsn, gateway_url, expect,
trials, mode, ...), so a command that works on a terminal moves into a test unchanged. A
mistake in them (a profile key, an option a running target cannot honour, a route it does not
serve) fails the test with payrace's message, not a traceback.

Examples (tests/harness/test_pytest_plugin.py runs them):

    def test_capture_is_exactly_once(race):
        race(strategy="for_update", trials=50, mode="forced").assert_exactly_once()

    def test_our_shop_captures_exactly_once(race):
        race(profile="shop.toml", target_dsn=os.environ["SHOP_DSN"],
             gateway_url="http://127.0.0.1:9411", trials=50).assert_exactly_once()
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# pytest loads this module in every session of every project payrace is installed into, so
# it imports nothing but pytest at start: the provider, the runner (FastAPI, SQLAlchemy, the
# razorpay SDK) and the reports load inside the fixtures, the first time a test uses one.
if TYPE_CHECKING:
    from payrace.harness.infra.provider import Database


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


@dataclass(frozen=True)
class RaceResult:
    summary: dict[str, Any]

    def strategy(self) -> dict[str, Any]:
        result: dict[str, Any] = next(iter(self.summary["strategies"].values()))
        return result

    @property
    def valid(self) -> bool | str:
        return self.strategy()["valid"]  # type: ignore[no-any-return]

    @property
    def violating_trials(self) -> int:
        return int(self.strategy()["violating_trials"])

    def explain(self) -> str:
        result = self.strategy()
        failed = {n: c["count"] for n, c in result["checks"].items() if c["valid"] is not True}
        lines = [f"valid={result['valid']}, violating trials {result['violating_trials']}/"
                 f"{result['trials']}, failed checks {failed}"]  # fmt: skip
        from payrace.harness.reports.summary import deadlock_line, deadlock_lines
        from payrace.harness.reports.timeline import TimelineEvent, render_text

        if deadlocks := deadlock_line(result):
            lines.append(deadlocks)
        first = result.get("first_violation")
        if first:
            events = [TimelineEvent(**e) for e in first["timeline"]]
            lines += [f"first violating trial {first['trial']}:", render_text(events)]
            lines += deadlock_lines(first)
        return "\n".join(lines)

    def assert_exactly_once(self) -> None:
        if self.valid is not True:
            pytest.fail("capture was not exactly once:\n" + self.explain(), pytrace=False)


@pytest.fixture(scope="session")
def payrace_postgres(request: pytest.FixtureRequest) -> Iterator[Database]:
    from payrace.harness.infra.provider import provide_postgres

    with provide_postgres(request.config.getoption("--payrace-dsn")) as db:
        yield db


@pytest.fixture
def race(request: pytest.FixtureRequest) -> Callable[..., RaceResult]:
    from payrace.harness.errors import UsageError
    from payrace.harness.runner.config import Gate, RunConfig
    from payrace.harness.runner.run import run, write_history

    reports = request.config.getoption("--payrace-reports")

    def runner(
        strategy: str | None = None,
        *,
        profile: str | os.PathLike[str] | None = None,
        target: str = "inproc",
        target_dsn: str | None = None,
        gateway_url: str | None = None,
        expect: str | None = None,
        **fields: Any,
    ) -> RaceResult:
        gates = [Gate.parse(g) if isinstance(g, str) else g for g in fields.pop("gates", [])]
        running = profile is not None or target not in ("inproc", "http")
        # A running target has its own database: PostgreSQL is provisioned only for the
        # reference service payrace starts, and only the first time a test needs it.
        dsn = None if running else request.getfixturevalue("payrace_postgres").url
        config = RunConfig(
            strategies=[strategy] if strategy else [],
            profile=Path(profile) if profile is not None else None,
            target=target,
            target_dsn=target_dsn,
            gateway_url=gateway_url,
            expect=expect,
            dsn=dsn,
            gates=gates,
            command=f"pytest {request.node.nodeid}",
            **fields,
        )
        if reports:
            config.out_dir = Path(reports)
        mistake: str | None = None
        try:
            summary = asyncio.run(run(config, announce=lambda line: None))
        except UsageError as exc:
            mistake = f"payrace: {exc}"
        if mistake is not None:  # outside the handler: the message alone, no chained traceback
            pytest.fail(mistake, pytrace=False)
        if reports:
            from payrace.harness.reports.writers import write_all

            out = config.out_dir / summary["run_id"]
            write_history(summary, out / "history.jsonl")
            write_all(summary, out)
        else:
            write_history_discard(summary)
        return RaceResult(summary)

    return runner


def write_history_discard(summary: dict[str, Any]) -> None:
    """Drop the in-memory histories when no report is wanted (summary stays JSON-able)."""
    for result in summary["strategies"].values():
        result.pop("_history", None)
