"""The target a strategy's trials run against, started and stopped around them.

Target         a started target: its client, and whether it runs in this process; what
               payrace owns of it (the database server, the service process) for the
               nemeses that restart them; reconcile(), the reference service's own sweep
start_target() `inproc` (the reference service in this event loop), `http` (the reference
               service in its own uvicorn process) or a running service's URL

Under a nemesis the reference service payrace starts sweeps its capture intents soon after
the trials (reconcile()), instead of RECONCILE_AFTER_S into its life: a capture the gateway
took whose every attempt died (a killed backend, a restart) is then recorded before the
oracle judges, as the sweeper would record it in production.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from payrace.harness.infra.processes import ServiceProcess, service_env
from payrace.harness.infra.provider import Cluster, Database
from payrace.harness.model.client import AsgiClient, Client, HttpClient
from payrace.harness.model.profile import Hook, Profile
from payrace.harness.runner.config import RunConfig
from payrace.service.app import create_app
from payrace.service.errors import connection_lost
from payrace.service.reconcile import reconcile_once
from payrace.service.settings import Settings

# The uvicorn service's sweeper under a nemesis: every RECONCILE_INTERVAL_S, for intents older
# than RECONCILE_AFTER_S (a request in flight is never swept from under itself).
RECONCILE_INTERVAL_S = 0.25
RECONCILE_AFTER_S = 1.0


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
        reconcile: Callable[[], Awaitable[int | None]] | None = None,
    ) -> None:
        self.name = name
        self.client = client
        self.in_process = in_process
        self.profile = profile or Profile.reference()
        self.hook: Hook | None = self.profile.before_send()
        self.cluster = cluster  # the PostgreSQL server payrace started, if it can restart it
        self.process = process  # the service process payrace started (--target http)
        self._reconcile = reconcile
        # Awaited before a trial starts: a nemesis that restarts a part sets it (trials).
        self.steady: Callable[[], Awaitable[None]] = _at_once

    async def reconcile(self) -> int | None:
        """The reference service's capture-intent sweep, now: how many payments it recorded
        captured (None when that is not known: a running target sweeps on its own)."""
        return None if self._reconcile is None else await self._reconcile()


async def _at_once() -> None:
    return None


@asynccontextmanager
async def start_target(
    config: RunConfig, strategy: str, db: Database | None, gateway_url: str
) -> AsyncIterator[Target]:
    """Start what `config.target` names; `db` is None for a running target (its own DB)."""
    profile = config.target_profile()
    keys = profile.keys
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

        async def sweep() -> int:
            # On the sweeper's own unpooled connections, as its timer would: the pools may
            # still hold connections the nemesis killed (the capture path retries those).
            for attempt in range(1, 4):
                try:
                    swept = await reconcile_once(
                        runtime.runner, older_than_s=0, bookkeeping=runtime.sweeper.bookkeeping
                    )
                    return len(swept.captured)
                except Exception as exc:
                    if attempt == 3 or not connection_lost(exc):
                        raise
            raise AssertionError("unreachable")  # pragma: no cover

        try:
            yield Target(
                strategy,
                client,
                in_process=True,
                profile=profile,
                cluster=db.cluster,
                reconcile=sweep if config.nemesis else None,
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
            pool_size=max(10, config.concurrency * 4),
        )
        if config.nemesis:
            env["RECONCILE_INTERVAL_S"] = str(RECONCILE_INTERVAL_S)
            env["RECONCILE_AFTER_S"] = str(RECONCILE_AFTER_S)
        log = config.out_dir / config.run_id / f"service-{strategy}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with ServiceProcess(env, log_path=log) as proc:
            http = HttpClient(proc.url)

            async def swept() -> int:
                # Long enough for a sweep to find every intent due; the service logs each
                # payment it records (payrace.service.reconcile).
                await asyncio.sleep(RECONCILE_AFTER_S + 2 * RECONCILE_INTERVAL_S + 0.25)
                return _reconciled_in(log)

            try:
                yield Target(
                    strategy,
                    http,
                    in_process=False,
                    profile=profile,
                    cluster=db.cluster,
                    process=proc,
                    reconcile=swept if config.nemesis else None,
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


_RECONCILED = re.compile(r"reconciled payment (\d+)")


def _reconciled_in(log: Path) -> int:
    """Payments the service's sweeper recorded captured, from its log (one line each)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0
    return len(set(_RECONCILED.findall(text)))
