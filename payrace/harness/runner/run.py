"""The race harness: provision, start the target, fire interleaved trials, judge, summarise.

    RunConfig        what to run (strategies, trials, mode, target, seed, gates, nemesis, ...)
    Gate             `[strategy:]metric<=number`, e.g. `lock_p99_ms<=100`
    UsageError       the user's words are off (exit 2; the message says what to fix)
    run()            provision PostgreSQL (harness.infra.provider) and the fake gateway, then per
                     strategy: start the target, run trials, observe with the oracle, check
    run_strategy()   the trials of one strategy against one started target

Modes (how a race is forced; DESIGN.md "Ways the harness forces a race"):
    forced   a pause after the payment read holds each request until every other request of
             the trial has read too, has finished, or waits on a lock (pg_blocking_pids);
             in-process through payrace.service.probes.Rendezvous, over HTTP via X-Payrace-Pause
    aligned  released together: an asyncio gate in-process, last-byte sync over HTTP; the
             arrival spread is measured from the target's own received-at stamps
    jitter   seeded random offsets per request

Strategies run one after another on one database, so the deadlock counter's delta and the
lock-wait figures of each belong to it alone. A `--nemesis` (harness.model.nemesis) is on while a
strategy's trials run, after the oracle's baseline; what it injected lands in that
strategy's summary as "nemesis".
"""

from __future__ import annotations

import asyncio
import json
import operator
import os
import platform
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import asyncpg

from payrace.harness.gateway.controls import GatewayControl, LocalGateway, RemoteGateway
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.processes import ServiceProcess, service_env
from payrace.harness.infra.provider import Database, provide_postgres
from payrace.harness.model import checker, oracle
from payrace.harness.model.client import (
    AsgiClient,
    Client,
    HttpClient,
    PaymentContext,
    Prepared,
    Reply,
    prepare,
)
from payrace.harness.model.generator import Generator, TrialPlan
from payrace.harness.model.history import History, Operation, classify
from payrace.harness.model.lockwatch import LockWatch
from payrace.harness.model.nemesis import Nemesis, NemesisSpecError, parse_spec
from payrace.harness.model.stats import LatencyHistogram, PathHistograms
from payrace.harness.reports.timeline import TimelineEvent, from_audit, from_probes
from payrace.service import probes
from payrace.service.app import create_app
from payrace.service.capture import STRATEGIES
from payrace.service.settings import Settings

Mode = Literal["forced", "aligned", "jitter"]
MODES: tuple[Mode, ...] = ("forced", "aligned", "jitter")
# What each strategy is declared to be: naive is kept to prove the harness catches the bug.
DECLARED: dict[str, str] = {"naive": "violated", "for_update": "valid", "advisory": "valid"}


class UsageError(ValueError):
    """The user's input cannot work; the message says what to change."""


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "<": operator.lt,
    ">": operator.gt,
}
_GATE = re.compile(r"^\s*(?:(?P<strategy>[a-z_]+)\s*:)?\s*(?P<metric>[a-z0-9_]+)\s*"
                   r"(?P<op><=|>=|==|<|>)\s*(?P<value>-?\d+(?:\.\d+)?)\s*$")  # fmt: skip
_LATENCY_METRIC = re.compile(
    r"^(?P<kind>lock|hold|request)(?:_(?P<path>client|webhook))?_(?P<stat>p50|p95|p99|max|mean)_ms$"
)


@dataclass(frozen=True)
class Gate:
    expr: str
    strategy: str | None
    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, expr: str) -> Gate:
        m = _GATE.match(expr)
        if not m:
            raise UsageError(
                f"gate {expr!r} is not of the form [strategy:]metric<=number, "
                "e.g. 'lock_p99_ms<=100' or 'for_update:hold_p99_ms<50'"
            )
        metric = m["metric"]
        if metric not in ("violations", "trials_per_second") and not _LATENCY_METRIC.match(metric):
            raise UsageError(
                f"gate {expr!r}: unknown metric {metric!r}; use violations, trials_per_second "
                "or {lock|hold|request}[_client|_webhook]_{p50|p95|p99|max|mean}_ms"
            )
        return cls(expr, m["strategy"], metric, m["op"], float(m["value"]))

    def measure(self, result: dict[str, Any]) -> float:
        if self.metric == "violations":
            return float(result["violating_trials"])
        if self.metric == "trials_per_second":
            return float(result["trials_per_second"])
        m = _LATENCY_METRIC.match(self.metric)
        assert m is not None
        stats = result["latency_ms"].get(m["kind"], {}).get(m["path"] or "all", {})
        return float(stats.get(m["stat"], 0.0))

    def judge(self, strategy: str, result: dict[str, Any]) -> dict[str, Any]:
        value = self.measure(result)
        return {
            "expr": self.expr,
            "strategy": strategy,
            "value": round(value, 3),
            "passed": _OPS[self.op](value, self.value),
        }


@dataclass
class RunConfig:
    strategies: list[str] = field(default_factory=lambda: ["for_update"])
    trials: int = 100
    mode: Mode = "forced"
    target: str = "inproc"  # inproc | http | http://host:port (a running service)
    dsn: str | None = None
    seed: int = 1
    webhooks: int = 1
    first_event: str = "payment.captured"
    concurrency: int = 4
    jitter_ms: float = 5.0
    hold_ms: float = 0.0
    isolation: str = "READ COMMITTED"
    gates: list[Gate] = field(default_factory=list)
    out_dir: Path = Path("reports")
    durable: bool = False
    amount: int = 50_000
    pause_timeout_s: float = 5.0
    target_dsn: str | None = None  # a running target's own database, for the oracle
    gateway_url: str | None = None  # the fake gateway a running target talks to
    oracle_config: Path | None = None  # a team's own schema (TOML); default: the reference
    nemesis: str | None = None  # faults during the trials: "gateway-errors:0.2,kill-backends:1"
    command: str = "payrace run"
    run_id: str = ""

    def validate(self) -> None:
        if self.trials < 1 or self.trials > 1_000_000:
            raise UsageError("--trials must be between 1 and 1000000")
        if self.mode not in MODES:
            raise UsageError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.concurrency < 1 or self.concurrency > 64:
            raise UsageError("--concurrency must be between 1 and 64")
        external = self.target not in ("inproc", "http")
        if external:
            if not self.target.startswith("http://"):
                raise UsageError(
                    f"--target must be inproc, http or a URL like http://127.0.0.1:8000, "
                    f"got {self.target!r}"
                )
            if not self.target_dsn or not self.gateway_url:
                raise UsageError(
                    "--target URL needs --target-dsn (the target's own database, where the "
                    "oracle installs its audit triggers) and --gateway-url (the fake gateway "
                    "it talks to, e.g. one started with `payrace gateway`)"
                )
        else:
            unknown = [s for s in self.strategies if s not in STRATEGIES]
            if unknown:
                raise UsageError(
                    f"unknown strategy {', '.join(unknown)}; choose from {', '.join(STRATEGIES)}"
                )
        if self.first_event not in ("payment.captured", "payment.authorized", "order.paid"):
            raise UsageError(
                f"--event must be payment.captured, payment.authorized or order.paid, "
                f"got {self.first_event!r}"
            )
        if self.hold_ms < 0 or self.jitter_ms < 0:
            raise UsageError("--hold-ms and --jitter-ms must be >= 0")
        if self.oracle_config is not None:
            oracle_config(self)  # a bad file is a usage error before anything starts
        if self.hold_ms and self.mode != "forced":
            raise UsageError("--hold-ms is injected at the forced-mode pause; use --mode forced")
        if self.nemesis is not None:
            try:
                parse_spec(self.nemesis)
            except NemesisSpecError as exc:
                raise UsageError(str(exc)) from exc


def machine() -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


class Target:
    """A started target: a client to it, and how forced mode reaches its pause points."""

    def __init__(self, name: str, client: Client, *, in_process: bool) -> None:
        self.name = name
        self.client = client
        self.in_process = in_process


@asynccontextmanager
async def start_target(
    config: RunConfig, strategy: str, db: Database | None, gateway_url: str
) -> AsyncIterator[Target]:
    """Start what `config.target` names; `db` is None for a running target (its own DB)."""
    keys = GatewayKeys()
    if config.target == "inproc":
        assert db is not None
        settings = Settings(
            database_url=db.asyncpg_url(),
            capture_strategy=strategy,
            isolation_level=config.isolation,
            razorpay_key_id=keys.key_id,
            razorpay_key_secret=keys.key_secret,
            razorpay_webhook_secret=keys.webhook_secret,
            razorpay_base_url=gateway_url,
            db_pool_size=max(10, config.concurrency * 4),
        )
        app = create_app(settings)
        runtime = app.state.runtime
        await runtime.startup()
        client = AsgiClient(app)
        try:
            yield Target(strategy, client, in_process=True)
        finally:
            await client.aclose()
            await runtime.shutdown()
        return
    if config.target == "http":
        assert db is not None
        env = service_env(
            db,
            gateway_url,
            strategy,
            keys=keys,
            probes=config.mode == "forced",
            isolation_level=config.isolation,
            pool_size=max(10, config.concurrency * 4),
        )
        log = config.out_dir / config.run_id / f"service-{strategy}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with ServiceProcess(env, log_path=log) as proc:
            http = HttpClient(proc.url)
            try:
                yield Target(strategy, http, in_process=False)
            finally:
                await http.aclose()
        return
    http = HttpClient(config.target)
    try:
        yield Target(strategy, http, in_process=False)
    finally:
        await http.aclose()


class BlockedProbe:
    """The harness's own view of "is this backend waiting for a lock?" (its own pool)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def __call__(self, pid: int) -> bool:
        async with self.pool.acquire() as conn:
            return bool(await conn.fetchval("SELECT cardinality(pg_blocking_pids($1)) > 0", pid))


class Recorder:
    """A controller that holds nobody: it only lets the pause points be recorded."""

    async def reached(self, point: str, probe: probes.ProbeContext) -> None:
        return None

    def finished(self, probe: probes.ProbeContext) -> None:
        return None


@dataclass
class TrialOutcome:
    trial: int
    payment_id: int
    gateway_payment_id: str
    arrival_spread_ms: float | None
    timeline: list[TimelineEvent]
    pause_timeouts: int


class StrategyRun:
    """Everything one strategy's trials produce; turned into its part of summary.json."""

    def __init__(self, strategy: str) -> None:
        self.strategy = strategy
        self.history = History(strategy=strategy)
        self.latency = PathHistograms()
        self.arrival = LatencyHistogram()
        self.outcomes: dict[int, TrialOutcome] = {}
        self.pause_timeouts = 0
        self.since: oracle.Baseline | None = None
        self.duration_s = 0.0
        self.server_side: dict[str, Any] = {}
        # Trials that could not be carried out (the target refused to create an order, ...):
        # their payments were never raced, so a clean verdict is "unknown", not "valid".
        self.trial_errors: list[str] = []
        self.nemesis: dict[str, Any] | None = None
        self.redelivered = 0  # webhooks sent again after a 5xx (under the nemesis only)


async def _fire(
    config: RunConfig,
    target: Target,
    plan: TrialPlan,
    reqs: list[Prepared],
    ctx: PaymentContext,
    run: StrategyRun,
    is_blocked: BlockedProbe,
) -> tuple[list[Reply], list[Operation], dict[str, probes.ProbeContext], int]:
    steps = plan.steps
    captured: dict[str, probes.ProbeContext] = {}
    if config.mode == "aligned":
        invokes = [
            run.history.invoke(req.f, step.process, plan.trial, ctx.payment_id, req.value)
            for step, req in zip(steps, reqs, strict=True)
        ]
        if not target.in_process:
            return await target.client.send_together(reqs), invokes, captured, 0
        # In-process, the requests also pass a recorder, so a violating trial's timeline
        # names who did what (over HTTP the oracle's audit rows stand in for it).
        gate = asyncio.Event()
        recorder = Recorder()

        async def released(i: int) -> Reply:
            with probes.controlled(recorder, steps[i].process) as probe:
                await gate.wait()
                reply = await target.client.send(reqs[i])
            captured[steps[i].process] = probe
            return reply

        tasks = [asyncio.create_task(released(i)) for i in range(len(reqs))]
        await asyncio.sleep(0)  # every task is parked on the gate before it opens
        gate.set()
        return list(await asyncio.gather(*tasks)), invokes, captured, 0

    rendezvous = probes.Rendezvous(
        len(reqs),
        is_blocked,
        timeout_s=config.pause_timeout_s,
        hold_s=config.hold_ms / 1000,
    )
    group = f"{config.run_id}-{run.strategy}-{plan.trial}"
    pause_header = (
        f"group={group}; size={len(reqs)}; timeout_ms={int(config.pause_timeout_s * 1000)}; "
        f"hold_ms={int(config.hold_ms)}"
    )

    invoked: dict[int, Operation] = {}

    async def one(i: int) -> Reply:
        step, req = steps[i], reqs[i]
        if config.mode == "jitter" and step.offset_ms:
            await asyncio.sleep(step.offset_ms / 1000)
        invoked[i] = run.history.invoke(req.f, step.process, plan.trial, ctx.payment_id, req.value)
        if config.mode != "forced":
            return await target.client.send(req)
        if not target.in_process:
            return await target.client.send(req, {"x-payrace-pause": pause_header})
        with probes.controlled(rendezvous, step.process) as probe:
            reply = await target.client.send(req)
        captured[step.process] = probe
        return reply

    replies = list(await asyncio.gather(*(one(i) for i in range(len(reqs)))))
    return replies, [invoked[i] for i in range(len(reqs))], captured, rendezvous.timeouts


async def run_trial(
    config: RunConfig,
    target: Target,
    gateway: GatewayControl,
    generator: Generator,
    trial: int,
    run: StrategyRun,
    is_blocked: BlockedProbe,
) -> None:
    plan = generator.plan(trial)
    order = await _create_order(target, config.amount)
    payment = await asyncio.to_thread(gateway.authorize, order["gateway_order_id"])
    ctx = PaymentContext(order["payment_id"], order["gateway_order_id"], payment)
    keys = GatewayKeys()
    reqs = [prepare(step, i, ctx, keys) for i, step in enumerate(plan.steps)]
    replies, invokes, captured, timeouts = await _fire(
        config, target, plan, reqs, ctx, run, is_blocked
    )
    if config.mode == "forced" and not target.in_process:
        timeouts += _pauses_over_http(replies)
    received: list[int] = []
    for step, inv, reply in zip(plan.steps, invokes, replies, strict=True):
        server = _complete(run, inv, reply)
        path = "client" if step.kind == "verify" else "webhook"
        for kind in ("lock", "hold"):
            if kind in server:
                run.latency.record(kind, path, float(server[kind]))
        if "received_at_ns" in server:
            received.append(int(server["received_at_ns"]))
    if config.nemesis:
        await _redeliver(target, plan, reqs, replies, ctx, run)
    spread = (max(received) - min(received)) / 1e6 if len(received) > 1 else None
    if spread is not None and config.mode == "aligned":
        run.arrival.record_ms(spread)
    run.pause_timeouts += timeouts
    run.outcomes[trial] = TrialOutcome(
        trial, ctx.payment_id, payment["id"], spread, from_probes(captured), timeouts
    )


def _complete(run: StrategyRun, invoke: Operation, reply: Reply) -> dict[str, Any]:
    """Record the answer to `invoke`; return what the target said about itself."""
    server = reply.server()
    run.history.complete(
        invoke,
        classify(reply.status),
        value=reply.body,
        status=reply.status,
        error=reply.error,
        server=server,
    )
    return server


REDELIVERIES = 3


async def _redeliver(
    target: Target,
    plan: TrialPlan,
    reqs: list[Prepared],
    replies: list[Reply],
    ctx: PaymentContext,
    run: StrategyRun,
) -> None:
    """Razorpay delivers a webhook at least once: one answered with a 5xx, or not at all, is
    sent again with the same event id, as Razorpay's retries would. Only under the nemesis,
    whose faults make a retryable 503 the right answer; each redelivery is its own operation."""
    for step, req, reply in zip(plan.steps, reqs, replies, strict=True):
        attempt = 0
        while req.f == "webhook" and (reply.status is None or reply.status >= 500):
            if attempt == REDELIVERIES:
                break
            attempt += 1
            await asyncio.sleep(0.01 * attempt)
            value = {**req.value, "redelivery": attempt}
            inv = run.history.invoke(req.f, step.process, plan.trial, ctx.payment_id, value)
            reply = await target.client.send(req)
            _complete(run, inv, reply)
            run.redelivered += 1


async def _create_order(target: Target, amount: int, attempts: int = 5) -> dict[str, Any]:
    """POST /orders, again after a 503 database_unavailable (a killed backend under the
    nemesis): the answer says to retry, and the order is setup, not the race under test."""
    for attempt in range(1, attempts + 1):
        try:
            return await target.client.create_order(amount, "INR")
        except RuntimeError as exc:
            if attempt == attempts or "database_unavailable" not in str(exc):
                raise
            await asyncio.sleep(0.01 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


async def fire_trials(
    config: RunConfig,
    strategy: str,
    target: Target,
    gateway: GatewayControl,
    oracle_url: str,
    pool: asyncpg.Pool,
    on_trial: Callable[[], None] = lambda: None,
) -> StrategyRun:
    """All trials of one strategy against a started target, with the server-side sampler on."""
    generator = Generator(
        config.seed,
        webhooks=config.webhooks,
        first_event=config.first_event,
        jitter_ms=config.jitter_ms if config.mode == "jitter" else 0.0,
    )
    run = StrategyRun(strategy)
    run.since = await asyncio.to_thread(oracle.baseline, oracle_url)
    is_blocked = BlockedProbe(pool)
    semaphore = asyncio.Semaphore(config.concurrency)

    async def guarded(trial: int) -> None:
        async with semaphore:
            try:
                await run_trial(config, target, gateway, generator, trial, run, is_blocked)
            except UsageError:
                raise
            except Exception as exc:  # one broken trial must not hide the others' verdicts
                run.trial_errors.append(f"trial {trial}: {type(exc).__name__}: {exc}")
            on_trial()

    nemesis = Nemesis.from_spec(config.nemesis, gateway=gateway, dsn=oracle_url, seed=config.seed)
    started = time.perf_counter()
    async with LockWatch(oracle_url) as watch, nemesis:
        await asyncio.gather(*(guarded(t) for t in range(config.trials)))
    run.duration_s = time.perf_counter() - started
    run.server_side = watch.result.to_json()
    if config.nemesis:
        run.nemesis = {**nemesis.report(), "webhooks_redelivered": run.redelivered}
    return run


def oracle_config(config: RunConfig) -> oracle.OracleConfig:
    if config.oracle_config is None:
        return oracle.OracleConfig.reference()
    try:
        return oracle.OracleConfig.from_toml(config.oracle_config)
    except oracle.OracleError as exc:
        raise UsageError(str(exc)) from exc


async def judge(
    config: RunConfig, run: StrategyRun, gateway: GatewayControl, oracle_url: str
) -> dict[str, Any]:
    """Observe with the oracle and check. Called after the target stopped when payrace
    started it: its backends have exited and flushed their counters (deadlocks)."""
    assert run.since is not None
    payments = {o.payment_id: o.trial for o in run.outcomes.values()}
    counters = await asyncio.to_thread(gateway.counters)
    obs = await asyncio.to_thread(
        oracle.observe,
        oracle_url,
        oracle_config(config),
        since=run.since,
        payment_ids=set(payments),
        gateway_counters=counters,
        # Also the ids the database never recorded: a capture the gateway accepted in a
        # transaction that then rolled back is exactly what no_lost_capture is for.
        gateway_payment_ids=[o.gateway_payment_id for o in run.outcomes.values()],
    )
    verdict = checker.check(run.history.ops(), obs)
    valid = verdict.valid
    if run.trial_errors and valid is True:
        valid = "unknown"
    violating = sorted(payments[p] for p in verdict.violating_payments if p in payments)
    first = None
    if violating:
        outcome = run.outcomes[violating[0]]
        timeline = outcome.timeline or from_audit(obs.audit, outcome.payment_id)
        first = {
            "trial": outcome.trial,
            "payment": outcome.payment_id,
            "checks": [n for n, r in verdict.results.items() if r.valid is False],
            "timeline": [e.to_json() for e in timeline],
        }
    duration = run.duration_s
    faults = {"nemesis": run.nemesis} if run.nemesis is not None else {}
    return {
        "expected": DECLARED.get(run.strategy),
        "valid": valid,
        "trials": config.trials,
        "violating_trials": len(violating),
        "trials_per_second": round(config.trials / duration, 2) if duration else 0.0,
        "duration_s": round(duration, 3),
        "pause_timeouts": run.pause_timeouts,
        "trial_errors": {"count": len(run.trial_errors), "first": run.trial_errors[:3]},
        "checks": {name: r.to_json() for name, r in verdict.results.items()},
        "latency_ms": run.latency.summary(),
        "plots": run.latency.plots(),
        "server_side": run.server_side,
        "arrival_spread_ms": run.arrival.summary() if config.mode == "aligned" else None,
        "first_violation": first,
        **faults,
        "_history": run.history,
    }


def _pauses_over_http(replies: list[Reply]) -> int:
    """Check the target honoured X-Payrace-Pause; count the pauses that gave up waiting."""
    states = [r.headers.get("x-payrace-pause") for r in replies if r.status is not None]
    if any(state is None for state in states):
        raise UsageError(
            "the target ignored X-Payrace-Pause, so nothing was forced: start it with "
            "PAYRACE_PROBES=1 (test deployments only), or use --mode aligned"
        )
    return sum(state == "timed-out" for state in states)


def overall(strategies: dict[str, dict[str, Any]], gates: list[dict[str, Any]]) -> tuple[str, int]:
    if any(r["valid"] is False for r in strategies.values()):
        return "violated", 1
    # Not proven is not passed: a CI gate must not go green on "unknown".
    if any(r["valid"] is not True for r in strategies.values()):
        return "unknown", 1
    if any(not g["passed"] for g in gates):
        return "gate_breached", 1
    return "valid", 0


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
        external = config.target not in ("inproc", "http")
        target_db: Database | None = None
        db_info: dict[str, Any]
        if external:
            assert config.target_dsn is not None and config.gateway_url is not None
            oracle_url = config.target_dsn
            db_info = {"route": "target", "describe": "the target's own database (--target-dsn)"}
            remote = RemoteGateway(config.gateway_url)
            stack.callback(remote.close)
            gateway: GatewayControl = remote
            gateway_url = config.gateway_url
        else:
            db = stack.enter_context(
                provide_postgres(config.dsn, durable=config.durable, announce=announce)
            )
            target_db = db
            oracle_url = db.url
            db_info = {
                "route": db.route,
                "server_version": db.server_version,
                "fast": db.fast,
                "describe": db.describe(),
            }
            fake = FakeRazorpay(GatewayKeys(), seed=config.seed)
            server = stack.enter_context(GatewayServer(fake))
            gateway, gateway_url = LocalGateway(fake), server.url
        pool = await asyncpg.create_pool(
            oracle_url,
            min_size=1,
            max_size=4,
            server_settings={"application_name": "payrace-harness"},
        )
        stack.push_async_callback(pool.close)
        if target_db is not None:
            # The service creates its tables on start; the oracle needs them first.
            await _create_schema(target_db)
        try:
            await asyncio.to_thread(oracle.install, oracle_url, oracle_config(config))
        except oracle.OracleError as exc:
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
            results[strategy] = await judge(config, fired, gateway, oracle_url)
    gates = [
        g.judge(name, result)
        for g in config.gates
        for name, result in results.items()
        if g.strategy in (None, name)
    ]
    verdict, code = overall(results, gates)
    return {
        "run_id": config.run_id,
        "command": config.command,
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - started, 3),
        "machine": machine(),
        "database": db_info,
        "target": config.target,
        "mode": config.mode,
        "trials": config.trials,
        "seed": config.seed,
        "webhooks_per_trial": config.webhooks,
        "isolation_level": config.isolation,
        "hold_ms": config.hold_ms,
        "strategies": results,
        "gates": gates,
        "verdict": verdict,
        "exit_code": code,
    }


async def _create_schema(db: Database) -> None:
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
                fh.write(json.dumps(op.to_json(), separators=(",", ":")) + "\n")
