from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from payrace.harness.bench.loadgen import LoadSpec, main, run_load


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
