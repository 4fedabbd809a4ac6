from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from payrace.harness.bench import loadgen
from payrace.harness.bench.loadgen import LoadSpec, balanced, main, run_load


async def _server(answers: list[int]) -> asyncio.Server:
    """Answers each request with the next status; 200s carry Server-Timing lock 2 ms, hold 3."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                status = answers.pop(0) if answers else 200
                timing = b"Server-Timing: lock;dur=2, hold;dur=3\r\n" if status == 200 else b""
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n%s\r\n{}" % (status, timing))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_each_body_is_sent_once_and_only_200s_count_as_captures() -> None:
    server = await _server([409, 200, 500])
    port = server.sockets[0].getsockname()[1]
    spec = LoadSpec("127.0.0.1", port, "/x", [b"{}"] * 30, connections=1, duration_s=5, warmup_s=0)
    async with server:
        result = await run_load(spec)
    assert result["ok"] == 28
    assert result["failed"] == 2
    assert result["statuses"] == {"200": 28, "409": 1, "500": 1}
    assert result["lock_p50_ms"] == pytest.approx(2.0, abs=0.01)  # HdrHistogram precision
    assert result["hold_p99_ms"] == pytest.approx(3.0, abs=0.01)
    assert result["request_p50_ms"] > 0
    assert result["captures_per_s"] > 0
    assert result["loadgen_cpu_s"] > 0


async def test_the_window_ends_at_its_deadline_with_bodies_left() -> None:
    server = await _server([])
    port = server.sockets[0].getsockname()[1]
    spec = LoadSpec(
        "127.0.0.1", port, "/x", [b"{}"] * 10**6, connections=2, duration_s=0.3, warmup_s=0.1
    )
    async with server:
        result = await run_load(spec)
    assert 0.25 <= result["window_s"] <= 0.5
    assert 0 < result["ok"] < 10**6


async def test_main_reads_a_spec_and_writes_its_figures(tmp_path: Path) -> None:
    server = await _server([201])
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "port": server.sockets[0].getsockname()[1],
                "path": "/x",
                "bodies": [{"n": i} for i in range(20)],
                "connections": 3,
                "duration_s": 5,
                "warmup_s": 0,
            }
        )
    )
    async with server:
        # main() runs a loop of its own (uvloop): in a thread, while this one serves.
        assert await asyncio.to_thread(main, [str(spec), str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["statuses"] == {"200": 19, "201": 1}
    assert result["ok"] == 19
    assert result["hold_p50_ms"] == pytest.approx(3.0, abs=0.01)


async def test_a_server_that_closes_mid_answer_fails_the_run() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    spec = LoadSpec("127.0.0.1", port, "/x", [b"{}"] * 3, connections=1, duration_s=5, warmup_s=0)
    async with server:
        with pytest.raises(ConnectionError):
            await run_load(spec)


# A worker of a multi-process server: serves the listening socket it inherited (fd argv[1]),
# as uvicorn's workers serve their supervisor's; argv[2] "idle" holds it without accepting.
_WORKER = """
import asyncio, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
if sys.argv[2] == "idle":
    time.sleep(60)
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            size = [int(l.split(b":")[1]) for l in head.split(b"\\r\\n")
                    if l.lower().startswith(b"content-length")]
            await reader.readexactly(size[0] if size else 0)
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\n{}")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def serve():
    server = await asyncio.start_server(handle, sock=sock)
    await server.serve_forever()
asyncio.run(serve())
"""


@contextlib.contextmanager
def _workers(*kinds: str) -> Iterator[tuple[int, list[int]]]:
    """A listening socket shared by one worker process per kind: (port, their pids)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    fd = listener.fileno()
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(fd), kind], pass_fds=[fd])
        for kind in kinds
    ]
    try:
        yield listener.getsockname()[1], [p.pid for p in procs]
    finally:
        listener.close()
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def _held(pids: list[int]) -> list[int]:
    """Established connections each process holds, as the kernel says (not the generator)."""
    return [
        sum(c.status == psutil.CONN_ESTABLISHED for c in psutil.Process(pid).net_connections())
        for pid in pids
    ]


async def test_connections_are_spread_evenly_over_the_workers() -> None:
    with _workers("serve", "serve", "serve") as (port, pids):
        spec = LoadSpec(
            "127.0.0.1", port, "/x", [b"{}"] * 500, connections=16, duration_s=5, warmup_s=0,
            workers=tuple(pids), probe_path="/probe",
        )  # fmt: skip
        opened, counts = await balanced(spec)
        try:
            # 16 over 3: the first worker takes the remainder.
            assert counts == dict(zip(pids, [6, 5, 5], strict=True))
            assert _held(pids) == [6, 5, 5]
            assert len(opened) == 16
        finally:
            for transport, _ in opened:
                transport.close()
        result = await run_load(spec)
    assert result["connections_per_worker"] == [6, 5, 5]
    assert result["ok"] == 500


async def test_a_worker_that_never_accepts_leaves_the_split_as_the_kernel_gave_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Balancing is bounded in time; the split is reported as it is, not as it was wanted."""
    monkeypatch.setattr(loadgen, "_BALANCE_S", 0.5)
    with _workers("serve", "idle") as (port, pids):
        spec = LoadSpec(
            "127.0.0.1", port, "/x", [b"{}"] * 50, connections=8, duration_s=5, warmup_s=0,
            workers=tuple(pids),
        )  # fmt: skip
        result = await run_load(spec)
    assert result["connections_per_worker"] == [8, 0]
    assert result["ok"] == 50


async def test_without_workers_named_the_connections_are_left_where_they_land() -> None:
    server = await _server([])
    port = server.sockets[0].getsockname()[1]
    spec = LoadSpec("127.0.0.1", port, "/x", [b"{}"] * 5, connections=2, duration_s=5, warmup_s=0)
    async with server:
        result = await run_load(spec)
    assert result["connections_per_worker"] == []
