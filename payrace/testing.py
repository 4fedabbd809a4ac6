"""Race payments from a team's own tests (pytest, pytest-asyncio, or none).

    capture_race(strategy=, forced=, event=, ...)   async context manager -> CaptureRace
        the seed's first test: a fresh database and fake Razorpay, the reference service in
        the test's event loop, one authorized payment; r.verify_payment() (the client
        callback) and r.handle_webhook_event() (the webhook) are the coroutines to gather;
        forced by default (each request, once it has read the payment, waits until every
        other has read it too); the oracle's verdict when the block ends: r.assert_exactly_once()
    race(strategy=, trials=, mode=, gate=, ...)     `payrace run` as a coroutine -> RaceResult;
        its keywords are the command's flags (`event=` is `--event`, `gate=` `--gate`, ...)
    RaceResult     .valid, .verdict, .violating_trials, .report (report.html), .summary;
                   assert_exactly_once(): THE assertion — every invariant held and every gate
                   passed, else the test fails naming the checkers and gates that did not, the
                   first violating schedule and the report's path

The pytest plugin (payrace.harness.pytest_plugin) hands out `race` and `arace` built on
race(); capture_race() needs no fixture. Both reuse one PostgreSQL server per process (an
explicit dsn=, else --payrace-dsn / PAYRACE_DSN, else Docker, else the embedded
pgserver) and create a database of their own on it for every race, dropped after.

Importing this module imports the standard library and nothing else (the CLI's and the
service's stacks load when a race starts), so a suite pays for it only in the tests that race.
"""

from __future__ import annotations

import atexit
import os
import secrets
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from payrace.harness.infra.provider import Database
    from payrace.harness.runner.capture_race import CaptureRace

__all__ = ["CaptureRace", "RaceResult", "capture_race", "race"]


def fail(message: str) -> NoReturn:
    """Fail the test with `message` alone: pytest's failure without a traceback of payrace's
    internals when running under pytest, a plain AssertionError otherwise."""
    pytest = sys.modules.get("pytest")
    if pytest is not None:
        pytest.fail(message, pytrace=False)
    raise AssertionError(message)


# -- the verdict ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RaceResult:
    """A finished race: its summary (docs/contracts.md) and where its reports are."""

    summary: dict[str, Any]
    report: Path | None = None  # report.html; summary.json and junit.xml beside it

    def strategy(self) -> dict[str, Any]:
        """The first (usually only) strategy's part of the summary."""
        result: dict[str, Any] = next(iter(self.summary["strategies"].values()))
        return result

    @property
    def verdict(self) -> str:
        """valid | violated | unknown | gate_breached: the word the CLI's exit code follows."""
        return str(self.summary["verdict"])

    @property
    def valid(self) -> bool | str:
        """The invariants alone (gates aside): True, False or "unknown"."""
        values = [r["valid"] for r in self.summary["strategies"].values()]
        if False in values:
            return False
        return True if all(v is True for v in values) else "unknown"

    @property
    def violating_trials(self) -> int:
        return sum(int(r["violating_trials"]) for r in self.summary["strategies"].values())

    def explain(self) -> str:
        """Why the verdict is not valid, in words: checkers, gates, the first violation."""
        from payrace.harness.reports.summary import deadlock_line, deadlock_lines
        from payrace.harness.reports.timeline import TimelineEvent, render_text

        lines = [_headline(self.summary)]
        for name, result in self.summary["strategies"].items():
            lines += [f"  {name}: {line}" for line in _failed_checks(result)]
            if deadlocks := deadlock_line(result):
                lines.append(f"  {name}: {deadlocks}")
        for gate in self.summary.get("gates") or []:
            if not gate.get("passed"):
                lines.append(
                    f"  gate {gate['expr']} breached: {gate['strategy']} measured {gate['value']}"
                )
        if self.report is not None:
            lines.append(f"report: {self.report}")
        for result in self.summary["strategies"].values():
            first = result.get("first_violation")
            if first:
                events = [TimelineEvent(**e) for e in first["timeline"]]
                lines += [f"first violating trial {first['trial']}:", render_text(events)]
                lines += deadlock_lines(first)
                break
        return "\n".join(lines)

    def assert_exactly_once(self) -> None:
        """The one assertion: the race's verdict is valid — every invariant held (exactly one
        capture, ...) and every gate passed. Fails the test otherwise, in words."""
        if self.verdict != "valid":
            fail(self.explain())


def _headline(summary: Mapping[str, Any]) -> str:
    parts = []
    for name, result in summary["strategies"].items():
        parts.append(
            f"{name} valid={result['valid']}, violating trials "
            f"{result['violating_trials']}/{result['trials']}"
        )
    said = "; ".join(parts)
    verdict = summary["verdict"]
    if verdict == "violated":
        return f"capture was not exactly once: {said}"
    if verdict == "gate_breached":
        return f"capture was exactly once, but a gate was breached: {said}"
    if verdict == "unknown":
        return f"exactly once could not be proven (verdict unknown): {said}"
    return f"verdict {verdict}: {said}"


def _failed_checks(result: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, check in (result.get("checks") or {}).items():
        if check["valid"] is True:
            continue
        # The words JUnit, the console and report.html use (reports.words): one phrasing.
        from payrace.harness.reports.words import check_message

        lines.append(check_message(name, check))
    errors = result.get("trial_errors") or {}
    if errors.get("count"):
        lines.append(f"{errors['count']} trial(s) could not be carried out: {errors['first'][0]}")
    return lines


# -- one PostgreSQL server per process ------------------------------------------------------

_servers: dict[str | None, Database] = {}
_servers_stack = ExitStack()
_servers_lock = threading.Lock()
# Set by the pytest plugin: --payrace-dsn, and where a race's reports go (pytest's basetemp).
_session: dict[str, Any] = {"dsn": None, "reports": None}


def configure(*, dsn: str | None = None, reports: Callable[[], Path] | Path | None = None) -> None:
    """Defaults for the races of this process (the pytest plugin sets them from its options):
    the PostgreSQL server to create their databases on, and where their reports go."""
    _session.update(dsn=dsn, reports=reports)


def server(dsn: str | None = None) -> Database:
    """The PostgreSQL server races create their databases on, started the first time it is
    asked for and kept until close_servers() (at the latest when the process exits)."""
    from payrace.harness.infra import env

    dsn = dsn or _session["dsn"] or env.read(env.DSN) or None
    with _servers_lock:
        if dsn not in _servers:
            from payrace.harness.infra.provider import provide_postgres

            if not _servers:
                atexit.register(close_servers)
            _servers[dsn] = _servers_stack.enter_context(provide_postgres(dsn))
        return _servers[dsn]


def close_servers() -> None:
    """Stop the servers server() started (an explicit DSN's server is left running)."""
    with _servers_lock:
        _servers.clear()
        _servers_stack.close()


def reports_dir(out: str | os.PathLike[str] | None) -> Path:
    if out is not None:
        return Path(out)
    configured = _session["reports"]
    if configured is None:
        return Path("reports")  # the CLI's default
    return configured() if callable(configured) else Path(configured)


def current_test() -> str | None:
    """The pytest node id of the running test, from PYTEST_CURRENT_TEST (pytest sets it)."""
    current = os.environ.get("PYTEST_CURRENT_TEST")
    return current.rsplit(" (", 1)[0] if current else None


def new_run_id(strategies: Sequence[str], mode: str) -> str:
    # A random tail: two races in one second (one test racing twice) never share a directory.
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{'-'.join(strategies)}-{mode}-{secrets.token_hex(3)}"


# -- race(): `payrace run` as a coroutine ----------------------------------------------------


async def race(
    strategy: str | Sequence[str] | None = None,
    *,
    trials: int | None = None,
    mode: str | None = None,
    force: str | None = None,
    target: str | None = None,
    profile: str | os.PathLike[str] | None = None,
    dsn: str | None = None,
    seed: int | None = None,
    webhooks: int | None = None,
    event: str | None = None,
    concurrency: int | None = None,
    jitter_ms: float | None = None,
    hold_ms: float | None = None,
    isolation: str | None = None,
    gate: str | Sequence[str] = (),
    gates: str | Sequence[str] = (),
    out: str | os.PathLike[str] | None = None,
    durable: bool | None = None,
    target_dsn: str | None = None,
    gateway_url: str | None = None,
    oracle_config: str | os.PathLike[str] | None = None,
    nemesis: str | None = None,
    expect: str | None = None,
    settle_s: float | None = None,
    reconcile_s: float | None = None,
    webhook_dedupe: bool = True,
    callback_reloads: int = 0,
    baseline: str | os.PathLike[str] | None = None,
    write_baseline: str | os.PathLike[str] | None = None,
    first_event: str | None = None,
) -> RaceResult:
    """`payrace run` with these flags (None: the flag's default); reports written under `out`.

    A mistake in the flags fails with payrace's message (what to change), not a traceback.
    """
    from payrace.harness.errors import UsageError

    if first_event is not None:
        warnings.warn(
            "race(first_event=...) is now race(event=...), like `payrace run --event`",
            DeprecationWarning,
            stacklevel=2,
        )
        event = event or first_event
    mistake: str | None = None
    try:
        return await _race(
            strategy,
            gates=[*_listed(gate), *_listed(gates)],
            out=out,
            dsn=dsn,
            flags={
                "trials": trials,
                "mode": mode,
                "force": force,
                "target": target,
                "profile": Path(profile) if profile is not None else None,
                "seed": seed,
                "webhooks": webhooks,
                "first_event": event,
                "concurrency": concurrency,
                "jitter_ms": jitter_ms,
                "hold_ms": hold_ms,
                "isolation": isolation,
                "durable": durable,
                "target_dsn": target_dsn,
                "gateway_url": gateway_url,
                "oracle_config": Path(oracle_config) if oracle_config is not None else None,
                "nemesis": nemesis,
                "expect": expect,
                "settle_s": settle_s,
                "reconcile_s": reconcile_s,
                "webhook_dedupe": webhook_dedupe,
                "callback_reloads": callback_reloads,
                "baseline": Path(baseline) if baseline is not None else None,
                "write_baseline": Path(write_baseline) if write_baseline is not None else None,
            },
        )
    except UsageError as exc:
        mistake = f"payrace: {exc}"
    fail(mistake)  # outside the handler: the message alone, no chained traceback


def _listed(value: str | Sequence[str]) -> list[str]:
    values = [value] if isinstance(value, str) else list(value)
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


async def _race(
    strategy: str | Sequence[str] | None,
    *,
    gates: list[str],
    out: str | os.PathLike[str] | None,
    dsn: str | None,
    flags: dict[str, Any],
) -> RaceResult:
    from payrace.harness.reports.writers import claim_run_dir, write_all
    from payrace.harness.runner.config import Gate, RunConfig
    from payrace.harness.runner.run import run, write_history

    test = current_test()
    config = RunConfig(
        strategies=_listed(strategy or ()),
        gates=[Gate.parse(g) for g in gates],
        command=f"pytest {test}" if test else "payrace.testing.race",
        **{k: v for k, v in flags.items() if v is not None},
    )
    config.validate()  # before a server starts: a mistake costs nothing
    if not config.external:
        # A fresh database for this race on the process's server (provider route 1).
        config.dsn = server(dsn).url
    config.out_dir = reports_dir(out)
    config.run_id = new_run_id(config.strategies, config.mode)
    summary = await run(config, announce=lambda line: None)
    # Never another race's directory, also for two started in the same second.
    where = claim_run_dir(config.out_dir, summary["run_id"])
    summary["run_id"] = where.name
    write_history(summary, where / "history.jsonl")
    written = write_all(summary, where)
    if config.write_baseline is not None:
        from payrace.harness.model.gates import write_baseline

        write_baseline(summary, config.write_baseline)
    return RaceResult(summary, written["html"])


# -- capture_race(): the seed's test ---------------------------------------------------------


@asynccontextmanager
async def capture_race(
    strategy: str = "for_update",
    *,
    forced: bool = True,
    event: str = "payment.captured",
    amount: int = 50_000,
    isolation: str = "READ COMMITTED",
    seed: int = 1,
    dsn: str | None = None,
    out: str | os.PathLike[str] | None = None,
) -> AsyncIterator[CaptureRace]:
    """A fresh database and fake Razorpay, the reference service (`strategy`) in this event
    loop, and one payment authorized at the gateway; the oracle's verdict when the block ends.

        async with capture_race(strategy="naive") as r:
            await asyncio.gather(r.verify_payment(), r.handle_webhook_event())
        r.assert_exactly_once()

    forced: each request, once it has read the payment, waits until every other request
    started with it has read the payment too (or waits on its lock) — both read `pending`
    before either writes, every time. forced=False: the requests run as gather runs them.
    event: what r.handle_webhook_event() delivers unless told otherwise.
    """
    from payrace.harness.errors import UsageError
    from payrace.harness.runner.capture_race import CaptureRace, capture_config

    mistake: str | None = None
    try:
        config = capture_config(
            strategy,
            forced=forced,
            event=event,
            amount=amount,
            isolation=isolation,
            seed=seed,
        )
    except UsageError as exc:
        mistake = f"payrace: {exc}"
    if mistake is not None:
        fail(mistake)
    test = current_test()
    config.command = f"pytest {test}" if test else "payrace.testing.capture_race"
    config.out_dir = reports_dir(out)
    config.run_id = new_run_id(config.strategies, "capture")
    async with CaptureRace.start(config, server(dsn), event) as r:
        yield r
