"""The capture routes answered without FastAPI's router: a plain ASGI layer in front of it.

    DirectRoutes   ASGI middleware (innermost of the service's own, inside the body limit and
                   the instrumentation): a POST to one of its paths is answered by its handler;
                   anything else, and any request the handler declines, goes on to FastAPI
    Handler        async (request, raw body) -> the answer, or None: "let FastAPI answer"

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
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
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


__all__ = ["DirectRoutes", "Handler"]
