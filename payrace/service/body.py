"""What a request body may be before any route reads it: bounded in size and in nesting.

    BodyLimitMiddleware   plain ASGI, in front of the app: a Content-Length above
                          MAX_BODY_BYTES is a 413 before a byte is read; a body without one
                          (chunked) is read only up to the limit, then 413; a JSON body nested
                          deeper than MAX_JSON_DEPTH is a 400 (Python's json module would
                          raise RecursionError around 1,000 levels: a 500)
    json_depth()          how deep a JSON text nests, by a linear scan (no parse, no recursion)
    lone_surrogate()      where a parsed JSON document holds a string with a lone UTF-16
                          surrogate ("\\ud800" is valid JSON but no Unicode text: PostgreSQL,
                          the SDK's HMAC and the JSON answer would all fail on it)
    may_escape_surrogate()  whether a JSON text could parse to one at all: only a \\uD800-
                          \\uDFFF escape can make one, so most bodies skip the walk above
    replay_body()         the receive an inner app reads a buffered body from (also the
                          capture routes' layer, payrace.service.direct)

The body is buffered (at most MAX_BODY_BYTES) and handed to the app unchanged.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from payrace.service.errors import error_response

# Razorpay's envelopes nest about six levels (payload.payment.entity.acquirer_data ...).
MAX_JSON_DEPTH = 32
# A string (to its closing quote, or to the end when unterminated: one pass, linear) or a
# bracket; brackets inside strings are thereby skipped.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Decoded UTF-8 never holds a surrogate (the codec refuses them), so a parsed document can hold
# one only through a \uD8xx-\uDFxx escape. A false alarm (an escaped backslash before "ud8")
# only costs the full walk.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text` (strings skipped)."""
    depth = deepest = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in ("]", "}"):
            depth -= 1
    return deepest


def may_escape_surrogate(text: str) -> bool:
    """False when the JSON `text`, decoded from UTF-8, cannot parse to a lone surrogate."""
    return _SURROGATE_ESCAPE.search(text) is not None


def lone_surrogate(doc: Any, path: str = "body") -> str | None:
    """The path of the first key or string value holding a lone surrogate, else None."""
    if isinstance(doc, str):
        return path if _SURROGATE.search(doc) else None
    if isinstance(doc, dict):
        for key, value in doc.items():
            if _SURROGATE.search(key):
                return f"{path} (a key)"
            found = lone_surrogate(value, f"{path}.{key}")
            if found:
                return found
    if isinstance(doc, list):
        for i, value in enumerate(doc):
            found = lone_surrogate(value, f"{path}[{i}]")
            if found:
                return found
    return None


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(scope, receive, send, 400, "content-length must be a number")
                return
            if int(declared) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, replay_body(b"", message, receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        # No body nests deeper than it has opening brackets (those in strings included): the
        # count, in C, spares the scan for every body of ordinary shape.
        if body.count(b"{") + body.count(b"[") > self.max_depth and body.lstrip()[:1] in (
            b"{",
            b"[",
        ):
            depth = json_depth(body.decode("utf-8", "replace"))
            if depth > self.max_depth:
                await self._refuse(
                    scope,
                    receive,
                    send,
                    400,
                    f"JSON body nests {depth} levels deep; at most {self.max_depth} are accepted",
                )
                return
        await self.app(scope, replay_body(body, None, receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            "body_too_large",
            f"request body is larger than {self.max_bytes} bytes (MAX_BODY_BYTES); "
            "send a smaller body",
            max_bytes=self.max_bytes,
        )
        # The rest of the body is never read: the server closes the connection after this.
        response.headers["connection"] = "close"
        await response(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, why: str) -> None:
        await error_response(status, "invalid_body", why)(scope, receive, send)


def replay_body(body: bytes, first: Message | None, receive: Receive) -> Receive:
    """A receive that hands the buffered body (or the message that ended it early) over
    once, then the client's own messages: for an app inside a middleware that read it."""
    pending: list[Message] = [first or {"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
