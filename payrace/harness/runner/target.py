"""The target a strategy's trials run against, started and stopped around them.

Target         a started target: its client, and whether it runs in this process
start_target() `inproc` (the reference service in this event loop), `http` (the reference
               service in its own uvicorn process) or a running service's URL
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from payrace.harness.infra.processes import ServiceProcess, service_env
from payrace.harness.infra.provider import Database
from payrace.harness.model.client import AsgiClient, Client, HttpClient
from payrace.harness.model.profile import Hook, Profile
from payrace.harness.runner.config import RunConfig
from payrace.service.app import create_app
from payrace.service.settings import Settings


class Target:
    """A started target: a client to it, the profile its requests are shaped by, and whether
    it runs in this process (forced mode then reaches its pause points directly)."""

    def __init__(
        self, name: str, client: Client, *, in_process: bool, profile: Profile | None = None
    ) -> None:
        self.name = name
        self.client = client
        self.in_process = in_process
        self.profile = profile or Profile.reference()
        self.hook: Hook | None = self.profile.before_send()


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
            yield Target(strategy, client, in_process=True, profile=profile)
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
        log = config.out_dir / config.run_id / f"service-{strategy}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with ServiceProcess(env, log_path=log) as proc:
            http = HttpClient(proc.url)
            try:
                yield Target(strategy, http, in_process=False, profile=profile)
            finally:
                await http.aclose()
        return
    assert profile.base_url is not None  # RunConfig.validate: a running target has a URL
    http = HttpClient(profile.base_url, verify_tls=profile.verify_tls)
    try:
        yield Target(strategy, http, in_process=False, profile=profile)
    finally:
        await http.aclose()
