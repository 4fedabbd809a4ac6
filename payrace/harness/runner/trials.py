"""Firing the trials of one strategy: each trial a payment raced by its requests.

StrategyRun      everything one strategy's trials produce (history, latencies, outcomes)
fire_trials()    all trials against a started target, lock waits sampled, nemesis on
run_trial()      one trial: create the order, authorize at the gateway, fire, record
_fire()          how the requests are released, by mode:
  forced           --force locks: the harness's own row locks and gateway holds, let go in
                   capture order once every request waits on them (runner.forcing; nothing
                   asked of the target); --force pause: a pause after the payment read holds
                   each request until every other request of the trial has read too, has
                   finished, or waits on a lock (pg_blocking_pids); in-process through
                   service probes' Rendezvous, over HTTP via X-Payrace-Pause
  aligned          released together: an asyncio gate in-process, last-byte sync over
                   HTTP; the arrival spread is measured from the target's own stamps
  jitter           seeded random offsets per request
_redeliver()     webhooks answered with a 5xx sent again, as Razorpay does (nemesis only);
                 callbacks too, as a customer reloading the page (--callback-reloads)
Liveness         a target that stopped answering (STOP_AFTER trials in a row without any
                 HTTP answer: killed, crashed) stops the run early with the cause, instead
                 of a long tail of failed trials judged as if they had raced
_retry_conflicts()  a 409 with Retry-After sent again (boundedly), as a browser's retry or
                 Razorpay's redelivery would: what nowait / skip_locked losers answer
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import asyncpg
import httpx

from payrace.harness.errors import UsageError
from payrace.harness.gateway.controls import GatewayControl
from payrace.harness.model import oracle
from payrace.harness.model.checker import CAPTURE_EVENTS
from payrace.harness.model.client import PaymentContext, Prepared, Reply, prepare
from payrace.harness.model.deadlocks import LockCycle
from payrace.harness.model.generator import Generator, TrialPlan
from payrace.harness.model.history import History, Operation, classify
from payrace.harness.model.lockwatch import CONNECTION_LOST, LockWatch, WaitEpisode
from payrace.harness.model.nemesis import Nemesis
from payrace.harness.model.profile import Profile, foreign_order
from payrace.harness.model.stats import LatencyHistogram, PathHistograms
from payrace.harness.reports.timeline import TimelineEvent, from_probes
from payrace.harness.runner.config import RunConfig, oracle_config
from payrace.harness.runner.forcing import LockForcing, on_gateway
from payrace.harness.runner.target import Target
from payrace.service.instrument import probes


class BlockedProbe:
    """The harness's own view of "is this backend waiting for a lock?" (its own pool)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def __call__(self, pid: int) -> bool:
        # A pooled connection killed by a nemesis or a restart is replaced on the next
        # acquire: ask again rather than fail the trial over the harness's own connection.
        for attempt in range(1, 4):
            try:
                async with self.pool.acquire() as conn:
                    query = "SELECT cardinality(pg_blocking_pids($1)) > 0"
                    return bool(await conn.fetchval(query, pid))
            except CONNECTION_LOST:
                if attempt == 3:
                    raise
                await asyncio.sleep(0.05 * attempt)
        raise AssertionError("unreachable")  # pragma: no cover


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
    forced: bool  # forced mode held every request as meant, no wait given up on
    # For the timeline's times and <waiting> rows (reports.timeline.from_waits): the trial's
    # monotonic start and end, and which backend served which request (in-process only).
    window: tuple[int, int] = (0, 0)
    backends: dict[int, str] = field(default_factory=dict)
    unanswered: str | None = None  # no request of the trial got any answer: why


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
        self.reloaded = 0  # client callbacks sent again after a 5xx (--callback-reloads)
        self.conflicts = 0  # answers 409 (retryable: a lock not taken, a serialisation failure)
        self.conflict_retries = 0  # of those, sent again (_retry_conflicts)
        # Attempts the target aborted and retried itself, as its Server-Timing says.
        self.retried_inside = {"serialization": 0, "deadlock": 0, "timeout": 0}
        # Wait-for cycles the lock sampler saw (model.deadlocks ties them to trials).
        self.lock_cycles: list[LockCycle] = []
        # Every lock wait the sampler saw, and its poll interval (timelines' <waiting> rows).
        self.lock_waits: list[WaitEpisode] = []
        self.lock_poll_ms = 0.0
        # Backends of --force locks barriers: a request waiting on one waits for payrace.
        self.barrier_pids: set[int] = set()
        # Set when the target stopped answering mid-run: the cause, and the run stopped.
        self.target_stopped: str | None = None

    def trials_done(self) -> int:
        """Trials that were carried out: the target answered at least one of their requests."""
        return sum(o.unanswered is None for o in self.outcomes.values())


# Trials in a row that got no HTTP answer at all before the run gives up on the target:
# enough that a blip (a restart the nemesis made, a full accept queue) is ridden out.
STOP_AFTER = 10


class Liveness:
    """Whether the target still answers, judged from whole trials in the order they end."""

    def __init__(self, stop_after: int = STOP_AFTER) -> None:
        self.stop_after = stop_after
        self.silent = 0  # trials in a row without an answer
        self.last_answered: int | None = None
        self.stopped: str | None = None

    def answered(self, trial: int) -> None:
        self.silent = 0
        self.last_answered = trial if self.last_answered is None else max(self.last_answered, trial)

    def unanswered(self, trial: int, why: str, planned: int) -> None:
        self.silent += 1
        if self.silent >= self.stop_after and self.stopped is None:
            after = (
                f"after trial {self.last_answered}"
                if self.last_answered is not None
                else "before any trial"
            )
            self.stopped = (
                f"the target stopped answering {after}: {why} ({self.silent} trials in a "
                f"row without an answer; the run stopped early, of {planned} planned trials)"
            )


def _connection_failure(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError | OSError)


def _no_answer(replies: list[Reply]) -> str | None:
    """Why none of a trial's requests was answered, or None when one was."""
    if not replies or any(r.status is not None for r in replies):
        return None
    return replies[0].error or "no answer"


async def _fire(
    config: RunConfig,
    target: Target,
    plan: TrialPlan,
    reqs: list[Prepared],
    ctx: PaymentContext,
    run: StrategyRun,
    is_blocked: BlockedProbe,
    forcing: LockForcing | None,
) -> tuple[list[Reply], list[Operation], dict[str, probes.ProbeContext], int, bool]:
    steps = plan.steps
    captured: dict[str, probes.ProbeContext] = {}
    if forcing is not None:
        return await _fire_locked(target, plan, reqs, ctx, run, forcing)
    if config.mode == "aligned":
        invokes = [
            run.history.invoke(req.f, step.process, plan.trial, ctx.payment_id, req.value)
            for step, req in zip(steps, reqs, strict=True)
        ]
        if not target.in_process:
            return await target.client.send_together(reqs), invokes, captured, 0, False
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
        return list(await asyncio.gather(*tasks)), invokes, captured, 0, False

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
    forced = config.mode == "forced" and rendezvous.timeouts == 0
    return replies, [invoked[i] for i in range(len(reqs))], captured, rendezvous.timeouts, forced


async def _fire_locked(
    target: Target,
    plan: TrialPlan,
    reqs: list[Prepared],
    ctx: PaymentContext,
    run: StrategyRun,
    forcing: LockForcing,
) -> tuple[list[Reply], list[Operation], dict[str, probes.ProbeContext], int, bool]:
    """Forced by the harness's own locks and gateway holds (runner.forcing)."""
    captured: dict[str, probes.ProbeContext] = {}
    recorder = Recorder()

    async def send(i: int) -> Reply:
        if not target.in_process:
            return await target.client.send(reqs[i])
        # In-process the requests pass a recorder, so a violating trial's timeline names who
        # did what; nothing holds them there.
        with probes.controlled(recorder, plan.steps[i].process) as probe:
            reply = await target.client.send(reqs[i])
        captured[plan.steps[i].process] = probe
        return reply

    async with forcing.trial(ctx.payment_id, ctx.gateway_payment["id"]) as barrier:
        run.barrier_pids.add(barrier.pid)
        invokes = [
            run.history.invoke(req.f, step.process, plan.trial, ctx.payment_id, req.value)
            for step, req in zip(plan.steps, reqs, strict=True)
        ]
        replies = await barrier.run([partial(send, i) for i in range(len(reqs))])
    return replies, invokes, captured, barrier.timeouts, barrier.forced


async def run_trial(
    config: RunConfig,
    target: Target,
    gateway: GatewayControl,
    generator: Generator,
    trial: int,
    run: StrategyRun,
    is_blocked: BlockedProbe,
    forcing: LockForcing | None = None,
) -> None:
    plan = generator.plan(trial)
    order = await _create_order(target, gateway, config.amount)
    try:
        payment = await on_gateway(gateway, gateway.authorize, order["gateway_order_id"])
    except Exception as exc:
        said = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        raise UsageError(foreign_order(order["gateway_order_id"], said)) from None
    if any(step.event in CAPTURE_EVENTS for step in plan.steps):
        # Razorpay sends payment.captured / order.paid only for a payment it has captured
        # (its automatic capture): the gateway's state comes first, as in the wild, so a
        # target trusting the event is never told of a capture that did not happen.
        payment = await on_gateway(gateway, gateway.auto_capture, payment["id"])
    ctx = PaymentContext(
        order["payment_id"], order["gateway_order_id"], payment, amount=config.amount
    )
    reqs = [prepare(step, i, ctx, target.profile, target.hook) for i, step in enumerate(plan.steps)]
    started_ns = time.monotonic_ns()
    replies, invokes, captured, timeouts, forced = await _fire(
        config, target, plan, reqs, ctx, run, is_blocked, forcing
    )
    window = (started_ns, time.monotonic_ns())
    _setup_mistakes(plan, reqs, replies, target.profile)
    if config.mode == "forced" and config.force == "pause" and not target.in_process:
        timeouts += _pauses_over_http(replies)
        forced = forced and timeouts == 0
    received: list[int] = []
    for step, inv, reply in zip(plan.steps, invokes, replies, strict=True):
        server = _complete(run, inv, reply)
        path = "client" if step.kind == "verify" else "webhook"
        for kind in ("lock", "hold"):
            if kind in server:
                run.latency.record(kind, path, float(server[kind]))
        if "received_at_ns" in server:
            received.append(int(server["received_at_ns"]))
    replies = await _retry_conflicts(target, plan, reqs, replies, ctx, run)
    if config.nemesis or config.callback_reloads:
        await _redeliver(config, target, plan, reqs, replies, ctx, run)
    spread = (max(received) - min(received)) / 1e6 if len(received) > 1 else None
    if spread is not None and config.mode == "aligned":
        run.arrival.record_ms(spread)
    run.pause_timeouts += timeouts
    backends = {p.backend_pid: name for name, p in captured.items() if p.backend_pid is not None}
    run.outcomes[trial] = TrialOutcome(
        trial,
        ctx.payment_id,
        payment["id"],
        spread,
        from_probes(captured),
        timeouts,
        forced,
        window,
        backends,
        unanswered=_no_answer(replies),
    )


def _complete(run: StrategyRun, invoke: Operation, reply: Reply) -> dict[str, Any]:
    """Record the answer to `invoke`; return what the target said about itself."""
    server = reply.server()
    for kind in run.retried_inside:
        run.retried_inside[kind] += int(server.get(kind, 0))
    run.history.complete(
        invoke,
        classify(reply.status),
        value=reply.body,
        status=reply.status,
        error=reply.error,
        server=server,
    )
    return server


# Razorpay retries a webhook for 24 hours; a run cannot wait that long, but a capture the
# gateway made and announced must not be judged lost because a burst of faults swallowed a
# few attempts: 8 attempts, backing off from 20 ms to ~2.5 s (about 5 s in all).
REDELIVERIES = 8
# A browser retries a 409 a few times, Razorpay for 24 hours; a trial needs only that the
# retry comes after the winner committed. Retry-After is honoured scaled down to this cap, so
# a thousand trials do not sleep a second each.
CONFLICT_RETRIES = 3
CONFLICT_WAIT_CAP_S = 0.02


async def _retry_conflicts(
    target: Target,
    plan: TrialPlan,
    reqs: list[Prepared],
    replies: list[Reply],
    ctx: PaymentContext,
    run: StrategyRun,
) -> list[Reply]:
    """Every request answered 409 with Retry-After is sent again (the same request, the same
    event id), up to CONFLICT_RETRIES times; each retry is its own operation. Returns the
    last answer of each request."""
    last = list(replies)
    for i, (step, req) in enumerate(zip(plan.steps, reqs, strict=True)):
        attempt = 0
        while last[i].status == 409:
            run.conflicts += 1
            if "retry-after" not in {k.lower() for k in last[i].headers} or (
                attempt == CONFLICT_RETRIES
            ):
                break
            attempt += 1
            await asyncio.sleep(min(_retry_after_s(last[i]), CONFLICT_WAIT_CAP_S * attempt))
            value = {**req.value, "retry": attempt}
            inv = run.history.invoke(req.f, step.process, plan.trial, ctx.payment_id, value)
            last[i] = await target.client.send(req)
            _complete(run, inv, last[i])
            run.conflict_retries += 1
    return last


def _retry_after_s(reply: Reply) -> float:
    said = next((v for k, v in reply.headers.items() if k.lower() == "retry-after"), "1")
    try:
        return max(0.0, float(said))
    except ValueError:  # an HTTP date: not worth parsing for a capped wait
        return 1.0


async def _redeliver(
    config: RunConfig,
    target: Target,
    plan: TrialPlan,
    reqs: list[Prepared],
    replies: list[Reply],
    ctx: PaymentContext,
    run: StrategyRun,
) -> None:
    """Razorpay delivers a webhook at least once: one answered with a 5xx, or not at all, is
    sent again with the same event id, as Razorpay's retries would. Only under the nemesis,
    whose faults make a retryable 503 the right answer; each redelivery is its own operation.
    A client callback answered so is sent again `config.callback_reloads` times, as a customer
    reloading the return page would (the same Checkout fields), each its own operation too."""
    for step, req, reply in zip(plan.steps, reqs, replies, strict=True):
        if req.f == "webhook":
            limit, key = (REDELIVERIES if config.nemesis else 0), "redelivery"
        elif req.f == "verify":
            limit, key = config.callback_reloads, "reload"
        else:
            continue
        attempt = 0
        while reply.status is None or reply.status >= 500:
            if attempt == limit:
                break
            attempt += 1
            await asyncio.sleep(0.01 * 2**attempt)
            # Razorpay keeps trying for 24 hours; the run waits for a restarted target instead.
            await target.steady()
            value = {**req.value, key: attempt}
            inv = run.history.invoke(req.f, step.process, plan.trial, ctx.payment_id, value)
            reply = await target.client.send(req)
            _complete(run, inv, reply)
            if req.f == "webhook":
                run.redelivered += 1
            else:
                run.reloaded += 1


async def _create_order(
    target: Target, gateway: GatewayControl, amount: int, attempts: int = 40
) -> dict[str, Any]:
    """The profile's create-order request, again after a 503 database_unavailable (a killed
    backend under the nemesis): the answer says to retry, and the order is setup, not the race
    under test. With `by = "payrace"` the order is created at the fake gateway first. Many
    quick attempts (at most 50 ms apart, about 2 s of pauses in all): a backend killed every
    10 ms (kill-backends:0.01) kills most order transactions, while a database that is down
    must not park every trial for long. None once the service process payrace started has
    exited (killed, crashed) and no restart is under way."""
    gateway_order_id = None
    if target.profile.create_order.by == "payrace":
        order = await on_gateway(gateway, gateway.create_order, amount, "INR")
        gateway_order_id = str(order["id"])
    for attempt in range(1, attempts + 1):
        try:
            return await target.client.create_order(
                amount, "INR", target.profile, gateway_order_id, target.hook
            )
        except (RuntimeError, httpx.TransportError) as exc:
            outage = isinstance(exc, httpx.TransportError) or "database_unavailable" in str(exc)
            if attempt == attempts or not outage:
                raise
            await target.steady()  # a restart the nemesis made: wait until it is back
            if target.process is not None and target.process.exited():
                # The service payrace started is gone and nothing restarts it: the ~2 s of
                # attempts would only delay the run's stop (Liveness) by that much per trial.
                raise
            await asyncio.sleep(min(0.01 * attempt, 0.05))
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

    forcing = None
    if config.mode == "forced" and config.force == "locks":
        forcing = LockForcing(
            oracle_url,
            oracle_config(config),
            gateway,
            timeout_s=config.pause_timeout_s,
            concurrency=config.concurrency,
        )

    liveness = Liveness()

    async def guarded(trial: int) -> None:
        async with semaphore:
            if liveness.stopped is not None:
                return  # the target is gone: the trials left are not run
            await target.steady()  # not while a part the nemesis restarts is down
            try:
                await run_trial(config, target, gateway, generator, trial, run, is_blocked, forcing)
            except UsageError:
                raise
            except Exception as exc:  # one broken trial must not hide the others' verdicts
                said = f"{type(exc).__name__}: {exc}"
                run.trial_errors.append(f"trial {trial}: {said}")
                if _connection_failure(exc):
                    liveness.unanswered(trial, said, config.trials)
                else:  # answered, if not as hoped: the target is there
                    liveness.silent = 0
            else:
                why = run.outcomes[trial].unanswered
                if why is None:
                    liveness.answered(trial)
                else:
                    liveness.unanswered(trial, why, config.trials)
            on_trial()

    nemesis = Nemesis.from_spec(
        config.nemesis,
        gateway=gateway,
        dsn=oracle_url,
        seed=config.seed,
        history=run.history,
        cluster=target.cluster,
        service=target.process,
    )
    target.steady = nemesis.steady
    started = time.perf_counter()
    async with LockWatch(oracle_url) as watch, nemesis, AsyncExitStack() as stack:
        if forcing is not None:
            await stack.enter_async_context(forcing)
        await asyncio.gather(*(guarded(t) for t in range(config.trials)))
    run.duration_s = time.perf_counter() - started
    run.target_stopped = liveness.stopped
    run.server_side = watch.result.to_json()
    run.lock_cycles = watch.result.cycles
    run.lock_waits = watch.result.episodes_seen
    run.lock_poll_ms = watch.result.interval_ms
    if config.nemesis:
        run.nemesis = {**nemesis.report(), "webhooks_redelivered": run.redelivered}
    return run


def _setup_mistakes(
    plan: TrialPlan, reqs: list[Prepared], replies: list[Reply], profile: Profile
) -> None:
    """An answer that says the setup is wrong (a route the target does not serve, a refused
    signature: Profile.setup_mistake) ends the run as a usage error, not as a bug."""
    for step, req, reply in zip(plan.steps, reqs, replies, strict=True):
        action = "callback" if step.kind == "verify" else "webhook"
        mistake = profile.setup_mistake(action, req.method, req.path, reply.status, reply.body)
        if mistake is not None:
            raise UsageError(mistake)


def _pauses_over_http(replies: list[Reply]) -> int:
    """Check the target honoured X-Payrace-Pause; count the pauses that gave up waiting."""
    # A 5xx may come from the server in front of the app (a crash), which adds no header: the
    # handshake is judged on the answers the app itself gave.
    states = [
        r.headers.get("x-payrace-pause") for r in replies if r.status is not None and r.status < 500
    ]
    if any(state is None for state in states):
        raise UsageError(
            "the target ignored X-Payrace-Pause, so nothing was forced: use --force locks "
            "(payrace then holds the trial's rows in the target's database and its capture "
            "calls at the fake gateway; nothing is needed from the target), or --mode aligned"
        )
    return sum(state == "timed-out" for state in states)
