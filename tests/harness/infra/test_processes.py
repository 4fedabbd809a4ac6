"""payrace/harness/infra/processes.py: every process payrace starts is stopped, group and all.

"Gone" means os.killpg(pgid, 0) finds no process in the group. Where a test leaves orphans to
this machine's init, whose reaping may lag, "nothing left running" means no member of the
group that is not a zombie (group_members).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.processes import (
    LocustProcess,
    PortTaken,
    ServiceProcess,
    free_port,
    group_members,
    listeners,
    listens,
    service_env,
    stop_process,
    wait_for_group,
)
from payrace.harness.infra.provider import Database

KEYS = GatewayKeys()


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def settles(condition: Callable[[], bool], within_s: float = 5.0) -> bool:
    """A SIGKILLed process takes a moment to die; `condition` gets that long to come true."""
    deadline = time.monotonic() + within_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_free_port_returns_a_port_that_can_be_bound() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()


@pytest.mark.slow
def test_service_answers_healthz_and_its_group_is_gone_after_exit(
    pg: Database, gateway_url: str
) -> None:
    with ServiceProcess(service_env(pg, gateway_url, "naive", keys=KEYS)) as svc:
        assert svc.proc is not None
        pid = svc.proc.pid
        assert os.getpgid(pid) == pid  # its own process group, away from our Ctrl-C
        response = httpx.get(f"{svc.url}/healthz", timeout=5)
        assert response.status_code == 200
        assert response.json()["strategy"] == "naive"
    assert svc.proc.returncode is not None
    assert group_gone(pid)


@pytest.mark.slow
def test_a_halted_service_is_killed_outright_and_resumes_on_the_same_port(
    pg: Database, gateway_url: str
) -> None:
    """halt() / resume(): the restart-service nemesis's SIGKILL and start again. exited()
    (a run stops retrying a service that ended) is never true for a halt, only for a process
    killed from outside."""
    with ServiceProcess(service_env(pg, gateway_url, "for_update", keys=KEYS)) as svc:
        assert svc.proc is not None
        first = svc.proc.pid
        assert not svc.exited()
        svc.halt()
        assert group_gone(first)
        assert not svc.exited()  # down for a restart, not ended
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{svc.url}/healthz", timeout=2)
        svc.resume()
        assert svc.proc is not None and svc.proc.pid != first
        second = svc.proc.pid
        assert httpx.get(f"{svc.url}/healthz", timeout=5).status_code == 200
        assert not svc.exited()
        os.killpg(second, signal.SIGKILL)  # a crash, or someone's kill -9
        assert settles(svc.exited)
    assert group_gone(second)


@pytest.mark.slow
def test_service_group_is_gone_when_the_body_raises(pg: Database, gateway_url: str) -> None:
    pid = None
    with (
        pytest.raises(RuntimeError, match="body failed"),
        ServiceProcess(service_env(pg, gateway_url, "for_update", keys=KEYS)) as svc,
    ):
        assert svc.proc is not None
        pid = svc.proc.pid
        raise RuntimeError("body failed")
    assert pid is not None
    assert group_gone(pid)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{svc.url}/healthz", timeout=2)


@pytest.mark.slow
def test_bad_database_url_fails_start_naming_exit_code_and_log(
    pg: Database, gateway_url: str, tmp_path: Path
) -> None:
    env = service_env(pg, gateway_url, "for_update", keys=KEYS)
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


@pytest.mark.slow
def test_start_timeout_names_what_was_last_seen_and_stops_the_process(
    pg: Database, gateway_url: str
) -> None:
    # The service starts, but readiness is polled at a port nobody listens on.
    svc = ServiceProcess(service_env(pg, gateway_url, "for_update", keys=KEYS), start_timeout_s=1.0)
    svc.url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TimeoutError, match=r"did not answer /healthz within 1.0s \(last seen: "):
        svc.__enter__()
    assert svc.proc is not None
    assert group_gone(svc.proc.pid)


@pytest.mark.slow
def test_service_with_workers_leaves_no_worker_running(pg: Database, gateway_url: str) -> None:
    with ServiceProcess(service_env(pg, gateway_url, "for_update", keys=KEYS), workers=2) as svc:
        assert svc.proc is not None
        pid = svc.proc.pid
        assert len(group_members(pid)) >= 3  # the supervisor and two workers
        assert httpx.get(f"{svc.url}/healthz", timeout=5).status_code == 200
        # All three hold the listening socket (the bench spreads its connections over the
        # workers); ready means one worker answers, the other may still be starting.
        deadline = time.monotonic() + 10
        while len(found := listeners(pid, svc.port)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert found[0] == pid and len(found) == 3
        assert listeners(pid, free_port()) == []
    assert group_members(pid) == []


def spawn(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
    )


class _Impostor:
    """Another process's server on a port: answers 200 to anything, as a service would."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Ok(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Impostor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_port_answered_by_another_process_is_not_taken_for_the_service_ready(
    pg: Database, gateway_url: str
) -> None:
    env = service_env(pg, gateway_url, "for_update", keys=KEYS)
    with _Impostor() as other:
        # Named by the caller: an error, not a service "ready" that is someone else.
        named = ServiceProcess(env, port=other.port, start_timeout_s=20)
        with pytest.raises(PortTaken, match=f"port {other.port} answered, but from another"):
            named.__enter__()
        assert named.proc is not None and named.proc.poll() is not None
        # Chosen by payrace, then taken (the race between free_port() and uvicorn's bind):
        # the service starts on another port, and answers there itself.
        chosen = ServiceProcess(env, start_timeout_s=20)
        chosen.port, chosen.url = other.port, f"http://127.0.0.1:{other.port}"
        with chosen as svc:
            assert svc.port != other.port
            assert svc.proc is not None and listens(svc.proc.pid, svc.port)
            assert httpx.get(f"{svc.url}/healthz").json()["status"] == "ok"


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
        assert group_members(proc.pid) == [child]
        stop_process(proc, timeout_s=2)
        # At once, not eventually: stop_process returns when the group has no one left.
        assert group_members(proc.pid) == []
    finally:
        if child in group_members(proc.pid):  # the test failed: do not leave it behind
            os.kill(child, signal.SIGKILL)


def test_wait_for_group_waits_for_the_last_member_and_gives_up_at_the_bound() -> None:
    proc = spawn("import time; print('ready', flush=True); time.sleep(60)")
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    try:
        assert group_members(proc.pid) == [proc.pid]
        started = time.monotonic()
        assert wait_for_group(proc.pid, timeout_s=0.3) is False
        assert time.monotonic() - started >= 0.3
        threading.Timer(0.2, proc.kill).start()
        assert wait_for_group(proc.pid, timeout_s=10) is True
        assert group_members(proc.pid) == []
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_stop_process_on_a_process_that_is_already_gone_is_quiet() -> None:
    proc = spawn("pass")
    proc.wait(timeout=10)
    assert proc.stdout is not None
    proc.stdout.close()
    stop_process(proc)
    assert proc.returncode == 0


def test_stop_process_moves_on_to_the_next_signal_when_one_is_ignored() -> None:
    proc = spawn(
        "import signal, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    stop_process(proc, signals=((signal.SIGINT, 0.3), (signal.SIGTERM, 5.0)))
    assert proc.returncode == -signal.SIGTERM
    proc.stdout.close()


# -- Locust -------------------------------------------------------------------------------

_STUBBORN = textwrap.dedent(
    """
    import os, signal, sys, time
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if os.fork() == 0:  # like a Locust worker forked by --processes: same group
        time.sleep(600)
    print("ready", flush=True)
    time.sleep(600)
    """
)


def test_stopping_locust_kills_its_whole_group_even_when_it_ignores_signals(
    tmp_path: Path,
) -> None:
    lines: list[str] = []
    locust = LocustProcess(
        [sys.executable, "-c", _STUBBORN],
        dict(os.environ),
        tmp_path / "locust.log",
        lines.append,
        stop_grace_s=(0.3, 0.3),
    )
    with locust:
        assert settles(lambda: "ready" in lines, within_s=10)
        assert len(group_members(locust.pid)) == 2  # the master and its forked worker
    assert settles(lambda: group_members(locust.pid) == [])
    assert locust.proc is not None and locust.proc.returncode == -signal.SIGKILL
    assert (tmp_path / "locust.log").read_text() == "ready\n"


def test_locust_stops_at_sigint_when_it_exits_on_it(tmp_path: Path) -> None:
    """Locust writes its reports and runs the gate on SIGINT; nothing harsher follows when
    it exits in time."""
    code = "import time\nprint('ready', flush=True)\ntry:\n    time.sleep(60)\n"
    code += "except KeyboardInterrupt:\n    print('reports written', flush=True)\n"
    lines: list[str] = []
    with LocustProcess(
        [sys.executable, "-c", code], dict(os.environ), tmp_path / "locust.log", lines.append
    ) as locust:
        assert settles(lambda: "ready" in lines, within_s=10)
    assert locust.proc is not None and locust.proc.returncode == 0
    assert lines == ["ready", "reports written"]
