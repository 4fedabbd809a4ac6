"""A run: provision, then per strategy start the target, fire the trials, judge; summarise.

    run()            provision PostgreSQL (infra.provider) and the fake gateway, install the
                     oracle, then per strategy: start_target (runner.target), fire_trials
                     (runner.trials), judge (model.judge); gates; the summary (contracts.md)
    judge()          one strategy's trials -> its part of summary.json (a trial with a
                     deadlock is a violating trial; the lock sampler's cycles and the
                     deadlock counter reach the oracle here), with how many trials forced
                     mode forced ("forced": by, trials, forced, timeouts)
    (between the two, while the target still runs: runner.reconcile gives it a bounded
    chance to reconcile captures the gateway made that its database does not show; the
    strategy's summary says what was waited for, as "reconciliation")
    summary_of()     judged strategies -> the summary: gates, verdict, exit code
    write_history()  history.jsonl: every strategy's operations

Strategies run one after another on one database, so the deadlock counter's delta and the
lock-wait figures of each belong to it alone. A `--nemesis` (model.nemesis) is on while a
strategy's trials run, after the oracle's baseline; what it injected lands in that
strategy's summary as "nemesis".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psycopg

from payrace.harness.errors import UsageError
from payrace.harness.gateway.controls import GatewayControl, LocalGateway, RemoteGateway
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.infra.machine import machine
from payrace.harness.infra.provider import Database, connect_failure, provide_postgres
from payrace.harness.model import oracle, watched
from payrace.harness.model.gates import judge_gates
from payrace.harness.model.judge import Judgement
from payrace.harness.model.judge import judge as check
from payrace.harness.model.lockwatch import CONNECTION_LOST
from payrace.harness.model.verdict import DECLARED, EXIT_ERROR, RunOutcome, invariants_outcome
from payrace.harness.reports.timeline import (
    TimelineEvent,
    from_audit_waits,
    from_waits,
    since,
)
from payrace.harness.runner.config import RunConfig, oracle_config
from payrace.harness.runner.reconcile import Reconciler, Waited, await_reconciled
from payrace.harness.runner.target import start_target
from payrace.harness.runner.trials import StrategyRun, TrialOutcome, fire_trials
from payrace.postgres import DsnError, libpq_url
from payrace.redact import redact, redact_tree


async def judge(
    config: RunConfig, run: StrategyRun, gateway: GatewayControl, oracle_url: str
) -> dict[str, Any]:
    """Observe with the oracle and check. Called after the target stopped when payrace
    started it: its backends have exited and flushed their counters (deadlocks). An oracle
    that cannot read the database leaves the verdict unknown, the reports written."""
    payments = {o.payment_id: o.trial for o in run.outcomes.values()}
    # What the run could not see, said in the summary instead of passing for "nothing there".
    # A gap in lock sampling leaves the verdict alone: the audit triggers and the deadlock
    # counter, which decide it, saw everything; the sampler only ties deadlocks to payments.
    not_seen: list[str] = list(run.server_side.get("not_seen") or [])
    if run.target_stopped is not None:
        not_seen.append(run.target_stopped)
    counters = await asyncio.to_thread(gateway.counters)
    try:
        obs = await _observe(config, run, counters, oracle_url, set(payments))
        judged = check(run.history.ops(), obs)
        if not obs.deadlocks_settled and config.settle_timeout_s() > 0:
            obs, judged = await _settled(config, run, oracle_url, obs, judged)
    except (psycopg.Error, watched.OracleError) as exc:
        said = " ".join(str(exc).split())
        not_seen.append(f"the oracle could not read the target's database: {said}")
        return _unobserved(config, run, not_seen)
    valid = judged.valid
    if run.trial_errors and valid is True:
        valid = "unknown"
    checks = judged.checks()
    if run.target_stopped is not None:
        # What ran is judged (a violation found stays one); the rest was never raced.
        valid = False if valid is False else "unknown"
        checks["target_answered"] = _blind_check("target_answered", run.target_stopped)
    violating = sorted(payments[p] for p in judged.verdict.violating_payments if p in payments)
    first = None
    if violating:
        outcome = run.outcomes[violating[0]]
        first = judged.first_violation(
            outcome.payment_id, trial=outcome.trial, timeline=_drawn(run, outcome)
        )
        if first is not None and not outcome.timeline:  # drawn from the audit rows
            audit = from_audit_waits(
                [TimelineEvent(**e) for e in first["timeline"]],
                judged.observation.audit,
                outcome.payment_id,
                run.lock_waits,
                interval_ms=run.lock_poll_ms,
            )
            first["timeline"] = [e.to_json() for e in audit]
        _retime(first, outcome)
    return {
        **_common(config, run, not_seen),
        "valid": valid,
        "violating_trials": len(violating),
        "checks": checks,
        "gateway_capture_calls": sum(
            counters.get("captures", {}).get(o.gateway_payment_id, 0) for o in run.outcomes.values()
        ),
        "first_violation": first,
        # Deadlocks tied to trials are in violating_trials; `unattributed` ones are not, and
        # the `violations` gate adds them (runner.config.Gate).
        "deadlocks": judged.deadlock_summary(),
    }


async def _observe(
    config: RunConfig,
    run: StrategyRun,
    counters: dict[str, Any],
    oracle_url: str,
    payment_ids: set[int],
) -> oracle.Observation:
    """What the run did, the deadlock count read once, not waited for (_settled waits)."""
    assert run.since is not None
    return await asyncio.to_thread(
        oracle.observe,
        oracle_url,
        oracle_config(config),
        since=run.since,
        payment_ids=payment_ids,
        gateway_counters=counters,
        # Also the ids the database never recorded: a capture the gateway accepted in a
        # transaction that then rolled back is exactly what no_lost_capture is for.
        gateway_payment_ids=[o.gateway_payment_id for o in run.outcomes.values()],
        settle_timeout_s=0.0,
        lock_cycles=run.lock_cycles,
    )


async def _settled(
    config: RunConfig,
    run: StrategyRun,
    oracle_url: str,
    obs: oracle.Observation,
    judged: Judgement,
) -> tuple[oracle.Observation, Judgement]:
    """The deadlock count once it has settled, and the checks again with it. A target still
    connected makes that a wait of about 11 s (PostgreSQL 15+ flushes an idle backend's
    counts that late: model.deadlocks), which only a valid verdict needs: a run violated
    already stays violated whatever the count says, so by default it is answered at once
    and its no_deadlock says why it was not waited for. An explicit --settle-s waits always."""
    assert run.since is not None
    violated = judged.valid is False and config.settle_s is None
    obs = await asyncio.to_thread(
        oracle.settled, oracle_url, run.since, obs,
        wait_s=config.settle_timeout_s(), violated=violated,
    )  # fmt: skip
    return obs, check(run.history.ops(), obs)


def _unobserved(config: RunConfig, run: StrategyRun, not_seen: list[str]) -> dict[str, Any]:
    """A strategy the oracle could not read: every report still written, verdict unknown,
    the reason in the one check that stands for all of them."""
    return {
        **_common(config, run, not_seen),
        "valid": "unknown",
        "violating_trials": 0,
        "checks": {"oracle": _blind_check("oracle", not_seen[-1])},
        "first_violation": None,
        "deadlocks": None,
    }


def _blind_check(name: str, reason: str) -> dict[str, Any]:
    """A check that could not be made: unknown, the reason in its note (every report shows
    a check; JUnit makes an unknown one an error)."""
    return {"name": name, "valid": "unknown", "count": 0, "checked": 0, "first": None,
            "worst": None, "last": None, "note": reason, "payments": []}  # fmt: skip


def _common(config: RunConfig, run: StrategyRun, not_seen: list[str]) -> dict[str, Any]:
    """The parts of a strategy's summary that need no observation."""
    duration = run.duration_s
    faults = {"nemesis": run.nemesis} if run.nemesis is not None else {}
    done = run.trials_done()  # failed trials raced nothing: not in the rate
    stopped = {"target_stopped": run.target_stopped} if run.target_stopped else {}
    return {
        "expected": _expected(config, run.strategy),
        "trials": config.trials,
        "trials_done": done,
        **stopped,
        "not_seen": not_seen,
        "trials_per_second": round(done / duration, 2) if duration else 0.0,
        "duration_s": round(duration, 3),
        "pause_timeouts": run.pause_timeouts,
        # Retryable 409s answered, and how many of them the harness sent again (trials).
        "conflicts": {
            "answered_409": run.conflicts,
            "retried": run.conflict_retries,
            # Client callbacks answered 5xx or not at all, sent again (--callback-reloads).
            "callbacks_reloaded": run.reloaded,
            # Aborted by PostgreSQL and retried inside the target (its Server-Timing).
            "serialization_failures": run.retried_inside["serialization"],
            "deadlocks_retried": run.retried_inside["deadlock"],
            # lock_timeout / statement_timeout expiries (55P03 / 57014) retried inside.
            "timeouts_retried": run.retried_inside["timeout"],
        },
        "forced": _forced(config, run),
        "trial_errors": {"count": len(run.trial_errors), "first": run.trial_errors[:3]},
        "latency_ms": run.latency.summary(),
        "plots": run.latency.plots(),
        "server_side": run.server_side,
        "arrival_spread_ms": run.arrival.summary() if config.mode == "aligned" else None,
        **faults,
        "_history": run.history,
    }


def _drawn(run: StrategyRun, outcome: TrialOutcome) -> list[TimelineEvent]:
    """The trial's pause points with its requests' lock waits (the sampler's) added."""
    if not outcome.timeline:
        return []  # over HTTP: the oracle's audit rows are drawn instead (judge)
    names = {pid: "payrace's lock barrier" for pid in run.barrier_pids}
    return from_waits(
        outcome.timeline,
        run.lock_waits,
        {**names, **outcome.backends},
        window=outcome.window,
        interval_ms=run.lock_poll_ms,
    )


def _retime(first: dict[str, Any] | None, outcome: TrialOutcome) -> None:
    """Times in the drawn timeline from the trial's start (probes: the harness's monotonic
    clock), or from the first row written (audit rows: the database's clock)."""
    if first is None or not first.get("timeline"):
        return
    events = [TimelineEvent(**e) for e in first["timeline"]]
    if outcome.timeline:
        events, first["times"] = since(events, outcome.window[0]), "from the trial's start"
    else:
        events, first["times"] = since(events), "from the first step drawn, database clock"
    first["timeline"] = [e.to_json() for e in events]


def _expected(config: RunConfig, strategy: str) -> str | None:
    """Declared, never guessed: --expect, else the profile's [target].expect (a running
    target is expected valid unless it says otherwise), else the reference strategy's."""
    if config.expect:
        return config.expect
    if config.external:
        return config.target_profile().expect or "valid"
    return DECLARED.get(strategy)


def _forced(config: RunConfig, run: StrategyRun) -> dict[str, Any] | None:
    """How many trials forced mode actually forced: a trial whose barrier or pause gave up
    waiting (or that never held two requests at once) raced, but was not forced."""
    if config.mode != "forced":
        return None
    return {
        "by": config.force,
        "trials": config.trials,
        "forced": sum(o.forced for o in run.outcomes.values()),
        "timeouts": run.pause_timeouts,
    }


async def run(
    config: RunConfig,
    *,
    announce: Callable[[str], None] = print,
    on_trial: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Run every strategy of `config`; return the summary (contracts.md), histories attached."""
    config.validate()
    if not config.run_id:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        config.run_id = f"{stamp}-{'-'.join(config.strategies)}-{config.mode}"
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    async with AsyncExitStack() as stack:
        target_db: Database | None = None
        db_info: dict[str, Any]
        if config.external:
            assert config.target_dsn is not None and config.gateway_url is not None
            await _answers(config.target, "--target", "start your service first")
            await _answers(config.gateway_url, "--gateway-url", "start one with `payrace gateway`")
            await _database_answers(config.target_dsn, "--target-dsn")
            oracle_url = config.target_dsn
            db_info = {"route": "target", "describe": "the target's own database (--target-dsn)"}
            remote = RemoteGateway(config.gateway_url)
            stack.callback(remote.close)
            gateway: GatewayControl = remote
            gateway_url = config.gateway_url
        else:
            db = stack.enter_context(
                provide_postgres(
                    config.dsn,
                    durable=config.durable,
                    announce=announce,
                    # A server payrace may restart: its own embedded one, not a container.
                    prefer="embedded" if config.restarts_postgres() else None,
                )
            )
            target_db = db
            oracle_url = db.url
            db_info = {
                "route": db.route,
                "server_version": db.server_version,
                "fast": db.fast,
                "describe": db.describe(),
            }
            fake = FakeRazorpay(config.target_profile().keys, seed=config.seed)
            server = stack.enter_context(GatewayServer(fake))
            gateway, gateway_url = LocalGateway(fake), server.url
        pool = await asyncpg.create_pool(
            oracle_url,
            min_size=1,
            max_size=4,
            server_settings={"application_name": "payrace-harness"},
            reset=_nothing_to_reset,
        )
        stack.push_async_callback(_close_pool, pool)
        if target_db is not None:
            # The service creates its tables on start; the oracle needs them first.
            await _create_schema(target_db)
        try:
            await asyncio.to_thread(oracle.install, oracle_url, oracle_config(config))
        except watched.OracleError as exc:
            raise UsageError(f"cannot install the oracle's audit triggers: {exc}") from exc
        for strategy in config.strategies:
            async with start_target(config, strategy, target_db, gateway_url) as target:
                fired = await fire_trials(
                    config,
                    strategy,
                    target,
                    gateway,
                    oracle_url,
                    pool,
                    lambda s=strategy: on_trial(s),  # type: ignore[misc]
                )
                waited = await _reconciled(config, fired, target.reconciler, gateway, oracle_url)
            results[strategy] = await judge(config, fired, gateway, oracle_url)
            if waited is not None:
                results[strategy]["reconciliation"] = waited.to_json()
    return summary_of(
        config,
        results,
        database=db_info,
        started_at=started_at,
        duration_s=time.perf_counter() - started,
    )


async def _reconciled(
    config: RunConfig,
    fired: StrategyRun,
    reconciler: Reconciler,
    gateway: GatewayControl,
    oracle_url: str,
) -> Waited | None:
    """The target's chance to reconcile before it is judged; None when there is no target
    left to reconcile anything (it stopped answering)."""
    if fired.target_stopped is not None:
        return None
    payments = {o.payment_id: o.gateway_payment_id for o in fired.outcomes.values()}
    return await await_reconciled(config, reconciler, gateway, oracle_url, payments)


def summary_of(
    config: RunConfig,
    results: dict[str, dict[str, Any]],
    *,
    database: dict[str, Any],
    started_at: datetime,
    duration_s: float,
) -> dict[str, Any]:
    """The summary (contracts.md) of judged strategies: gates, verdict and exit code. run()
    and a test's own race (payrace.testing.capture_race) both end here."""
    gates = judge_gates(config.gates, results, config.loaded_baseline())
    outcome = invariants_outcome(results, gates)
    stopped = [r["target_stopped"] for r in results.values() if r.get("target_stopped")]
    if stopped:
        # A target that died mid-run is an infrastructure failure, not a verdict on it: what
        # was in flight when it died (a capture the gateway took, never committed) cannot be
        # judged. The checks still list what they found; exit 2 says the run is incomplete.
        outcome = RunOutcome("target_stopped", EXIT_ERROR, "invariants", tuple(stopped))
    # What the console, the pytest plugin and every report see: passwords typed into any
    # option (command, --target, errors quoting a DSN) are masked once, here.
    return redact_tree(
        outcome.stamp(
            {
                "run_id": config.run_id,
                "command": config.command,
                "started_at": started_at.isoformat(timespec="seconds"),
                "duration_s": round(duration_s, 3),
                "machine": machine(),
                "database": database,
                "target": config.target,
                "mode": config.mode,
                "trials": config.trials,
                "seed": config.seed,
                "webhooks_per_trial": config.webhooks,
                "isolation_level": config.isolation,
                "webhook_dedupe": config.webhook_dedupe,
                "hold_ms": config.hold_ms,
                "force": config.force,
                "strategies": results,
                "gates": gates,
            }
        )
    )


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """The harness's pool only asks pg_blocking_pids(): no session state to undo, so a
    connection goes back without asyncpg's default reset (RESET ALL, UNLISTEN *, ...), a
    round trip per question, several questions per forced trial."""


async def _close_pool(pool: asyncpg.Pool) -> None:
    """Close the harness's pool; a connection a nemesis (or a restart) killed cannot take the
    goodbye message (BrokenPipeError), so the rest are dropped without one."""
    try:
        await pool.close()
    except CONNECTION_LOST:
        pool.terminate()


async def _answers(url: str, flag: str, hint: str) -> None:
    """A running target or gateway that is down is a setup mistake: said before any trial,
    not found out as a run of failed trials. Any HTTP answer, even a 404, means it is up."""
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            await http.get(url)
    except httpx.HTTPError as exc:
        raise UsageError(
            f"nothing answers at {flag} {url} ({type(exc).__name__}: {exc}); {hint}"
        ) from None


async def _database_answers(dsn: str, flag: str) -> None:
    """The target's database, where the oracle installs its triggers, takes a login now:
    a refusal or a dead server is named (password redacted) before any trial."""

    def probe() -> None:
        with psycopg.connect(libpq_url(dsn), connect_timeout=5, autocommit=True) as conn:
            conn.execute("SELECT 1")

    try:
        await asyncio.to_thread(probe)
    except DsnError as exc:
        raise UsageError(f"{flag} {redact(dsn)}: {exc}") from None
    except psycopg.Error as exc:
        raise UsageError(connect_failure(dsn, str(exc), flag)) from None


async def _create_schema(db: Database) -> None:
    # The service's imports (SQLAlchemy, FastAPI) only when it is started.
    from sqlalchemy.ext.asyncio import create_async_engine

    from payrace.service.db import create_schema

    engine = create_async_engine(db.asyncpg_url())
    try:
        await create_schema(engine)
    finally:
        await engine.dispose()


def write_history(summary: dict[str, Any], path: Path) -> None:
    """One history.jsonl for the run: every strategy's operations, each tagged with it."""
    histories = [r.pop("_history") for r in summary["strategies"].values() if "_history" in r]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for history in histories:
            for op in history:
                fh.write(redact(json.dumps(op.to_json(), separators=(",", ":"))) + "\n")
