"""The fake Razorpay over HTTP: its routes, and a threaded uvicorn server around them.

    razorpay_app(fake)   the Starlette app a FakeRazorpay answers through:
        POST /v1/orders                  GET /v1/orders/{id}
        GET  /v1/payments/{id}           POST /v1/payments/{id}/capture
        /_fake/counters  /_fake/payments  /_fake/knobs  /_fake/reset    (test control, no auth)
        /_fake/holds  GET (armed ids -> calls held), POST {payment_id, timeout_s} (arm);
        /_fake/holds/{id}/release  POST;  /_fake/holds/{id}  DELETE (disarm)   (capture barrier)
    GatewayServer        context manager: razorpay_app(fake) under uvicorn, free port, own thread

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
import socket
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import uvicorn
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
from payrace.harness.infra.readiness import wait_until_answers

_Handler = Callable[[Request], Awaitable[dict[str, Any]]]


def razorpay_app(fake: FakeRazorpay) -> Starlette:
    # The keys are fixed for the fake's life: the expected header is built once, not per call.
    credentials = f"{fake.keys.key_id}:{fake.keys.key_secret}".encode()
    expected = b"Basic " + base64.b64encode(credentials)

    def authenticate(request: Request) -> None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            raise RazorpayError(401, "Please provide your api key for authentication purposes.")
        if not hmac.compare_digest(header.encode(), expected):
            raise RazorpayError(401, "Authentication failed")

    def v1(handler: _Handler, *, capture: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            authenticate(request)
            delay = fake.delay_s(capture=capture)
            if delay:
                # The server loop serves every other request meanwhile; that is what lets a
                # slow gateway stretch the window in which two captures overlap.
                await asyncio.sleep(delay)
            return JSONResponse(await handler(request))

        return endpoint

    async def create_order(request: Request) -> dict[str, Any]:
        return fake.create_order(json_object(await request.body()))

    async def order(request: Request) -> dict[str, Any]:
        found = fake.order(request.path_params["order_id"])
        if found is None:
            raise not_found()
        return found

    async def payment(request: Request) -> dict[str, Any]:
        found = fake.payment(request.path_params["payment_id"])
        if found is None:
            raise not_found()
        return found

    async def capture(request: Request) -> dict[str, Any]:
        payment_id = request.path_params["payment_id"]
        body = json_object(await request.body())
        hold = fake.hold_capture(payment_id)
        if hold is not None:
            await _held(fake, hold)
        captured = fake.capture(payment_id, body)
        for hook in fake.after_capture():
            # Captured, and the caller not yet told: a hook may break the caller meanwhile.
            await asyncio.to_thread(hook, payment_id)
        return captured

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
            Route("/v1/orders", v1(create_order), methods=["POST"]),
            Route("/v1/orders/{order_id}", v1(order), methods=["GET"]),
            Route("/v1/payments/{payment_id}", v1(payment), methods=["GET"]),
            Route("/v1/payments/{payment_id}/capture", v1(capture, capture=True), methods=["POST"]),
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


class GatewayServer:
    """razorpay_app(fake) under uvicorn in a thread on `host`; a free port unless one is given."""

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
        self._server: uvicorn.Server | None = None
        self._crash: BaseException | None = None

    def __enter__(self) -> GatewayServer:
        # Binding here, not in uvicorn, makes port 0 resolve before the thread starts, so the
        # URL is known and a busy port fails loudly in the caller's thread.
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
        config = uvicorn.Config(
            razorpay_app(self.fake),
            lifespan="off",
            ws="none",  # nothing here speaks websockets; importing them only brings warnings
            # httptools, the C parser the service runs on too: the fake shares the machine's
            # cores with the service it answers, and h11 cost it about twice the CPU per call.
            http="httptools",
            log_config=None,  # leave the process's logging as the caller configured it
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
            # The SDK's requests.Session reuses idle keep-alive connections. With uvicorn's 5 s
            # default, a call sent just as the server closes an idle one is reset (a 502 from
            # the service on a busy machine, e.g. the explorer's batch of orders after a pause):
            # keep them far longer than any pause between a run's calls.
            timeout_keep_alive=300,
        )
        self._server = uvicorn.Server(config)
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
        assert self._server is not None
        try:
            self._server.run(sockets=[sock])
        except BaseException as exc:  # kept for the start-up error message
            self._crash = exc
        finally:
            sock.close()

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
        if self._server is None or self.thread is None:
            return
        self.fake.disarm_all_holds()  # a held capture would keep the server from stopping
        self._server.should_exit = True
        self.thread.join(timeout=5)
        if self.thread.is_alive():
            # Requests stuck in injected latency outlived the graceful shutdown.
            self._server.force_exit = True
            self.thread.join(timeout=5)
        if self.thread.is_alive():
            raise RuntimeError(f"fake gateway thread {self.thread.name} did not stop")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()
