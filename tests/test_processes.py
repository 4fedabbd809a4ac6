"""harness/processes.py: every process payrace starts is stopped, group and all.

"Gone" means os.killpg(pgid, 0) finds no process in the group. Where a test leaves orphans to
this machine's init, whose reaping may lag, "nothing left running" means no member of the
group that is not a zombie (read from /proc).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from harness.processes import ServiceProcess, free_port, service_env, stop_process
from harness.provider import Database

PROC = Path("/proc")
needs_proc = pytest.mark.skipif(not (PROC / "self" / "stat").exists(), reason="needs Linux /proc")


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def running_in_group(pgid: int) -> list[int]:
    """Members of the group that are not zombies."""
    pids = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        state, _ppid, pgrp = stat.rpartition(")")[2].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(entry.name))
    return pids


def test_free_port_returns_a_port_that_can_be_bound() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_service_answers_healthz_and_its_group_is_gone_after_exit(
    pg: Database, gateway_url: str
) -> None:
    with ServiceProcess(service_env(pg, gateway_url, "naive")) as svc:
        assert svc.proc is not None
        pid = svc.proc.pid
        assert os.getpgid(pid) == pid  # its own process group, away from our Ctrl-C
        response = httpx.get(f"{svc.url}/healthz", timeout=5)
        assert response.status_code == 200
        assert response.json()["strategy"] == "naive"
    assert svc.proc.returncode is not None
    assert group_gone(pid)


def test_service_group_is_gone_when_the_body_raises(pg: Database, gateway_url: str) -> None:
    pid = None
    with (
        pytest.raises(RuntimeError, match="body failed"),
        ServiceProcess(service_env(pg, gateway_url, "for_update")) as svc,
    ):
        assert svc.proc is not None
        pid = svc.proc.pid
        raise RuntimeError("body failed")
    assert pid is not None
    assert group_gone(pid)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{svc.url}/healthz", timeout=2)


def test_bad_database_url_fails_start_naming_exit_code_and_log(
    pg: Database, gateway_url: str, tmp_path: Path
) -> None:
    env = service_env(pg, gateway_url, "for_update")
    env["DATABASE_URL"] = f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/nowhere"
    log = tmp_path / "service.log"
    svc = ServiceProcess(env, log_path=log, start_timeout_s=20)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited with code \d+ before answering") as info:
        svc.__enter__()
    assert time.monotonic() - started < 15  # it failed fast, not by timing out
    assert str(log) in str(info.value)
    assert "startup failed" in log.read_text().lower()
    assert svc.proc is not None and svc.proc.returncode not in (None, 0)
    assert group_gone(svc.proc.pid)


def test_start_timeout_names_what_was_last_seen_and_stops_the_process(
    pg: Database, gateway_url: str
) -> None:
    # The service starts, but readiness is polled at a port nobody listens on.
    svc = ServiceProcess(service_env(pg, gateway_url, "for_update"), start_timeout_s=1.0)
    svc.url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TimeoutError, match=r"did not answer /healthz within 1.0s \(last seen: "):
        svc.__enter__()
    assert svc.proc is not None
    assert group_gone(svc.proc.pid)


@needs_proc
def test_service_with_workers_leaves_no_worker_running(pg: Database, gateway_url: str) -> None:
    with ServiceProcess(service_env(pg, gateway_url, "for_update"), workers=2) as svc:
        assert svc.proc is not None
        pid = svc.proc.pid
        assert len(running_in_group(pid)) >= 3  # the supervisor and two workers
        assert httpx.get(f"{svc.url}/healthz", timeout=5).status_code == 200
    assert running_in_group(pid) == []


def spawn(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
    )


def test_stop_process_kills_a_group_that_ignores_sigterm() -> None:
    proc = spawn(
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    started = time.monotonic()
    stop_process(proc, timeout_s=0.5)
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert group_gone(proc.pid)
    proc.stdout.close()


@needs_proc
def test_stop_process_stops_children_left_behind_by_an_exited_leader() -> None:
    proc = spawn(
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    proc.wait(timeout=10)
    proc.stdout.close()
    try:
        assert running_in_group(proc.pid) == [child]
        stop_process(proc, timeout_s=2)
        deadline = time.monotonic() + 5
        while running_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running_in_group(proc.pid) == []
    finally:
        if child in running_in_group(proc.pid):  # the test failed: do not leave it behind
            os.kill(child, signal.SIGKILL)


def test_stop_process_on_a_process_that_is_already_gone_is_quiet() -> None:
    proc = spawn("pass")
    proc.wait(timeout=10)
    assert proc.stdout is not None
    proc.stdout.close()
    stop_process(proc)
    assert proc.returncode == 0
