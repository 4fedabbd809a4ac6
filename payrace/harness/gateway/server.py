"""The fake Razorpay over HTTP: its routes, and a small threaded HTTP/1.1 server around them.

    razorpay_app(fake)   the Starlette app a FakeRazorpay answers through:
        POST /v1/orders                  GET /v1/orders/{id}
        GET  /v1/payments/{id}           POST /v1/payments/{id}/capture
        /_fake/counters  /_fake/payments  /_fake/knobs  /_fake/reset    (test control, no auth)
        /_fake/holds  GET (armed ids -> calls held), POST {payment_id, timeout_s} (arm);
        /_fake/holds/{id}/release  POST;  /_fake/holds/{id}  DELETE (disarm)   (capture barrier)
    GatewayServer        context manager: the fake served on a free port from its own thread
                         (httptools on uvloop); the four /v1 routes answered by the connection
                         itself (_V1: one write per answer, no ASGI framing), the rest by
                         razorpay_app through a minimal ASGI call

The /v1 routes check basic auth with the fake's keys and wait out the injected latency
before they answer; a capture for a payment whose holds are armed then waits at the barrier
(gateway.fake.CaptureHold) without blocking the server's loop; every error leaves in
Razorpay's JSON shape (gateway.fake.RazorpayError).
Used by the runner, the explorer, `payrace load` and `payrace gateway`; in another process,
gateway.controls.RemoteGateway drives the /_fake routes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import http
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from email.utils import formatdate
from types import TracebackType
from typing import Any, cast
from urllib.parse import unquote

import httptools
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from payrace.harness.gateway.fake import (
    CaptureHold,
    FakeRazorpay,
    RazorpayError,
    json_object,
    not_found,
)
from payrace.harness.infra.loop import new_loop
from payrace.harness.infra.readiness import wait_until_answers


async def _sleep_at_least(delay: float) -> None:
    """Wait at least delay seconds by the monotonic clock. uvloop's timers count from the
    loop's cached time, in whole milliseconds, so asyncio.sleep alone can wake a fraction of
    a millisecond early; an injected latency is a floor the target can rely on."""
    deadline = time.perf_counter() + delay
    await asyncio.sleep(delay)
    # Not an Event: nothing signals the deadline but the clock. Each pass is under 1 ms.
    while (left := deadline - time.perf_counter()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(left)


class _V1:
    """The four /v1 routes: basic auth, injected latency, then the fake's answer. Shared by
    the connection's direct path and by the app, so both answer alike by construction."""

    def __init__(self, fake: FakeRazorpay) -> None:
        self.fake = fake
        # The keys are fixed for the fake's life: the expected header is built once, not per call.
        credentials = f"{fake.keys.key_id}:{fake.keys.key_secret}".encode()
        self.expected = b"Basic " + base64.b64encode(credentials)

    def authenticate(self, header: bytes) -> None:
        if header[:6].lower() != b"basic ":
            raise RazorpayError(401, "Please provide your api key for authentication purposes.")
        if not hmac.compare_digest(header, self.expected):
            raise RazorpayError(401, "Authentication failed")

    def answer(self, route: str, param: str, authorization: bytes, body: bytes) -> _Answer:
        """The call's JSON answer, or, when it has to wait (injected latency, a hold, an
        after-capture hook), the coroutine that produces it; a RazorpayError is the error."""
        self.authenticate(authorization)
        delay = self.fake.delay_s(capture=route == "capture")
        if delay:
            return self._delayed(delay, route, param, body)
        return self._undelayed(route, param, body)

    async def _delayed(self, delay: float, route: str, param: str, body: bytes) -> dict[str, Any]:
        # The server loop serves every other request meanwhile; that is what lets a slow
        # gateway stretch the window in which two captures overlap.
        await _sleep_at_least(delay)
        return await _awaited(self._undelayed(route, param, body))

    def _undelayed(self, route: str, param: str, body: bytes) -> _Answer:
        fake = self.fake
        if route == "create_order":
            return fake.create_order(json_object(body))
        if route != "capture":
            found = fake.order(param) if route == "order" else fake.payment(param)
            if found is None:
                raise not_found()
            return found
        doc = json_object(body)
        hold = fake.hold_capture(param)
        if hold is not None:
            return self._held_capture(param, doc, hold)
        captured = fake.capture(param, doc)
        hooks = fake.after_capture()
        return self._hooked(param, captured, hooks) if hooks else captured

    async def _held_capture(
        self, payment_id: str, doc: dict[str, Any], hold: CaptureHold
    ) -> dict[str, Any]:
        await _held(self.fake, hold)
        captured = self.fake.capture(payment_id, doc)
        return await self._hooked(payment_id, captured, self.fake.after_capture())

    async def _hooked(
        self, payment_id: str, captured: dict[str, Any], hooks: list[Callable[[str], None]]
    ) -> dict[str, Any]:
        for hook in hooks:
            # Captured, and the caller not yet told: a hook may break the caller meanwhile.
            await asyncio.to_thread(hook, payment_id)
        return captured


_Answer = dict[str, Any] | Coroutine[Any, Any, dict[str, Any]]


async def _awaited(answer: _Answer) -> dict[str, Any]:
    return answer if isinstance(answer, dict) else await answer


def _v1_route(method: bytes, path: str) -> tuple[str, str] | None:
    """(route, path parameter) when `method path` fully matches one of the four /v1 routes
    as the app's router would match it; None for anything else (the app answers that)."""
    if path.startswith("/v1/payments/"):
        rest = path[13:]
        if "/" not in rest:
            return ("payment", rest) if rest and method == b"GET" else None
        payment_id, _, tail = rest.partition("/")
        if tail == "capture" and payment_id and method == b"POST":
            return "capture", payment_id
        return None
    if path.startswith("/v1/orders"):
        if path == "/v1/orders":
            return ("create_order", "") if method == b"POST" else None
        order_id = path[11:] if path[10] == "/" else ""
        if order_id and "/" not in order_id and method == b"GET":
            return "order", order_id
    return None


def razorpay_app(fake: FakeRazorpay) -> Starlette:
    core = _V1(fake)

    def v1(route: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            param = next(iter(request.path_params.values()), "")
            authorization = request.headers.get("authorization", "").encode("latin-1")
            answer = core.answer(route, param, authorization, await request.body())
            return JSONResponse(await _awaited(answer))

        return endpoint

    async def counters(request: Request) -> Response:
        return JSONResponse(fake.counters())

    async def authorize(request: Request) -> Response:
        body = json_object(await request.body())
        try:
            authorized = fake.authorize_payment(
                str(body.get("order_id")), method=str(body.get("method", "upi"))
            )
        except KeyError:
            raise not_found("order_id") from None
        except ValueError as exc:
            raise RazorpayError(400, str(exc), field="order_id") from None
        return JSONResponse(authorized)

    async def auto_capture(request: Request) -> Response:
        return JSONResponse(fake.auto_capture(request.path_params["payment_id"]))

    async def fake_order(request: Request) -> Response:
        # A profile with `by = "payrace"` has payrace create the order; the control route
        # spares the harness the target's key secret.
        return JSONResponse(fake.create_order(json_object(await request.body())))

    async def knobs(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(fake.knobs())
        try:
            return JSONResponse(fake.set_knobs(**json_object(await request.body())))
        except ValueError as exc:
            raise RazorpayError(400, str(exc)) from None

    async def holds(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(fake.holds())
        body = json_object(await request.body())
        payment_id, timeout_s = body.get("payment_id"), body.get("timeout_s")
        if not isinstance(payment_id, str) or not payment_id:
            raise RazorpayError(400, "payment_id must be a payment id", field="payment_id")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
            raise RazorpayError(400, "timeout_s must be a number of seconds", field="timeout_s")
        try:
            fake.arm_holds(payment_id, float(timeout_s))
        except ValueError as exc:
            raise RazorpayError(400, f"timeout_s: {exc}", field="timeout_s") from None
        return JSONResponse(fake.holds())

    async def release_holds(request: Request) -> Response:
        return JSONResponse({"released": fake.release_holds(request.path_params["payment_id"])})

    async def disarm_holds(request: Request) -> Response:
        return JSONResponse({"released": fake.disarm_holds(request.path_params["payment_id"])})

    async def reset(request: Request) -> Response:
        fake.reset()
        return JSONResponse(fake.counters())

    async def razorpay_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RazorpayError)
        return JSONResponse(exc.body, status_code=exc.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        # The SDK calls response.json() on every error; a plain-text 404 would surface as
        # a JSONDecodeError instead of BadRequestError.
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:  # Razorpay answers an unknown URL with a 400
            error = RazorpayError(400, "The requested URL was not found on the server.")
        else:
            error = RazorpayError(exc.status_code, exc.detail)
        return JSONResponse(error.body, status_code=error.status)

    return Starlette(
        routes=[
            Route("/v1/orders", v1("create_order"), methods=["POST"]),
            Route("/v1/orders/{order_id}", v1("order"), methods=["GET"]),
            Route("/v1/payments/{payment_id}", v1("payment"), methods=["GET"]),
            Route("/v1/payments/{payment_id}/capture", v1("capture"), methods=["POST"]),
            Route("/_fake/counters", counters, methods=["GET"]),
            Route("/_fake/payments", authorize, methods=["POST"]),
            Route("/_fake/payments/{payment_id}/auto_capture", auto_capture, methods=["POST"]),
            Route("/_fake/orders", fake_order, methods=["POST"]),
            Route("/_fake/knobs", knobs, methods=["GET", "POST"]),
            Route("/_fake/reset", reset, methods=["POST"]),
            Route("/_fake/holds", holds, methods=["GET", "POST"]),
            Route("/_fake/holds/{payment_id}/release", release_holds, methods=["POST"]),
            Route("/_fake/holds/{payment_id}", disarm_holds, methods=["DELETE"]),
        ],
        exception_handlers={RazorpayError: razorpay_error, HTTPException: http_error},
    )


async def _held(fake: FakeRazorpay, hold: CaptureHold) -> None:
    """Wait at the capture barrier on the server's loop, so every other call is served."""
    loop = asyncio.get_running_loop()
    released = asyncio.Event()

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the server's loop is already closed
            loop.call_soon_threadsafe(released.set)

    hold.on_release(wake)
    timed_out = False
    try:
        await asyncio.wait_for(released.wait(), hold.timeout_s)
    except TimeoutError:
        timed_out = True
    finally:
        # Also when the call is abandoned (server shutdown): it must not count as held.
        fake.leave_hold(hold, timed_out=timed_out)


# Starlette's JSONResponse rendering, byte for byte; one encoder, not one per call as
# json.dumps with options would build.
_ENCODE = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_STATUS_LINES: dict[int, bytes] = {}
_KEEP_ALIVE_S = 300.0
_GRACEFUL_S = 2.0
_TEXT = (b"content-type", b"text/plain; charset=utf-8")
_INTERNAL_ERROR = (500, [(b"content-length", b"21"), _TEXT], b"Internal Server Error")
_INVALID = b"Invalid HTTP request received."
_JSON = (b"content-type", b"application/json")
_log = logging.getLogger(__name__)
_Response = tuple[int, list[tuple[bytes, bytes]], bytes]


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode()
    return line


class _Serving:
    """What the connections of one server share: the routes, the date header, the open
    connections and the tasks of calls that wait."""

    def __init__(self, fake: FakeRazorpay) -> None:
        self.v1 = _V1(fake)
        self.app = razorpay_app(fake)
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.tick = 0  # seconds served, for the keep-alive timeout
        self.date = b""
        self.closing = False
        self._ticker: asyncio.TimerHandle | None = None

    def start_ticking(self) -> None:
        self._tick()

    def _tick(self) -> None:
        # Once a second: the date header, and idle connections closed after
        # the keep-alive timeout.
        self.tick += 1
        self.date = b"date: " + formatdate(usegmt=True).encode() + b"\r\n"
        for connection in list(self.connections):
            connection.close_if_idle(self.tick - _KEEP_ALIVE_S)
        self._ticker = asyncio.get_running_loop().call_later(1.0, self._tick)

    async def shutdown(self) -> None:
        """Close idle connections, answer the calls under way (for up to _GRACEFUL_S), then
        cut what is left."""
        self.closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        for connection in list(self.connections):
            connection.close_if_idle(float("inf"))
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=_GRACEFUL_S)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=_GRACEFUL_S)
        for connection in list(self.connections):
            connection.abort()


class _Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "url", "version")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, parsed by httptools; answers written in one piece, in order.

    The four /v1 routes are answered right here, without ASGI framing, and at once when the
    call need not wait; everything else (the /_fake routes, unknown URLs, other methods, HEAD)
    goes through razorpay_app as an ASGI call. Pipelined requests wait their turn."""

    def __init__(self, serving: _Serving) -> None:
        self.serving = serving
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.request = _Request()
        self.pipeline: deque[_Request] = deque()
        self.busy = False  # a call of this connection is being answered by a task
        self.paused = False  # reading paused while calls wait in the pipeline
        self.active_at = serving.tick
        self.lost: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.serving.connections.add(self)
        if self.serving.closing:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.serving.connections.discard(self)
        self.pipeline.clear()
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.active_at = self.serving.tick
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no websockets here: the request was answered as a plain one
        except httptools.HttpParserError:
            _log.warning("fake gateway: invalid HTTP request received")
            self._write(400, [_TEXT], _INVALID, False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.request = _Request()

    def on_url(self, url: bytes) -> None:
        self.request.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.request.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.request.body += body

    def on_message_complete(self) -> None:
        request = self.request
        parser = self.parser
        request.method = parser.get_method()
        request.version = parser.get_http_version()
        request.keep_alive = request.version != "1.0" and parser.should_keep_alive()
        if self.busy:
            self.pipeline.append(request)
            if not self.paused:
                assert self.transport is not None
                self.paused = True
                self.transport.pause_reading()
        else:
            self._handle(request)

    # answering
    def _handle(self, request: _Request) -> None:
        try:
            raw_path = httptools.parse_url(request.url).path
            path = raw_path.decode("ascii")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            self._write(400, [_TEXT], _INVALID, False)
            return
        if "%" in path:
            path = unquote(path)
        route = _v1_route(request.method, path)
        if route is None:
            self._wait_for(self._asgi(request, path, raw_path), request)
            return
        authorization = b""
        for name, value in request.headers:
            if name == b"authorization":
                authorization = value
                break
        try:
            answer = self.serving.v1.answer(route[0], route[1], authorization, request.body)
        except RazorpayError as exc:
            self._json(exc.status, exc.body, request.keep_alive)
            return
        except Exception:
            _log.exception("fake gateway: exception answering %s", path)
            self._write(*_INTERNAL_ERROR, request.keep_alive)
            return
        if isinstance(answer, dict):
            self._json(200, answer, request.keep_alive)
        else:
            self._wait_for(self._v1_later(answer), request)

    async def _v1_later(self, answer: Awaitable[dict[str, Any]]) -> _Response:
        try:
            status, doc = 200, await answer
        except RazorpayError as exc:
            status, doc = exc.status, exc.body
        body = _ENCODE(doc).encode()
        return status, [(b"content-length", b"%d" % len(body)), _JSON], body

    def _wait_for(self, answer: Coroutine[Any, Any, _Response], request: _Request) -> None:
        self.busy = True
        task = asyncio.get_running_loop().create_task(self._answer_later(answer, request))
        self.serving.tasks.add(task)
        task.add_done_callback(self.serving.tasks.discard)

    async def _answer_later(
        self, answer: Coroutine[Any, Any, _Response], request: _Request
    ) -> None:
        try:
            status, headers, body = await answer
        except Exception:
            _log.exception("fake gateway: exception answering %r", request.url)
            status, headers, body = _INTERNAL_ERROR
        if request.method == b"HEAD":
            self._write(status, headers, b"", request.keep_alive, len(body))
        else:
            self._write(status, headers, body, request.keep_alive)
        self.busy = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        # Those in line next, until one has to wait in turn; reading resumes once none is left.
        while self.pipeline and not self.busy:
            self._handle(self.pipeline.popleft())
        if self.paused and not self.pipeline:
            self.paused = False
            transport.resume_reading()

    async def _asgi(self, request: _Request, path: str, raw_path: bytes) -> _Response:
        """The request through razorpay_app, as an ASGI server would pass it."""
        assert self.transport is not None
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.version,
            "server": self.transport.get_extra_info("sockname"),
            "client": self.transport.get_extra_info("peername"),
            "scheme": "http",
            "method": request.method.decode("ascii"),
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": httptools.parse_url(request.url).query or b"",
            "headers": request.headers,
            "state": {},
        }
        received = False
        started: list[Any] = []
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            if self.lost is None:
                self.lost = asyncio.get_running_loop().create_future()
                if self.transport is None or self.transport.is_closing():
                    self.lost.set_result(None)  # lost already: connection_lost came first
            await self.lost
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started[:] = [message["status"], list(message.get("headers", []))]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        try:
            await self.serving.app(scope, receive, send)
        except Exception:
            # Starlette has answered it with a 500 already, unless it failed before that.
            _log.exception("fake gateway: exception in the app for %s", path)
            if not started:
                return _INTERNAL_ERROR
        return started[0], started[1], b"".join(chunks)

    def _json(self, status: int, doc: dict[str, Any], keep_alive: bool) -> None:
        body = _ENCODE(doc).encode()
        transport = self.transport
        assert transport is not None
        if transport.is_closing():
            return
        closing = not keep_alive or self.serving.closing
        transport.write(
            b"%s%scontent-length: %d\r\ncontent-type: application/json\r\n%s\r\n%s"
            % (
                _status_line(status),
                self.serving.date,
                len(body),
                b"connection: close\r\n" if closing else b"",
                body,
            )
        )
        if closing:
            transport.close()

    def _write(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        keep_alive: bool,
        length: int | None = None,
    ) -> None:
        transport = self.transport
        assert transport is not None
        if transport.is_closing():
            return
        closing = not keep_alive or self.serving.closing
        head = [_status_line(status), self.serving.date]
        has_length = False
        for name, value in headers:
            has_length = has_length or name == b"content-length"
            closing = closing or (name == b"connection" and b"close" in value.lower())
            head += [name, b": ", value, b"\r\n"]
        if not has_length:
            head.append(b"content-length: %d\r\n" % (len(body) if length is None else length))
        if closing:
            head.append(b"connection: close\r\n")
        head += [b"\r\n", body]
        transport.write(b"".join(head))
        if closing:
            transport.close()

    def close_if_idle(self, active_before: float) -> None:
        if not self.busy and self.active_at < active_before and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class GatewayServer:
    """The fake over HTTP in a thread of its own on `host`; a free port unless one is given.

    Its own small HTTP/1.1 server (httptools on uvloop, _Connection) rather than uvicorn: the
    fake shares the machine's cores with the service it answers, and the ASGI framing and the
    two writes per answer cost most of its CPU per call."""

    def __init__(
        self,
        fake: FakeRazorpay,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.fake = fake
        self.host = host
        self.port = port
        self.url = ""
        self.start_timeout_s = start_timeout_s
        self.thread: threading.Thread | None = None
        self._crash: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_asked = threading.Event()
        self._stopping: asyncio.Event | None = None

    def __enter__(self) -> GatewayServer:
        # Binding here makes port 0 resolve before the thread starts, so the URL is known and
        # a busy port fails loudly in the caller's thread.
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says
        # TCP, and without it Nagle + delayed ACK add ~40 ms to every response.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self.thread = threading.Thread(
            target=self._run, args=(sock,), name=f"payrace-gateway-{self.port}", daemon=True
        )
        try:
            self.thread.start()
            self._wait_until_answering()
        except BaseException:
            self._stop()
            raise
        return self

    def _run(self, sock: socket.socket) -> None:
        try:
            with asyncio.Runner(loop_factory=new_loop) as runner:
                runner.run(self._serve(sock))
        except BaseException as exc:  # kept for the start-up error message
            self._crash = exc
        finally:
            sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        serving = _Serving(self.fake)
        serving.start_ticking()
        # The SDK's requests.Session reuses idle keep-alive connections: a call sent just as
        # the server closes an idle one is reset (a 502 from the service on a busy machine),
        # so idle ones are kept for _KEEP_ALIVE_S, far longer than any pause between calls.
        server = await loop.create_server(lambda: _Connection(serving), sock=sock, backlog=2048)
        self._stopping = asyncio.Event()
        self._loop = loop  # published after the event: _stop reads them in the other order
        if not self._stop_asked.is_set():
            await self._stopping.wait()
        server.close()
        await serving.shutdown()

    def _wait_until_answering(self) -> None:
        thread = self.thread
        assert thread is not None
        wait_until_answers(
            self.url,
            "/_fake/counters",
            timeout_s=self.start_timeout_s,
            stopped=lambda: (
                None
                if thread.is_alive()
                else f"fake gateway at {self.url} stopped before answering: {self._crash!r}"
            ),
            what="fake gateway",
            hint="is the host loaded or the address firewalled? Try a larger start_timeout_s.",
            poll_s=0.02,
            request_timeout_s=1.0,
        )

    def _stop(self) -> None:
        if self.thread is None:
            return
        self.fake.disarm_all_holds()  # a held capture would keep the server from stopping
        self._stop_asked.set()
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the thread is done
                loop.call_soon_threadsafe(stopping.set)
        # Calls stuck in injected latency are cut after the graceful _GRACEFUL_S.
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            raise RuntimeError(f"fake gateway thread {self.thread.name} did not stop")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()
