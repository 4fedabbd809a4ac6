"""Who fires it: carry one operation to the target and bring back what it answered.

    Prepared         a request ready to send (method, path, body bytes, headers)
    Reply            status (None = no answer), JSON body, headers, the target's own timings
    prepare()        a generator Step -> the signed client callback or webhook it stands for,
                     shaped by the target's profile (model.profile: routes, bodies, keys, hook)
    Client           create_order / send / send_together
    ├── AsgiClient       an ASGI app (the reference service) called in the harness's own
    │                    event loop, in the caller's task
    └── HttpClient       any service over real HTTP; send_together() uses last-byte
                         synchronisation: every request is written up to the last byte of its
                         head on its own connection, then all the rest goes out at once

Bodies are signed exactly as sent (the webhook signature covers the raw bytes), so a
prepared request is never re-encoded on the way out.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

import httpx

from payrace.harness.gateway.signing import new_event_id
from payrace.harness.model.generator import Step
from payrace.harness.model.profile import Hook, Outgoing, Profile
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
    amount: int = 50_000
    currency: str = "INR"

    def values(self) -> dict[str, Any]:
        """What a profile's templates may refer to (docs/profile.md, "Placeholders")."""
        return {
            "amount": self.amount,
            "currency": self.currency,
            "gateway_order_id": self.gateway_order_id,
            "payment_id": self.payment_id,
        }


REFERENCE = Profile.reference()


def prepare(
    step: Step,
    index: int,
    ctx: PaymentContext,
    profile: Profile = REFERENCE,
    hook: Hook | None = None,
) -> Prepared:
    pay_id = ctx.gateway_payment["id"]
    if step.kind == "verify":
        out = profile.signed_callback(ctx.values(), ctx.gateway_order_id, pay_id, hook)
        return Prepared(
            out.method, out.path, out.body, out.headers, "verify", {"gateway_payment_id": pay_id}
        )
    assert step.event is not None
    if step.same_event_as is not None and step.same_event_as in ctx.event_ids:
        event_id = ctx.event_ids[step.same_event_as]
    else:
        event_id = new_event_id()
    ctx.event_ids[index] = event_id
    out = profile.signed_webhook(ctx.values(), step.event, ctx.gateway_payment, event_id, hook)
    return Prepared(
        out.method,
        out.path,
        out.body,
        out.headers,
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
    async def create_order(
        self,
        amount: int,
        currency: str,
        profile: Profile = REFERENCE,
        gateway_order_id: str | None = None,
        hook: Hook | None = None,
    ) -> dict[str, Any]: ...

    async def send(self, req: Prepared, extra_headers: dict[str, str] | None = None) -> Reply: ...

    async def send_together(self, reqs: list[Prepared]) -> list[Reply]: ...

    async def aclose(self) -> None: ...


def _order_request(
    profile: Profile,
    amount: int,
    currency: str,
    gateway_order_id: str | None,
    hook: Hook | None,
) -> Outgoing:
    values: dict[str, Any] = {"amount": amount, "currency": currency}
    if gateway_order_id is not None:
        values["gateway_order_id"] = gateway_order_id
    out = profile.create_order.outgoing(values)
    if hook is not None:
        hook("create_order", out)
    return out


class _Orders:
    """create_order over the one HTTP exchange each client makes its own way (_exchange)."""

    async def _exchange(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, str, str]:
        """(status, body as text, the path as sent)."""
        raise NotImplementedError

    async def create_order(
        self,
        amount: int,
        currency: str,
        profile: Profile = REFERENCE,
        gateway_order_id: str | None = None,
        hook: Hook | None = None,
    ) -> dict[str, Any]:
        """The target's payment id and Razorpay's order id for a new order: `payment_id`,
        `gateway_order_id` (given when payrace created the order at the gateway itself)."""
        out = _order_request(profile, amount, currency, gateway_order_id, hook)
        status, text, path = await self._exchange(out.method, out.path, out.body, out.headers)
        payment_id, order_id = profile.order_answer(f"{out.method} {path}", status, text)
        return {"payment_id": payment_id, "gateway_order_id": order_id or gateway_order_id}


class _HttpxBase(_Orders):
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def _exchange(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, str, str]:
        response = await self.http.request(method, path, content=body, headers=headers)
        return response.status_code, response.text, response.url.path

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


class AsgiClient(_Orders):
    """In-process: each request calls the ASGI app in the caller's task, so probes'
    contextvars reach it. The app is called directly rather than through httpx's
    ASGITransport, which cost about as much as a sixth of the service's own handling of a
    request (a client, a transport, an anyio event and an async generator per request)."""

    HOST = "payrace-inproc"

    def __init__(self, app: Any) -> None:
        self.app = app

    async def _exchange(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, str, str]:
        status, _, answer, sent = await self._call(method, path, body, headers)
        return status, answer.decode("utf-8", errors="replace"), sent

    async def send(self, req: Prepared, extra_headers: dict[str, str] | None = None) -> Reply:
        headers = {**req.headers, **(extra_headers or {})}
        status, answer, body, _ = await self._call(req.method, req.path, req.body, headers)
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {"raw": body.decode("utf-8", errors="replace")[:500]}
        return Reply(status, doc if isinstance(doc, dict) else {"value": doc}, answer)

    async def _call(
        self, method: str, target: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes, str]:
        """One HTTP exchange with the app: (status, headers lower-cased with repeats joined
        by ", " as httpx joins them, body, the path as sent)."""
        raw_path, _, query = quote(target, safe=_URL_SAFE).partition("?")
        head = [
            (b"host", self.HOST.encode()),
            (b"accept", b"*/*"),
            (b"user-agent", b"payrace"),
            (b"content-length", str(len(body)).encode()),
        ]
        given = {k.lower(): v for k, v in headers.items()}
        head = [(k, v) for k, v in head if k.decode() not in given]
        head += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in given.items()]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method.upper(),
            "scheme": "http",
            "path": unquote(raw_path),
            "raw_path": raw_path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": head,
            "client": ("127.0.0.1", 123),
            "server": (self.HOST, 80),
            "extensions": {},
        }
        sent_body = False
        complete = asyncio.Event()
        status: int | None = None
        answer: dict[str, str] = {}
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await complete.wait()  # as a client that keeps the connection until the answer
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for key, value in message.get("headers", []):
                    name, text = key.decode("latin-1").lower(), value.decode("latin-1")
                    answer[name] = f"{answer[name]}, {text}" if name in answer else text
            elif message["type"] == "http.response.body" and not complete.is_set():
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    complete.set()

        await self.app(scope, receive, send)
        if status is None or not complete.is_set():
            raise RuntimeError(f"the app returned without a complete answer to {method} {target}")
        return status, answer, b"".join(chunks), unquote(raw_path)

    async def send_together(self, reqs: list[Prepared]) -> list[Reply]:
        gate = asyncio.Event()

        async def one(req: Prepared) -> Reply:
            await gate.wait()
            return await self.send(req)

        tasks = [asyncio.create_task(one(r)) for r in reqs]
        await asyncio.sleep(0)  # every task is parked on the gate before it opens
        gate.set()
        return list(await asyncio.gather(*tasks))

    async def aclose(self) -> None:
        """Nothing to close: no connection, no client."""


# What a request target may carry unescaped (RFC 3986 path and query characters, and '%' so
# an already escaped target is not escaped twice).
_URL_SAFE = "/?=&;:@!$'()*+,-._~%"


class HttpClient(_HttpxBase):
    def __init__(self, base_url: str, *, verify_tls: bool = True) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"target URL must look like http://127.0.0.1:8000, got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.tls = ssl.create_default_context()
            if not verify_tls:  # a test deployment's self-signed certificate, by the profile
                self.tls.check_hostname = False
                self.tls.verify_mode = ssl.CERT_NONE
        # A service mounted under a path (http://host/api) gets its routes under it, in the
        # raw aligned sends too (httpx joins base_url and path itself).
        self.prefix = parts.path.rstrip("/")
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        super().__init__(
            httpx.AsyncClient(
                base_url=base_url,
                timeout=REQUEST_TIMEOUT_S,
                limits=limits,
                verify=self.tls if self.tls is not None else True,
            )
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
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls)
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
