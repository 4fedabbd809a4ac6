"""The ASGI middleware that carries the instrumentation across HTTP.

    InstrumentMiddleware   on every answer of the app: X-Payrace-Received-At (server clock,
                           ns) and, when the capture path ran, Server-Timing (lock, hold, db,
                           gateway); with probes on (PAYRACE_PROBES) only: honours
                           X-Payrace-Pause by holding the request in a Rendezvous shared by its
                           group, answers X-Payrace-Pause: honoured | timed-out, and a 400
                           invalid_pause for a malformed header

Plain ASGI; it sets the request's Timings and pause controller (ContextVars) before the app
runs, so the capture path fills and honours them. Installed by payrace.service.app.create_app().
"""

from __future__ import annotations

import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from payrace.service.instrument import probes, timing


class InstrumentMiddleware:
    """Adds Server-Timing to capture-path responses and honours X-Payrace-Pause (probes only).

    `groups` holds the forced-mode groups requested over HTTP, by group id; a group is
    dropped once every member has finished."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        probes_enabled: bool,
        is_blocked: probes.BlockedProbe,
        groups: dict[str, probes.Rendezvous],
    ) -> None:
        self.app = app
        self.probes_enabled = probes_enabled
        self.is_blocked = is_blocked
        self.groups = groups

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received_ns = time.time_ns()
        t = timing.begin()
        # Set when X-Payrace-Pause was honoured: the answer says so, and whether the pause
        # gave up waiting, so a harness never labels an unforced run "forced".
        paused: list[probes.ProbeContext] = []

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-payrace-received-at", str(received_ns).encode()))
                if t.lock_ms is not None or t.gateway_ms:
                    headers.append((b"server-timing", t.header().encode()))
                for probe in paused:
                    state = b"timed-out" if probe.timed_out else b"honoured"
                    headers.append((b"x-payrace-pause", state))
                message["headers"] = headers
            await send(message)

        pause_value = None
        if self.probes_enabled:
            for name, value in scope.get("headers", []):
                if name == b"x-payrace-pause":
                    pause_value = value.decode("latin-1")
        if pause_value is None:
            await self.app(scope, receive, send_with_headers)
            return
        try:
            request = probes.parse_pause_header(pause_value)
        except probes.PauseHeaderError as exc:
            response = JSONResponse(
                {"error": {"code": "invalid_pause", "message": str(exc)}}, status_code=400
            )
            await response(scope, receive, send)
            return
        self._forget_stale_groups()
        group = self.groups.get(request.group)
        if group is None:
            group = probes.Rendezvous(
                request.size,
                self.is_blocked,
                point=request.point,
                timeout_s=request.timeout_ms / 1000,
                hold_s=request.hold_ms / 1000,
            )
            self.groups[request.group] = group
        try:
            with probes.controlled(group, label=request.group) as probe:
                paused.append(probe)
                await self.app(scope, receive, send_with_headers)
        finally:
            if group.done():
                self.groups.pop(request.group, None)

    def _forget_stale_groups(self) -> None:
        # A group whose members never all arrived (a client gave up) would otherwise stay
        # forever, and a later request reusing its id would join it.
        now = time.monotonic()
        stale = [
            name
            for name, group in self.groups.items()
            if now - group.created > 2 * group.timeout_s + 1
        ]
        for name in stale:
            del self.groups[name]
