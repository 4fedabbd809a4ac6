"""Who fires it: carry one operation to the target and bring back what it answered.

    Prepared         a request ready to send (method, path, body bytes, headers)
    Reply            status (None = no answer), JSON body, headers, the target's own timings
    prepare()        a generator Step -> the signed client callback or webhook it stands for
    Client           create_order / send / send_together
    ├── AsgiClient       the reference service in the harness's own event loop (httpx ASGI)
    └── HttpClient       any service over real HTTP; send_together() uses last-byte
                         synchronisation: every request is written up to the last byte of its
                         head on its own connection, then all the rest goes out at once

Bodies are signed exactly as sent (the webhook signature covers the raw bytes), so a
prepared request is never re-encoded on the way out.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from payrace.harness.errors import UsageError
from payrace.harness.gateway.signing import (
    GatewayKeys,
    client_callback,
    new_event_id,
    signed_webhook,
    webhook_event,
)
from payrace.harness.model.generator import Step
from payrace.service.instrument.timing import parse_server_timing

REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Prepared:
    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    f: str  # history name: "verify" | "webhook"
    value: dict[str, Any] = field(default_factory=dict)  # what the history records at invoke


@dataclass(frozen=True)
class Reply:
    status: int | None
    body: dict[str, Any]
    headers: dict[str, str]
    error: str | None = None

    def server(self) -> dict[str, Any]:
        """The target's self-report: Server-Timing entries and when it received the request."""
        out: dict[str, Any] = dict(parse_server_timing(self.headers.get("server-timing", "")))
        received = self.headers.get("x-payrace-received-at")
        if received and received.isdigit():
            out["received_at_ns"] = int(received)
        return out


@dataclass
class PaymentContext:
    """What one trial's requests are about: the order here, and the payment at the gateway."""

    payment_id: int
    gateway_order_id: str
    gateway_payment: dict[str, Any]
    event_ids: dict[int, str] = field(default_factory=dict)


def prepare(step: Step, index: int, ctx: PaymentContext, keys: GatewayKeys) -> Prepared:
    pay_id = ctx.gateway_payment["id"]
    if step.kind == "verify":
        body = client_callback(ctx.gateway_order_id, pay_id, keys.key_secret)
        payload = {**body, "internal_payment_id": ctx.payment_id}
        return Prepared(
            "POST",
            "/payments/verify",
            json.dumps(payload).encode(),
            {"content-type": "application/json"},
            "verify",
            {"gateway_payment_id": pay_id},
        )
    assert step.event is not None
    if step.same_event_as is not None and step.same_event_as in ctx.event_ids:
        event_id = ctx.event_ids[step.same_event_as]
    else:
        event_id = new_event_id()
    ctx.event_ids[index] = event_id
    envelope = webhook_event(step.event, ctx.gateway_payment, account_id=keys.account_id)
    raw, headers = signed_webhook(envelope, keys.webhook_secret, event_id=event_id)
    return Prepared(
        "POST",
        "/webhooks/razorpay",
        raw,
        {k.lower(): v for k, v in headers.items()},
        "webhook",
        {"event": step.event, "event_id": event_id, "gateway_payment_id": pay_id},
    )


def _reply(response: httpx.Response) -> Reply:
    try:
        body = response.json()
    except ValueError:
        body = {"raw": response.text[:500]}
    return Reply(
        response.status_code,
        body if isinstance(body, dict) else {"value": body},
        {k.lower(): v for k, v in response.headers.items()},
    )


class Client(Protocol):
    async def create_order(self, amount: int, currency: str) -> dict[str, Any]: ...

    async def send(self, req: Prepared, extra_headers: dict[str, str] | None = None) -> Reply: ...

    async def send_together(self, reqs: list[Prepared]) -> list[Reply]: ...

    async def aclose(self) -> None: ...


class _HttpxBase:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def create_order(self, amount: int, currency: str) -> dict[str, Any]:
        response = await self.http.post("/orders", json={"amount": amount, "currency": currency})
        if 400 <= response.status_code < 500:
            # The order is setup, not the race under test: a refusal means the target does not
            # speak the contract, which no trial can fix.
            raise UsageError(
                f"the target answered POST {response.url.path} with HTTP {response.status_code} "
                f"({response.text[:200]}): it must accept {{amount, currency}} and answer 201 "
                "with payment_id and gateway_order_id (README, 'The reference service's API')"
            )
        if response.status_code != 201:
            raise RuntimeError(
                f"target refused POST /orders: HTTP {response.status_code} {response.text[:300]}"
            )
        doc: dict[str, Any] = response.json()
        missing = [k for k in ("payment_id", "gateway_order_id") if k not in doc]
        if missing:
            raise UsageError(
                f"the target's POST {response.url.path} answered 201 without "
                f"{', '.join(missing)}: payrace needs both to race the payment"
            )
        return doc

    async def send(self, req: Prepared, extra_headers: dict[str, str] | None = None) -> Reply:
        headers = {**req.headers, **(extra_headers or {})}
        try:
            response = await self.http.request(
                req.method, req.path, content=req.body, headers=headers
            )
        except httpx.HTTPError as exc:
            return Reply(None, {}, {}, f"{type(exc).__name__}: {exc}")
        return _reply(response)

    async def aclose(self) -> None:
        await self.http.aclose()


class AsgiClient(_HttpxBase):
    """In-process: requests run as tasks of this loop, so probes' contextvars reach them."""

    def __init__(self, app: Any) -> None:
        super().__init__(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://payrace-inproc",
                timeout=REQUEST_TIMEOUT_S,
            )
        )

    async def send_together(self, reqs: list[Prepared]) -> list[Reply]:
        gate = asyncio.Event()

        async def one(req: Prepared) -> Reply:
            await gate.wait()
            return await self.send(req)

        tasks = [asyncio.create_task(one(r)) for r in reqs]
        await asyncio.sleep(0)  # every task is parked on the gate before it opens
        gate.set()
        return list(await asyncio.gather(*tasks))


class HttpClient(_HttpxBase):
    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"target URL must look like http://127.0.0.1:8000, got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        # A service mounted under a path (http://host/api) gets its routes under it, in the
        # raw aligned sends too (httpx joins base_url and path itself).
        self.prefix = parts.path.rstrip("/")
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        super().__init__(
            httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits)
        )

    async def send_together(self, reqs: list[Prepared]) -> list[Reply]:
        """Last-byte synchronisation: the server cannot start any request before the last
        byte of its head arrives, so holding that byte (and the body after it) back lines
        them all up. Holding back only the body's last byte would not do: a server starts
        its app, and stamps X-Payrace-Received-At, as soon as the head is complete."""
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        raws = [self._raw(req) for req in reqs]
        cuts = [raw.index(b"\r\n\r\n") + 3 for raw in raws]
        try:
            for raw, cut in zip(raws, cuts, strict=True):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                conns.append((reader, writer))
                writer.write(raw[:cut])
                await writer.drain()
            for (_, writer), raw, cut in zip(conns, raws, cuts, strict=True):
                writer.write(raw[cut:])
            await asyncio.gather(*(w.drain() for _, w in conns))
            return list(await asyncio.gather(*(self._read(r) for r, _ in conns)))
        except OSError as exc:
            return [Reply(None, {}, {}, f"{type(exc).__name__}: {exc}") for _ in reqs]
        finally:
            for _, writer in conns:
                writer.close()

    def _raw(self, req: Prepared) -> bytes:
        lines = [f"{req.method} {self.prefix}{req.path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in req.headers.items()]
        lines += [f"Content-Length: {len(req.body)}", "Connection: close", "", ""]
        return "\r\n".join(lines).encode("latin-1") + req.body

    async def _read(self, reader: asyncio.StreamReader) -> Reply:
        try:
            raw = await asyncio.wait_for(reader.read(), timeout=REQUEST_TIMEOUT_S)
        except (TimeoutError, OSError) as exc:
            return Reply(None, {}, {}, f"{type(exc).__name__}: {exc}")
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            return Reply(None, {}, {}, f"unparseable response: {raw[:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            doc = {"raw": body[:500].decode("latin-1")}
        return Reply(status, doc if isinstance(doc, dict) else {"value": doc}, headers)
