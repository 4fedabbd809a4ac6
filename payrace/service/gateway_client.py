"""The service's side of Razorpay: the real `razorpay` SDK, kept off the event loop.

The SDK is synchronous (requests), so every call runs in a dedicated thread pool sized by
GATEWAY_THREADS: asyncio's default pool has min(32, cores + 4) threads, which on a small
machine would queue gateway calls behind each other while they hold row locks.

    GatewayClient.create_order()  POST /v1/orders
    GatewayClient.capture()       POST /v1/payments/{id}/capture; "already captured" is success
    GatewayClient.fetch_payment() GET /v1/payments/{id}: what the reconciler asks
    GatewayError                  the gateway failed or refused; the request answers 502
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, cast

import razorpay
import requests
from razorpay.errors import BadRequestError, ServerError
from razorpay.errors import GatewayError as SdkGatewayError

from payrace.redact import without_endpoints
from payrace.service.instrument import timing

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


class GatewayClient:
    def __init__(self, key_id: str, key_secret: str, base_url: str, threads: int = 64) -> None:
        self._auth = (key_id, key_secret)
        self._base_url = base_url.rstrip("/")
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="razorpay")

    def _client(self) -> Any:
        # requests.Session is not documented as thread-safe: one SDK client per thread.
        client = getattr(self._local, "client", None)
        if client is None:
            client = razorpay.Client(auth=self._auth, base_url=self._base_url)
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
            except BadRequestError as exc:
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
        except BadRequestError as exc:
            raise GatewayError(f"gateway refused the call: {exc}", refused=True) from exc
        except (ServerError, SdkGatewayError, requests.RequestException, ValueError) as exc:
            # The answer says what failed, not where the gateway lives (a 502 body is public).
            said = without_endpoints(str(exc))
            raise GatewayError(f"gateway unavailable: {type(exc).__name__}: {said}") from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
