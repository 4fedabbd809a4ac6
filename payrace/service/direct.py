"""The capture routes answered without FastAPI's router: a plain ASGI layer in front of it.

    DirectRoutes   ASGI middleware (innermost of the service's own, inside the body limit and
                   the instrumentation): a POST to one of its paths is answered by its handler;
                   anything else, and any request the handler declines, goes on to FastAPI
    Handler        async (request, raw body) -> the answer, or None: "let FastAPI answer"
    FrontDoor      ahead of the app's whole middleware stack: a POST to a direct path skips
                   the outer layers that do nothing for it (see below)
    LeanJSONResponse   Starlette's JSONResponse, the same bytes, its encoder built once

Why: at saturation, FastAPI's routing, dependency solving and body reading cost about a
fifth of the service's CPU per capture (py-spy, docs/benchmarks.md), and every await of the
capture path resumes through their frames. The routes stay declared in FastAPI (OpenAPI, 405s,
and the answers this layer leaves to it); a handler here runs the same code as the route.

Same answers: the verify handler answers only a body that FastAPI would accept as it is
(the same json.loads and the same pydantic model, validated the same way) and declines any
other, so every 422 is still FastAPI's own. An exception raised by a handler is answered by
the app's exception handler for its class, looked up as Starlette's ExceptionMiddleware does;
one without a handler (or a handler that raises) goes on outward to ServerErrorMiddleware, a
logged 500, as from a route.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from payrace.service.body import replay_body

Handler = Callable[[Request, bytes], Awaitable[Response | None]]
# The app's handlers by exception class (or status code), read per request: FastAPI fills them
# after the middleware stack is declared.
Handlers = Callable[[], Mapping[Any, Callable[..., Any]]]


class DirectRoutes:
    def __init__(self, app: ASGIApp, *, routes: Mapping[str, Handler], handlers: Handlers) -> None:
        self.app = app
        self.routes = dict(routes)
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body, first = await _read_body(receive)
        if first is not None:  # the client went away before its body was read
            await self.app(scope, replay_body(body, first, receive), send)
            return
        request = Request(scope, replay_body(body, None, receive))
        try:
            response = await handler(request, body)
        except Exception as exc:
            response = await self._answer_error(request, exc)
        if response is None:
            await self.app(scope, replay_body(body, None, receive), send)
            return
        await response(scope, receive, send)

    async def _answer_error(self, request: Request, exc: Exception) -> Response:
        """What Starlette's ExceptionMiddleware answers for `exc`: the app's handler for the
        nearest class of it (the catch-all `Exception` handler is ServerErrorMiddleware's)."""
        handlers = self.handlers()
        for kind in type(exc).__mro__:
            if kind is Exception:
                break
            found = handlers.get(kind)
            if found is not None:
                answer = found(request, exc)
                if inspect.isawaitable(answer):
                    answer = await answer
                assert isinstance(answer, Response)
                return answer
        raise exc


async def _read_body(receive: Receive) -> tuple[bytes, Message | None]:
    """The whole body (BodyLimitMiddleware has bounded it), or what was read of it and the
    message that ended it early (a disconnect)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), None


# The outer layers FastAPI puts around the app's own middleware, outermost first (FastAPI
# 0.16x). FrontDoor takes its shortcut only over exactly these.
_OUTER = ("ServerErrorMiddleware", "ExceptionTelemetryMiddleware", "AppBodyLimitMiddleware")
# Set by a parent app's body limit (a mounted app): then AppBodyLimitMiddleware has work to do.
_PARENT_BODY_LIMIT = "starlette.max_body_size"


class FrontDoor:
    """The app's middleware stack with a shortcut for a POST to one of `paths`: straight to
    the app's own middleware (the instrumentation, the body limit, DirectRoutes) under a
    ServerErrorMiddleware of its own, the same handler and debug flag as the stack's.

    Skipped, for those requests only: FastAPI's ExceptionTelemetryMiddleware (it records an
    exception only for a request that native telemetry observes, `fastapi.telemetry` in the
    scope: such a request takes the whole stack) and AppBodyLimitMiddleware (it passes the
    request on untouched unless the app has a max_body_size, which this one has not, or a
    parent app's limit is in the scope: such a request takes the whole stack too). Every
    resumed await of a capture passes through each layer's frame, and each wraps `send`.

    A stack of any other shape (another FastAPI's layers) is used as it is, shortcut off."""

    def __init__(self, stack: ASGIApp, *, paths: Collection[str], inner: type[Any]) -> None:
        self.app = stack  # `app`, as a middleware's: walkers of the stack see through it
        self.paths = frozenset(paths)
        self.shortcut: ASGIApp | None = None
        layer: Any = stack
        for name in _OUTER:
            if type(layer).__name__ != name:
                return
            layer = layer.app
        if not isinstance(layer, inner) or not isinstance(stack, ServerErrorMiddleware):
            return  # AppBodyLimitMiddleware wraps more than the app: it has a limit
        self.shortcut = ServerErrorMiddleware(layer, handler=stack.handler, debug=stack.debug)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.shortcut is not None
            and scope["type"] == "http"
            and scope["path"] in self.paths
            and scope["method"] == "POST"
            and "fastapi.telemetry" not in scope
            and _PARENT_BODY_LIMIT not in scope
        ):
            await self.shortcut(scope, receive, send)
        else:
            await self.app(scope, receive, send)


# What Starlette's JSONResponse.render passes json.dumps, which builds an encoder per call
# when given any option.
_ENCODE = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
).encode


class LeanJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return _ENCODE(content).encode("utf-8")


__all__ = ["DirectRoutes", "FrontDoor", "Handler", "LeanJSONResponse"]
