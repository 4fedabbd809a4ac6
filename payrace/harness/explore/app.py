"""A team's own ASGI app as the explorer's target: `payrace explore --app module:factory`.

    ENVIRONMENT     what payrace exports before it imports the module and calls the factory
    load_app()      module:factory -> an ASGI app; every mistake is a UsageError naming the fix
    Lifespan        the ASGI lifespan protocol around the app: startup before the first
                    request (the app opens its pool, creates its tables), shutdown after
    AppTarget       explore.targets' ExploreTarget for an app: environment, factory,
                    lifespan; opaque step model (explore.steps); its requests' backends
                    found from the database (explore.waits)

The app runs in payrace's own event loop and its requests are sent through httpx's
ASGITransport, in the task that sends them, so the ContextVar that `payrace.pause()` reads
reaches the app's code: no header, no middleware, no port.

The environment contract. The factory is called with no arguments; the app reads its
settings from the environment, as in production. Before importing the module payrace sets:

    PAYRACE_TARGET_DSN               the database the app must use (postgresql://…; the
                                     oracle's audit triggers are installed there)
    PAYRACE_GATEWAY_URL              the fake Razorpay (http://127.0.0.1:PORT; the SDK's
                                     base_url, its paths start with /v1)
    PAYRACE_RAZORPAY_KEY_ID, PAYRACE_RAZORPAY_KEY_SECRET, PAYRACE_RAZORPAY_WEBHOOK_SECRET
                                     the keys the fake gateway accepts and payrace signs with:
                                     the profile's [keys] (docs/profile.md)

A profile whose [keys] name environment variables (`key_secret_env = "SHOP_KEY_SECRET"`)
finds them set already (payrace reads the keys from them), so an app reading its own
variables only needs its database and gateway variables mapped: a three-line factory does
that (README, "Every schedule: the explorer"). The variables are restored when the
exploration ends.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

from payrace.harness.errors import UsageError
from payrace.harness.explore.scenario import APP_ISOLATION, app_name
from payrace.harness.explore.steps import StepModel, opaque
from payrace.harness.explore.targets import EngineEvents
from payrace.harness.model.profile import Profile
from payrace.postgres import libpq_url

ENVIRONMENT = (
    "PAYRACE_TARGET_DSN",
    "PAYRACE_GATEWAY_URL",
    "PAYRACE_RAZORPAY_KEY_ID",
    "PAYRACE_RAZORPAY_KEY_SECRET",
    "PAYRACE_RAZORPAY_WEBHOOK_SECRET",
)
LIFESPAN_TIMEOUT_S = 30.0


@contextmanager
def exported(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block; put back what was there after it."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _is_asgi(obj: object) -> bool:
    """An ASGI 3 application: an async callable of (scope, receive, send)."""
    if inspect.isclass(obj) or not callable(obj):
        return False
    call = obj if inspect.isroutine(obj) else obj.__call__
    if not inspect.iscoroutinefunction(call):
        return False
    try:
        inspect.signature(call).bind(None, None, None)
    except (TypeError, ValueError):
        return False
    return True


def load_app(spec: str) -> Any:
    """`module:factory` -> the ASGI app the factory builds (called with no arguments). An
    attribute that already is an ASGI app is used as it is."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"--app {spec!r}: expected module:factory, e.g. --app myshop.main:create_app "
            "(a function that builds your ASGI app from the environment)"
        )
    # As uvicorn does: the current directory is where a team's package is found.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise UsageError(
                f"--app {spec}: no module named {exc.name!r} on the path; run payrace from the "
                "directory that holds your package, or install it in payrace's environment"
            ) from None
        raise UsageError(
            f"--app {spec}: importing {module_name} failed: {exc}; install what your app needs "
            "in the environment payrace runs in"
        ) from None
    except Exception as exc:
        raise UsageError(
            f"--app {spec}: importing {module_name} raised {type(exc).__name__}: {exc}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and n[:1] != "_")
            raise UsageError(
                f"--app {spec}: {module_name} has no attribute {attr!r}; name the function that "
                f"builds your app (callables there: {', '.join(names[:12]) or 'none'})"
            )
        obj = getattr(obj, part)
    if _is_asgi(obj):
        return obj
    if not callable(obj):
        raise UsageError(
            f"--app {spec}: {attr} is a {type(obj).__name__}, not a factory; name a function "
            "that returns your ASGI app"
        )
    try:
        app = obj()
    except Exception as exc:
        raise UsageError(
            f"--app {spec}: calling {attr}() raised {type(exc).__name__}: {exc}; the factory is "
            f"called with no arguments and reads its settings from the environment, where "
            f"payrace sets {', '.join(ENVIRONMENT)} (payrace.harness.explore.app)"
        ) from None
    if not _is_asgi(app):
        raise UsageError(
            f"--app {spec}: {attr}() returned {type(app).__name__}, not an ASGI application "
            "(an async callable of scope, receive, send, such as a Starlette or FastAPI app); "
            "a WSGI app (Flask, Django) cannot be driven in-process: start it and race it over "
            "HTTP with `payrace run --profile` (docs/profile.md)"
        )
    return app


class Lifespan:
    """The ASGI lifespan protocol: httpx's ASGITransport sends requests only, so the app's
    startup (pool, tables) and shutdown (closing the pool) are run here. An app that does
    not speak lifespan (raises on its scope before answering) runs without, as uvicorn's
    `--lifespan auto` lets it."""

    def __init__(self, app: Any, spec: str) -> None:
        self.app = app
        self.spec = spec
        self._to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.supported = False

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        await self.app(scope, self._to_app.get, self._from_app.put)

    async def _answer(self, phase: str) -> dict[str, Any] | None:
        """The app's answer to `phase`, or None when the app returned or raised first."""
        assert self._task is not None
        got = asyncio.ensure_future(self._from_app.get())
        done, _ = await asyncio.wait(
            {got, self._task}, timeout=LIFESPAN_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if got in done:
            return got.result()
        got.cancel()
        if not self._from_app.empty():
            return self._from_app.get_nowait()
        if not done:
            raise UsageError(
                f"--app {self.spec}: the app's lifespan {phase} did not finish within "
                f"{LIFESPAN_TIMEOUT_S:g} s; check that the database in PAYRACE_TARGET_DSN answers"
            )
        return None

    async def startup(self) -> None:
        self._task = asyncio.create_task(self._run(), name="payrace-app-lifespan")
        await self._to_app.put({"type": "lifespan.startup"})
        message = await self._answer("startup")
        if message is None:  # returned or raised before answering: no lifespan support
            _retrieve(self._task)
            self._task = None
            return
        if message["type"] == "lifespan.startup.failed":
            task, self._task = self._task, None
            await asyncio.wait({task}, timeout=1.0)
            _retrieve(task)
            lines = str(message.get("message") or "").strip().splitlines()
            raise UsageError(
                f"--app {self.spec}: the app's startup failed: "
                f"{lines[-1] if lines else 'no message'}; the app reads its settings from "
                f"the environment ({', '.join(ENVIRONMENT)} are set by payrace)"
            )
        self.supported = True

    async def shutdown(self) -> None:
        if self._task is None:
            return
        task, self._task = self._task, None
        if self.supported:
            await self._to_app.put({"type": "lifespan.shutdown"})
            await asyncio.wait({task}, timeout=LIFESPAN_TIMEOUT_S)
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=LIFESPAN_TIMEOUT_S)
        _retrieve(task)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a finished task's exception as seen (asyncio logs an unretrieved one)."""
    if task.done() and not task.cancelled():
        task.exception()


class AppTarget:
    """A team's ASGI app, built by `module:factory`, raced through its profile."""

    model: StepModel | None = staticmethod(opaque)
    lock_rows = True  # unused: the reference table only
    exact_pids = False  # its requests may not say their backends (explore.waits)
    isolation = APP_ISOLATION

    def __init__(self, spec: str, profile: Profile) -> None:
        self.spec = spec
        self.profile = profile
        self.name = app_name(profile.name)
        self._lifespan: Lifespan | None = None
        self._env = ExitStack()

    def environment(self, db_url: str, gateway_url: str) -> dict[str, str]:
        keys = self.profile.keys
        return dict(
            zip(
                ENVIRONMENT,
                (libpq_url(db_url), gateway_url, keys.key_id, keys.key_secret,
                 keys.webhook_secret),
                strict=True,
            )
        )  # fmt: skip

    async def start(self, db_url: str, gateway_url: str, events: EngineEvents) -> Any:
        self._env.enter_context(exported(self.environment(db_url, gateway_url)))
        app = load_app(self.spec)
        self._lifespan = Lifespan(app, self.spec)
        await self._lifespan.startup()
        return app

    async def stop(self) -> None:
        try:
            if self._lifespan is not None:
                lifespan, self._lifespan = self._lifespan, None
                await lifespan.shutdown()
        finally:
            self._env.close()


__all__ = ["ENVIRONMENT", "AppTarget", "Lifespan", "exported", "load_app"]
