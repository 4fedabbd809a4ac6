"""A minimal HTTP/1.1 load generator for `payrace bench`, run in a process of its own so its
CPU share can be measured apart from the service's and the fake gateway's.

    LoadSpec     where to send what: one prepared request body per capture, used once each
    run_load()   `connections` keep-alive connections (an asyncio protocol each; uvloop's
                 loop when run by main()), spread evenly over the server's worker processes
                 when it names them, each sending its next body as soon as the previous
                 answer is read, until `duration_s` or the bodies run out; each answer's
                 status, latency and head noted, then tallied into HdrHistograms (latency,
                 Server-Timing's lock and hold) once the window is over
    balanced()   open the connections and move them until each worker holds its share
    main()       `python -m payrace.harness.bench.loadgen SPEC.json OUT.json`

Why not httpx or Locust here: both spend more CPU per request than the reference service's
own Python, so at saturation they measure themselves. A raw protocol with prebuilt request
bytes costs a few tens of microseconds a request; the report shows that share (its CPU
seconds over the window) so a reader can check it is not the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psutil
import uvloop
from hdrh.histogram import HdrHistogram

from payrace.service.instrument.timing import parse_server_timing

_MAX_US = 60_000_000  # a minute: anything longer is a hung request, counted at the top
# How long balanced() may move connections before the window starts unbalanced (and says so):
# a worker still starting accepts nothing until it is up.
_BALANCE_S = 15.0


@dataclass(frozen=True)
class LoadSpec:
    host: str
    port: int
    path: str
    bodies: list[bytes]
    connections: int
    duration_s: float
    warmup_s: float
    # The server's worker processes sharing its listening socket (uvicorn --workers N), and a
    # path any of them answers: the connections are spread evenly over them. Empty: as the
    # kernel hands them out.
    workers: tuple[int, ...] = ()
    probe_path: str = "/healthz"


def _request(spec: LoadSpec, body: bytes) -> bytes:
    head = (
        f"POST {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Figures:
    def __init__(self) -> None:
        self.latency = HdrHistogram(1, _MAX_US, 3)
        self.lock = HdrHistogram(1, _MAX_US, 3)
        self.hold = HdrHistogram(1, _MAX_US, 3)
        self.ok = 0
        self.failed = 0
        self.statuses: dict[int, int] = {}


class _Exchange(asyncio.Protocol):
    """One keep-alive connection as a protocol: `exchange()` writes a request and resolves
    once the whole answer is in, parsed in the one callback that completes it. A stream
    reader would cost two awaits (head, then body), each a future and a task step."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None:
            self._complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("the server closed the connection")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def _complete(self) -> None:
        """Resolve the waiter with (status, head) once head and body are both buffered."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buffer[:end])
        size = end + 4 + _content_length(head)
        if len(buffer) < size:
            return
        del buffer[:size]
        waiter, self.waiter = self.waiter, None
        assert waiter is not None
        if not waiter.done():
            waiter.set_result((int(head[9:12]), head))

    def exchange(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        waiter = asyncio.get_running_loop().create_future()
        if self.lost is not None:
            waiter.set_exception(self.lost)
            return waiter
        self.waiter = waiter
        self.transport.write(request)
        if self.buffer:  # an answer that came early (never from a well-behaved server)
            self._complete()
        return waiter


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (lower case, with its colon) in a response head, or None."""
    at = head.lower().find(b"\r\n" + name)
    if at < 0:
        return None
    start = at + 2 + len(name)
    stop = head.find(b"\r\n", start)
    return head[start : stop if stop >= 0 else len(head)].strip()


def _content_length(head: bytes) -> int:
    value = _header(head, b"content-length:")
    return int(value) if value else 0


Opened = tuple[asyncio.Transport, _Exchange]


async def _open(spec: LoadSpec) -> Opened:
    loop = asyncio.get_running_loop()
    transport, conn = await loop.create_connection(_Exchange, spec.host, spec.port)
    return transport, conn


def _owners(workers: tuple[int, ...]) -> dict[int, int]:
    """Our local port -> the worker process holding the other end, from the kernel's tables
    (psutil): which process accepted a connection is the kernel's choice, and the server does
    not say."""
    owners: dict[int, int] = {}
    for pid in workers:
        with contextlib.suppress(psutil.Error):
            for c in psutil.Process(pid).net_connections(kind="tcp"):
                if c.raddr and c.status == psutil.CONN_ESTABLISHED:
                    owners[c.raddr.port] = pid
    return owners


async def balanced(spec: LoadSpec) -> tuple[list[Opened], dict[int, int]]:
    """`spec.connections` open connections and how many each worker holds.

    Worker processes that share one listening socket take the connections as the kernel wakes
    them: with 32 opened at once, one uvicorn worker of two did 90 % of the work in three
    windows of five (psutil, each worker's CPU), so a "2 workers" figure was often one
    worker's; 16 opened to three asyncio workers all went to one, five times of five. A
    connection is only accepted once a request has gone through it, so each is probed first;
    one held by a worker above its share is closed and another opened in its place, until
    each holds its share or _BALANCE_S passes (a worker that never accepts: the split is then
    reported as it is)."""
    opened = list(await asyncio.gather(*(_open(spec) for _ in range(spec.connections))))
    if len(spec.workers) < 2:
        return opened, {}
    probe = (f"GET {spec.probe_path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n\r\n").encode()
    await asyncio.gather(*(conn.exchange(probe) for _, conn in opened))
    share = {pid: spec.connections // len(spec.workers) for pid in spec.workers}
    for pid in spec.workers[: spec.connections % len(spec.workers)]:
        share[pid] += 1
    deadline = time.monotonic() + _BALANCE_S
    while True:
        owners = _owners(spec.workers)
        by_worker: dict[int, list[int]] = {pid: [] for pid in spec.workers}
        for i, (transport, _) in enumerate(opened):
            owner = owners.get(transport.get_extra_info("sockname")[1])
            if owner is not None:
                by_worker[owner].append(i)
        counts = {pid: len(held) for pid, held in by_worker.items()}
        over = [held[share[pid] :] for pid, held in by_worker.items() if len(held) > share[pid]]
        if not over or time.monotonic() > deadline:
            return opened, counts
        for i in [i for surplus in over for i in surplus]:
            opened[i][0].close()
            opened[i] = await _open(spec)
            await opened[i][1].exchange(probe)


async def _connection(
    opened: Opened,
    requests: Iterator[bytes],
    answers: list[tuple[int, float, bytes]],
    window: tuple[float, float],
) -> None:
    transport, conn = opened
    start, end = window
    try:
        for request in requests:
            sent = time.perf_counter()
            if sent >= end:
                return
            status, head = await conn.exchange(request)
            if sent >= start:  # before: warm-up (connections, pools and caches filling)
                answers.append((status, time.perf_counter() - sent, head))
    finally:
        transport.close()


def _tally(answers: list[tuple[int, float, bytes]]) -> _Figures:
    """The answers of the window as figures, once it is over: while it runs, the generator
    shares the machine with the service it measures, so it only notes what came back."""
    figures = _Figures()
    for status, latency_s, head in answers:
        figures.statuses[status] = figures.statuses.get(status, 0) + 1
        if status != 200:
            figures.failed += 1
            continue
        figures.ok += 1
        figures.latency.record_value(min(_MAX_US, max(1, int(latency_s * 1e6))))
        timing = _header(head, b"server-timing:")
        if timing is None:
            continue
        parsed = parse_server_timing(timing.decode())
        if "lock" in parsed:
            figures.lock.record_value(min(_MAX_US, max(1, int(parsed["lock"] * 1000))))
        if "hold" in parsed:
            figures.hold.record_value(min(_MAX_US, max(1, int(parsed["hold"] * 1000))))
    return figures


def _ms(hist: HdrHistogram, percentile: float) -> float | None:
    if hist.get_total_count() == 0:
        return None
    return round(float(hist.get_value_at_percentile(percentile)) / 1000.0, 3)


async def run_load(spec: LoadSpec) -> dict[str, Any]:
    answers: list[tuple[int, float, bytes]] = []
    requests = iter([_request(spec, body) for body in spec.bodies])
    opened, per_worker = await balanced(spec)
    t0 = time.perf_counter()
    window = (t0 + spec.warmup_s, t0 + spec.warmup_s + spec.duration_s)
    cpu0 = time.process_time()
    tasks = [asyncio.create_task(_connection(conn, requests, answers, window)) for conn in opened]
    await asyncio.gather(*tasks)
    # The window ends at its deadline, or earlier when the prepared bodies ran out.
    measured_s = min(time.perf_counter(), window[1]) - window[0]
    # The generator's CPU while it generated load: its tally comes after.
    cpu_s = time.process_time() - cpu0
    elapsed = time.perf_counter() - t0
    figures = _tally(answers)
    return {
        "connections": spec.connections,
        # Connections each worker held through the window, in the order of spec.workers.
        "connections_per_worker": [per_worker[pid] for pid in spec.workers if per_worker],
        "window_s": round(measured_s, 3),
        "ok": figures.ok,
        "failed": figures.failed,
        "statuses": {str(k): v for k, v in sorted(figures.statuses.items())},
        "captures_per_s": round(figures.ok / measured_s, 1) if measured_s > 0 else 0.0,
        "request_p50_ms": _ms(figures.latency, 50),
        "request_p99_ms": _ms(figures.latency, 99),
        "lock_p50_ms": _ms(figures.lock, 50),
        "lock_p99_ms": _ms(figures.lock, 99),
        "hold_p50_ms": _ms(figures.hold, 50),
        "hold_p99_ms": _ms(figures.hold, 99),
        # The generator's own CPU while it sent (warm-up included, its tally not): one
        # core's share.
        "loadgen_cpu_s": round(cpu_s, 3),
        "loadgen_core_percent": round(100.0 * cpu_s / elapsed, 1) if elapsed > 0 else None,
        "loadgen_max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m payrace.harness.bench.loadgen SPEC.json OUT.json", file=sys.stderr)
        return 2
    raw = json.loads(Path(args[0]).read_text())
    spec = LoadSpec(
        host=raw["host"],
        port=int(raw["port"]),
        path=raw["path"],
        bodies=[json.dumps(b, separators=(",", ":")).encode() for b in raw["bodies"]],
        connections=int(raw["connections"]),
        duration_s=float(raw["duration_s"]),
        warmup_s=float(raw["warmup_s"]),
        workers=tuple(int(pid) for pid in raw.get("workers", ())),
        probe_path=str(raw.get("probe_path", "/healthz")),
    )
    # uvloop (a payrace dependency): the generator's own CPU per request is part of the
    # machine's budget the service is measured on.
    result = uvloop.run(run_load(spec))
    Path(args[1]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
