"""A minimal HTTP/1.1 load generator for `payrace bench`, run in a process of its own so its
CPU share can be measured apart from the service's and the fake gateway's.

    LoadSpec     where to send what: one prepared request body per capture, used once each
    run_load()   `connections` keep-alive connections over asyncio streams, each sending its
                 next body as soon as the previous answer is read, until `duration_s` or the
                 bodies run out; latency and Server-Timing (lock, hold) into HdrHistograms
    main()       `python -m payrace.harness.bench.loadgen SPEC.json OUT.json`

Why not httpx or Locust here: both spend more CPU per request than the reference service's
own Python, so at saturation they measure themselves. Raw streams with prebuilt request bytes
cost a few tens of microseconds a request; the report shows that share (its CPU seconds over
the window) so a reader can check it is not the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from payrace.service.instrument.timing import parse_server_timing

_MAX_US = 60_000_000  # a minute: anything longer is a hung request, counted at the top


@dataclass(frozen=True)
class LoadSpec:
    host: str
    port: int
    path: str
    bodies: list[bytes]
    connections: int
    duration_s: float
    warmup_s: float


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


async def _connection(
    spec: LoadSpec, requests: Iterator[bytes], figures: _Figures, window: tuple[float, float]
) -> None:
    reader, writer = await asyncio.open_connection(spec.host, spec.port)
    start, end = window
    try:
        for request in requests:
            sent = time.perf_counter()
            if sent >= end:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            timing = ""
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                lowered = name.lower()
                if lowered == b"content-length":
                    length = int(value)
                elif lowered == b"server-timing":
                    timing = value.decode()
            await reader.readexactly(length)
            done = time.perf_counter()
            if sent < start:
                continue  # warm-up: connections, pools and caches filling
            figures.statuses[status] = figures.statuses.get(status, 0) + 1
            if status != 200:
                figures.failed += 1
                continue
            figures.ok += 1
            figures.latency.record_value(min(_MAX_US, max(1, int((done - sent) * 1e6))))
            parsed = parse_server_timing(timing)
            if "lock" in parsed:
                figures.lock.record_value(min(_MAX_US, max(1, int(parsed["lock"] * 1000))))
            if "hold" in parsed:
                figures.hold.record_value(min(_MAX_US, max(1, int(parsed["hold"] * 1000))))
    finally:
        writer.close()


def _ms(hist: HdrHistogram, percentile: float) -> float | None:
    if hist.get_total_count() == 0:
        return None
    return round(float(hist.get_value_at_percentile(percentile)) / 1000.0, 3)


async def run_load(spec: LoadSpec) -> dict[str, Any]:
    figures = _Figures()
    requests = iter([_request(spec, body) for body in spec.bodies])
    t0 = time.perf_counter()
    window = (t0 + spec.warmup_s, t0 + spec.warmup_s + spec.duration_s)
    cpu0 = time.process_time()
    tasks = [
        asyncio.create_task(_connection(spec, requests, figures, window))
        for _ in range(spec.connections)
    ]
    await asyncio.gather(*tasks)
    # The window ends at its deadline, or earlier when the prepared bodies ran out.
    measured_s = min(time.perf_counter(), window[1]) - window[0]
    cpu_s = time.process_time() - cpu0
    elapsed = time.perf_counter() - t0
    return {
        "connections": spec.connections,
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
        # The generator's own CPU over its whole life (warm-up included): one core's share.
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
    )
    result = asyncio.run(run_load(spec))
    Path(args[1]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
