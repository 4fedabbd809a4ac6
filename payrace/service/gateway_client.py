"""The service's side of Razorpay: two clients with one interface, picked by GATEWAY_CLIENT.

    GatewayClient                the interface the capture routine and the reconciler use
      .create_order()            POST /v1/orders
      .capture()                 POST /v1/payments/{id}/capture; "already captured" is success
      .fetch_payment()           GET /v1/payments/{id}: what the reconciler asks
    LeanGatewayClient            GATEWAY_CLIENT=lean (default): HTTP/1.1 on the event loop
                                 (asyncio + httptools, keep-alive pool), speaking the SDK's
                                 wire format: same URLs, basic auth, JSON bodies, User-Agent,
                                 and the SDK's mapping of Razorpay's error codes
    SdkGatewayClient             GATEWAY_CLIENT=sdk: the real `razorpay` SDK (requests) in a
                                 thread pool of GATEWAY_THREADS
    make_gateway_client()        the one the settings name
    GatewayError                 the gateway failed (unavailable) or refused (`refused`); the
                                 request answers 502

Why two: the SDK is synchronous, so each call costs a thread hop and `requests`' per-call
machinery; at saturation that was about a quarter of the service's CPU (py-spy), which made a
load run measure Python instead of the locks. The SDK stays selectable, and both pass the same
tests against the fake gateway (tests/service/test_gateway_client.py).

Errors, in both: Razorpay's `error.code` decides, as in the SDK (BAD_REQUEST_ERROR is a
refusal whatever the HTTP status; GATEWAY_ERROR, SERVER_ERROR and anything else, a body that
is not JSON, or a network failure make the gateway unavailable). Messages never name the
gateway's host or port (a 502 body is public).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlsplit

import httptools

from payrace.redact import without_endpoints
from payrace.service.instrument import timing

if TYPE_CHECKING:
    from payrace.service.settings import Settings

ALREADY_CAPTURED = "already been captured"


@lru_cache(maxsize=1)
def _sdk_version() -> str:
    try:
        return version("razorpay")
    except PackageNotFoundError:  # the SDK says "" then too
        return ""


class GatewayError(Exception):
    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass(frozen=True)
class CaptureOutcome:
    payment: dict[str, Any] | None
    already_captured: bool


def _refused(message: str) -> GatewayError:
    return GatewayError(f"gateway refused the call: {message}", refused=True)


def _unavailable(kind: str, message: str) -> GatewayError:
    # The answer says what failed, not where the gateway lives.
    return GatewayError(f"gateway unavailable: {kind}: {without_endpoints(message)}")


class GatewayClient:
    """What the service asks Razorpay; every call's time is added to the request's
    Server-Timing `gateway` figure."""

    async def create_order(self, amount: int, currency: str, receipt: str) -> dict[str, Any]:
        raise NotImplementedError

    async def capture(self, payment_id: str, amount: int, currency: str) -> CaptureOutcome:
        raise NotImplementedError

    async def fetch_payment(self, payment_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Release threads and idle connections (the service's shutdown)."""


# -- the SDK ------------------------------------------------------------------------------


class SdkGatewayClient(GatewayClient):
    """The real razorpay SDK, off the event loop: a dedicated thread pool sized by
    GATEWAY_THREADS (asyncio's default has min(32, cores + 4) threads, which on a small machine
    would queue gateway calls behind each other while they hold row locks)."""

    def __init__(self, key_id: str, key_secret: str, base_url: str, threads: int = 64) -> None:
        # Imported here, not with the module: the SDK and requests take about a tenth of a
        # second to import, and only this client (GATEWAY_CLIENT=sdk) runs them.
        import razorpay
        import requests
        from razorpay.errors import BadRequestError, ServerError
        from razorpay.errors import GatewayError as SdkGatewayError

        self._new_client = razorpay.Client
        self._refusal: type[Exception] = BadRequestError
        self._unavailable: tuple[type[Exception], ...] = (
            ServerError,
            SdkGatewayError,
            requests.RequestException,
            ValueError,
        )
        self._auth = (key_id, key_secret)
        self._base_url = base_url.rstrip("/")
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="razorpay")

    def _client(self) -> Any:
        # requests.Session is not documented as thread-safe: one SDK client per thread.
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._new_client(auth=self._auth, base_url=self._base_url)
            # The SDK looks its own version up in the installed package metadata on every
            # request, for the User-Agent (a directory scan: ~5 % of the service's CPU at
            # saturation, py-spy); the same version, read once.
            client._get_version = _sdk_version
            self._local.client = client
        return client

    async def _call(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        finally:
            timing.current().gateway_ms += (time.perf_counter() - started) * 1000

    async def create_order(self, amount: int, currency: str, receipt: str) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            data = {"amount": amount, "currency": currency, "receipt": receipt}
            return cast(dict[str, Any], self._client().order.create(data=data))

        return cast(dict[str, Any], await self._guard(call))

    async def capture(self, payment_id: str, amount: int, currency: str) -> CaptureOutcome:
        def call() -> CaptureOutcome:
            try:
                payment = self._client().payment.capture(payment_id, amount, {"currency": currency})
            except self._refusal as exc:
                # Razorpay refuses a second capture; the payment *is* captured at the gateway.
                if ALREADY_CAPTURED in str(exc):
                    return CaptureOutcome(payment=None, already_captured=True)
                raise
            return CaptureOutcome(payment=cast(dict[str, Any], payment), already_captured=False)

        return cast(CaptureOutcome, await self._guard(call))

    async def fetch_payment(self, payment_id: str) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            return cast(dict[str, Any], self._client().payment.fetch(payment_id))

        return cast(dict[str, Any], await self._guard(call))

    async def _guard(self, call: Any) -> Any:
        try:
            return await self._call(call)
        except self._refusal as exc:
            raise _refused(str(exc)) from exc
        except self._unavailable as exc:
            raise _unavailable(type(exc).__name__, str(exc)) from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# -- the lean client ----------------------------------------------------------------------


def _sdk_ca_bundle() -> str:
    """The SDK's CA bundle: the lean client trusts exactly what the SDK's `verify=` trusts.
    Found without importing the SDK (find_spec of a top-level package runs none of it)."""
    spec = find_spec("razorpay")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the razorpay package (its CA bundle) is not installed")
    return os.path.join(os.path.dirname(spec.origin), "ca-bundle.crt")


class ContentDecodingError(ConnectionError):
    """A compressed answer that does not decompress (requests names it the same)."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, one request at a time; httptools parses the answer (content
    length, chunked, keep-alive)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # Its loop, looked up once: asyncio.get_running_loop() costs a getpid() system call
        # each time (fork detection), and every call on this connection needs a future.
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []
        self.gzip = False
        self.reusable = False
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"malformed answer: {exc}"))

    def eof_received(self) -> bool | None:
        self.closed = True
        if self.answer is not None and not self.answer.done():
            try:
                status = self.parser.get_status_code()
            except httptools.HttpParserError:
                status = 0
            if status and not self.parser.should_keep_alive():
                # An answer without a length ends where the connection does.
                self._finish(status)
            else:
                self._fail(ConnectionError("the gateway closed the connection mid-answer"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(f"connection lost: {exc}" if exc else "connection lost"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-encoding" and value.strip().lower() in (b"gzip", b"deflate"):
            self.gzip = True

    def on_body(self, chunk: bytes) -> None:
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        self._finish(self.parser.get_status_code())

    def _finish(self, status: int) -> None:
        body = b"".join(self.body)
        if self.gzip:
            try:
                body = zlib.decompress(body, 47)  # 32 + 15: gzip or zlib header, detected
            except zlib.error as exc:
                self._fail(ContentDecodingError(f"the answer's body failed to decode: {exc}"))
                return
        if self.answer is not None and not self.answer.done():
            self.answer.set_result((status, body))

    def _fail(self, exc: Exception) -> None:
        self.reusable = False
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.answer = self.loop.create_future()
        self.body = []
        self.gzip = False
        self.reusable = False
        self.transport.write(request)
        return await self.answer


class LeanGatewayClient(GatewayClient):
    """Razorpay's HTTP API on the event loop, byte for byte what the SDK sends: the same
    method and URL, basic auth with the key id and secret, `json.dumps` of the same dict as
    body with `Content-type: application/json`, the SDK's User-Agent. At most `concurrency`
    calls at once (GATEWAY_THREADS, the SDK's thread count); idle connections are kept alive
    and reused. No timeout, as in the SDK (requests without `timeout=`)."""

    def __init__(self, key_id: str, key_secret: str, base_url: str, concurrency: int = 64) -> None:
        url = urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"RAZORPAY_BASE_URL must be an http(s) URL, got {base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = (
            ssl.create_default_context(cafile=_sdk_ca_bundle()) if url.scheme == "https" else None
        )
        self._prefix = url.path  # a base URL may carry a path; the SDK appends /v1/... to it
        default_port = self._port == (443 if self._ssl else 80)
        host = url.hostname if ":" not in url.hostname else f"[{url.hostname}]"
        authority = host if default_port else f"{host}:{self._port}"
        credentials = base64.b64encode(f"{key_id}:{key_secret}".encode("latin-1")).decode()
        # The headers requests sends for the SDK, in its order; the User-Agent is the SDK's
        # (it ends in a space: the SDK appends its empty app details).
        self._head = (
            f"Host: {authority}\r\n"
            f"User-Agent: Razorpay-Python/{_sdk_version()} \r\n"
            "Accept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\n"
            f"Authorization: Basic {credentials}\r\n"
        ).encode("latin-1")
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(concurrency)

    async def create_order(self, amount: int, currency: str, receipt: str) -> dict[str, Any]:
        data = {"amount": amount, "currency": currency, "receipt": receipt}
        return cast(dict[str, Any], await self._call("POST", "/v1/orders", data))

    async def capture(self, payment_id: str, amount: int, currency: str) -> CaptureOutcome:
        # The SDK's dict: the options ({"currency": ...}) with the amount added after them.
        data = {"currency": currency, "amount": amount}
        try:
            payment = await self._call("POST", f"/v1/payments/{_segment(payment_id)}/capture", data)
        except GatewayError as exc:
            # Razorpay refuses a second capture; the payment *is* captured at the gateway.
            if exc.refused and ALREADY_CAPTURED in str(exc):
                return CaptureOutcome(payment=None, already_captured=True)
            raise
        return CaptureOutcome(payment=cast(dict[str, Any], payment), already_captured=False)

    async def fetch_payment(self, payment_id: str) -> dict[str, Any]:
        return cast(dict[str, Any], await self._call("GET", f"/v1/payments/{_segment(payment_id)}"))

    async def _call(self, method: str, path: str, data: dict[str, Any] | None = None) -> Any:
        line = f"{method} {self._prefix}{path} HTTP/1.1\r\n".encode()
        if data is None:
            request = line + self._head + b"\r\n"
        else:
            body = json.dumps(data).encode()
            request = b"".join(
                (
                    line,
                    self._head,
                    b"Content-type: application/json\r\nContent-Length: ",
                    str(len(body)).encode(),
                    b"\r\n\r\n",
                    body,
                )
            )
        started = time.perf_counter()
        try:
            async with self._slots:
                status, raw = await self._exchange(request)
        except (OSError, EOFError) as exc:  # ConnectionError and ssl.SSLError among them
            raise _unavailable(_kind(exc), str(exc) or type(exc).__name__) from exc
        finally:
            timing.current().gateway_ms += (time.perf_counter() - started) * 1000
        return _answer(status, raw)

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        conn = self._checkout()
        if conn is None:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(
                _Connection, self._host, self._port, ssl=self._ssl
            )
        try:
            answer = await conn.exchange(request)
        except BaseException:
            conn.reusable = False
            raise
        finally:
            if conn.reusable and not conn.closed:
                self._idle.append(conn)
            elif conn.transport is not None:
                conn.transport.close()
        return answer

    def _checkout(self) -> _Connection | None:
        # Newest first: the one least likely to have been closed by the server meanwhile. One
        # the server closed is dropped, never written to: a capture sent on a dead connection
        # could not be retried without risking a second capture.
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            if conn.transport is not None:
                conn.transport.close()


def _kind(exc: BaseException) -> str:
    """What requests would call this failure, so that both clients answer alike."""
    if isinstance(exc, ssl.SSLError):
        return "SSLError"
    if isinstance(exc, ContentDecodingError):
        return "ContentDecodingError"
    return "ConnectionError"


def _segment(payment_id: str) -> str:
    # The SDK formats the id into the URL as it is; a payment id is [A-Za-z0-9_], which this
    # leaves alone. Anything else is escaped so that it stays one path segment.
    return quote(payment_id, safe="")


def _answer(status: int, raw: bytes) -> Any:
    """The SDK's reading of an answer: 2xx is the JSON body; otherwise `error.code` decides."""
    try:
        doc: Any = json.loads(raw)
    except ValueError as exc:
        raise _unavailable(type(exc).__name__, str(exc)) from exc
    if 200 <= status < 300:
        return doc
    error = doc.get("error") if isinstance(doc, dict) else None
    message, code = "", ""
    if isinstance(error, dict):
        message = str(error.get("description", ""))
        code = str(error.get("code", "")).upper()
    if code == "BAD_REQUEST_ERROR":
        raise _refused(message)
    raise _unavailable("GatewayError" if code == "GATEWAY_ERROR" else "ServerError", message)


def make_gateway_client(settings: Settings) -> GatewayClient:
    """GATEWAY_CLIENT=lean (default) or sdk."""
    make: Callable[[str, str, str, int], GatewayClient] = (
        SdkGatewayClient if settings.gateway_client == "sdk" else LeanGatewayClient
    )
    return make(
        settings.razorpay_key_id,
        settings.razorpay_key_secret,
        settings.razorpay_base_url,
        settings.gateway_threads,
    )
