"""The target a strategy's trials run against, started and stopped around them.

Target         a started target: its client, whether it runs in this process, how it
               reconciles a capture whose answer was lost (runner.reconcile), and what
               payrace owns of it (the database server, the service process) for the
               nemeses that restart them
start_target() `inproc` (the reference service in this event loop), `http` (the reference
               service in its own uvicorn process) or a running service's URL

A capture the gateway took whose every attempt died (a killed backend, a restart) is
recorded by the service's reconciler; runner.reconcile gives it its chance before the oracle
judges.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from payrace.harness.infra.processes import ServiceProcess, service_env
from payrace.harness.infra.provider import Cluster, Database
from payrace.harness.model.client import AsgiClient, Client, HttpClient
from payrace.harness.model.profile import Hook, Profile
from payrace.harness.runner.config import RunConfig
from payrace.harness.runner.reconcile import HTTP_SWEEP, Reconciler, http_sweep_env

if TYPE_CHECKING:
    from payrace.service.app import Runtime


class Target:
    """A started target: a client to it, the profile its requests are shaped by, and whether
    it runs in this process (forced mode then reaches its pause points directly)."""

    def __init__(
        self,
        name: str,
        client: Client,
        *,
        in_process: bool,
        profile: Profile | None = None,
        cluster: Cluster | None = None,
        process: ServiceProcess | None = None,
        reconciler: Reconciler | None = None,
    ) -> None:
        self.name = name
        self.client = client
        self.in_process = in_process
        self.profile = profile or Profile.reference()
        self.hook: Hook | None = self.profile.before_send()
        self.cluster = cluster  # the PostgreSQL server payrace started, if it can restart it
        self.process = process  # the service process payrace started (--target http)
        # Awaited before a trial starts: a nemesis that restarts a part sets it (trials).
        self.steady: Callable[[], Awaitable[None]] = _at_once
        self.reconciler = reconciler or Reconciler(
            "polling the target's database: its own reconciliation, if it has one"
        )


async def _at_once() -> None:
    return None


def _in_process_reconciler(runtime: Runtime) -> Reconciler:
    """The reference service's sweep, run by the harness now rather than on its timer; none
    when RECONCILE_INTERVAL_S=0 turned the service's reconciler off."""
    from payrace.service.errors import connection_lost
    from payrace.service.reconcile import reconcile_once

    if runtime.settings.reconcile_interval_s <= 0:
        return Reconciler("polling only: the service's reconciler is off (RECONCILE_INTERVAL_S=0)")

    async def sweep() -> bool:
        # On the sweeper's own unpooled connections, as its timer would: the pools may still
        # hold connections a nemesis killed (the capture path retries those).
        for attempt in range(1, 4):
            try:
                report = await reconcile_once(
                    runtime.runner, older_than_s=0, bookkeeping=runtime.sweeper.bookkeeping
                )
                break
            except Exception as exc:
                if attempt == 3 or not connection_lost(exc):
                    raise
        # Another sweep can help after an error (it may clear) or a capture (a sweep takes a
        # batch of intents at a time); after neither it would find what this one found.
        return bool(report.errors or report.captured)

    return Reconciler("the service's reconcile sweep, run in-process (reconcile_once)", sweep)


def _http_sweep() -> tuple[dict[str, str], Reconciler]:
    """The sweeper settings of the service payrace starts: HTTP_SWEEP, each unless the
    environment sets it (RECONCILE_INTERVAL_S=0 keeps the reconciler off)."""
    env = http_sweep_env()
    settings = {k: os.environ.get(k, v) for k, v in HTTP_SWEEP.items()}
    if float(settings["RECONCILE_INTERVAL_S"]) <= 0:
        how = "polling only: the service's reconciler is off (RECONCILE_INTERVAL_S=0)"
    else:
        how = "the service's own sweeper (" + ", ".join(f"{k}={v}" for k, v in settings.items())
        how += ")"
    return env, Reconciler(how)


@asynccontextmanager
async def start_target(
    config: RunConfig, strategy: str, db: Database | None, gateway_url: str
) -> AsyncIterator[Target]:
    """Start what `config.target` names; `db` is None for a running target (its own DB)."""
    profile = config.target_profile()
    keys = profile.keys
    if config.target == "inproc":
        # The service's imports (FastAPI, SQLAlchemy, razorpay) only when it runs in-process.
        from payrace.service.app import create_app
        from payrace.service.settings import Settings

        assert db is not None
        settings = Settings(
            database_url=db.asyncpg_url(),
            capture_strategy=strategy,
            isolation_level=config.isolation,
            webhook_dedupe=config.webhook_dedupe,
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
            yield Target(
                strategy,
                client,
                in_process=True,
                profile=profile,
                cluster=db.cluster,
                reconciler=_in_process_reconciler(runtime),
            )
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
            # The pause handshake only when forced by it: under --force locks the service is
            # raced as a team's would be, with nothing of payrace's inside.
            probes=config.mode == "forced" and config.force == "pause",
            isolation_level=config.isolation,
            webhook_dedupe=config.webhook_dedupe,
            pool_size=max(10, config.concurrency * 4),
        )
        sweep_env, reconciler = _http_sweep()
        env.update(sweep_env)
        log = config.out_dir / config.run_id / f"service-{strategy}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with ServiceProcess(env, log_path=log) as proc:
            http = HttpClient(proc.url)

            try:
                yield Target(
                    strategy,
                    http,
                    in_process=False,
                    profile=profile,
                    cluster=db.cluster,
                    process=proc,
                    reconciler=reconciler,
                )
            finally:
                await http.aclose()
        return
    assert profile.base_url is not None  # RunConfig.validate: a running target has a URL
    http = HttpClient(profile.base_url, verify_tls=profile.verify_tls)
    try:
        yield Target(strategy, http, in_process=False, profile=profile)
    finally:
        await http.aclose()
