"""What the explorer drives in its own event loop: the reference service, or a team's app.

EngineEvents      what a target may report per request (SQL statements, commits, errors)
ExploreTarget     what explore.engine asks of a target: start it (an ASGI app), stop it,
                  its name and isolation for schedule ids, its profile (routes, keys,
                  oracle tables), its step model, whether its requests name their backends
ReferenceTarget   the reference service (payrace.service) for one strategy and isolation
                  level: its own step table (explore.steps.predict), what its capture pool
                  runs (sql.Observer: the capture and the webhook's payment lookup) and
                  its SQLAlchemy engine's events (the other routes), backends named by
                  its probes
(AppTarget, a team's ASGI app built by module:factory: explore.app)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext

from payrace.harness.explore.scenario import ScenarioError, normalise_isolation
from payrace.harness.explore.steps import StepModel
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.model.profile import Profile
from payrace.postgres import dialect_url
from payrace.service.app import Runtime, create_app
from payrace.service.settings import Settings
from payrace.service.sql import Observer
from payrace.service.strategies import UnknownStrategy, resolve


class EngineEvents(Protocol):
    """Called in the request's own task (the probe's ContextVar names the request)."""

    def on_statement(self, statement: str) -> None: ...

    def on_commit(self) -> None: ...

    def on_error(self, message: str) -> None: ...


class ExploreTarget(Protocol):
    name: str  # the first word of a schedule id: a strategy, or the app's name
    isolation: str  # as ids and reports say it; "app" when the app keeps its own
    profile: Profile
    model: StepModel | None  # None: the reference table (explore.steps.predict)
    lock_rows: bool  # for the reference table: the payment read takes a lock
    exact_pids: bool  # every request names its backend before it can wait

    async def start(self, db_url: str, gateway_url: str, events: EngineEvents) -> Any:
        """Start the target against this database and fake gateway; its ASGI app."""
        ...

    async def stop(self) -> None:
        """Stop it; its database connections are closed when this returns."""
        ...


class ReferenceTarget:
    """The reference service in-process, one strategy at one isolation level."""

    model: StepModel | None = None
    exact_pids = True  # capture.py records the backend before its first statement can wait

    def __init__(self, strategy: str, isolation: str, keys: GatewayKeys = GatewayKeys()) -> None:
        try:
            chosen = resolve(strategy)
        except UnknownStrategy as exc:
            raise ScenarioError(str(exc)) from None
        self.name = strategy
        # A strategy that always runs at one level (serializable) is explored at that level:
        # the step table's commutations depend on it (explore.steps.dependent).
        self.isolation = normalise_isolation(chosen.isolation_level or isolation)
        self.keys = keys
        self.profile = replace(Profile.reference(), keys=keys)
        # Whether the payment read takes a lock: FOR UPDATE, or the advisory lock before it.
        # A strategy this table does not know is assumed to lock (the guard tells if not).
        self.lock_rows = bool(
            getattr(chosen, "lock_rows", True) or getattr(chosen, "advisory", False)
        )
        self._runtime: Runtime | None = None

    async def start(self, db_url: str, gateway_url: str, events: EngineEvents) -> Any:
        settings = Settings(
            database_url=dialect_url(db_url, "asyncpg"),
            capture_strategy=self.name,
            isolation_level=self.isolation,
            razorpay_key_id=self.keys.key_id,
            razorpay_key_secret=self.keys.key_secret,
            razorpay_webhook_secret=self.keys.webhook_secret,
            razorpay_base_url=gateway_url,
            db_pool_size=10,
        )
        app = create_app(settings)
        self._runtime = app.state.runtime
        await self._runtime.startup()  # creates the tables the oracle then watches

        # The capture path and the webhook's payment lookup run on asyncpg directly
        # (payrace.service.sql), the other routes on SQLAlchemy: both are what the requests
        # did. The
        # capture intents' pool is not watched: an intent commutes with every step of every
        # other request (capture.Runner.intents).
        self._runtime.runner.db.observers.append(_Relay(events))

        def on_statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            events.on_statement(statement)

        def on_error(context: ExceptionContext) -> None:
            exc: BaseException | None = context.original_exception
            cause = exc.__cause__ if exc is not None and exc.__cause__ is not None else exc
            events.on_error(_message(cause))

        engine = self._runtime.engine.sync_engine
        event.listen(engine, "before_cursor_execute", on_statement)
        event.listen(engine, "commit", lambda conn: events.on_commit())
        event.listen(engine, "handle_error", on_error)
        return app

    async def stop(self) -> None:
        if self._runtime is not None:
            # Closing the pool ends the service's backends, which flushes their deadlock
            # counters: the oracle's reading settles at once (see payrace.harness.model.oracle).
            await self._runtime.shutdown()
            self._runtime = None


class _Relay(Observer):
    def __init__(self, events: EngineEvents) -> None:
        self.events = events

    def on_statement(self, sql: str, args: Sequence[object]) -> None:
        self.events.on_statement(sql)

    def on_commit(self) -> None:
        self.events.on_commit()

    def on_error(self, exc: BaseException) -> None:
        self.events.on_error(_message(exc))


def _message(exc: BaseException | None) -> str:
    """The server's message (asyncpg's `.message`), first line: what the timeline prints."""
    return str(getattr(exc, "message", None) or exc or "error").splitlines()[0]


__all__ = ["EngineEvents", "ExploreTarget", "ReferenceTarget"]
