"""The guardian stops what payrace started when payrace dies without unwinding."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

from harness.watchdog import serve


def gone(pid: int, within_s: float = 20.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "300"], start_new_session=True)


def test_at_end_of_input_a_guarded_group_is_stopped_and_a_released_one_is_not() -> None:
    guarded, released = sleeper(), sleeper()
    try:
        commands = f"+group {guarded.pid}\n+group {released.pid}\n-group {released.pid}\n"
        serve(io.BytesIO(commands.encode()))
        guarded.wait(timeout=10)
        assert guarded.returncode == -signal.SIGTERM
        assert released.poll() is None
    finally:
        for proc in (guarded, released):
            proc.kill()
            proc.wait()


def test_a_guarded_cluster_gets_an_immediate_shutdown_and_its_directory_goes(
    tmp_path: Path,
) -> None:
    postmaster = sleeper()  # stands in for the postmaster: SIGQUIT ends it
    workdir = tmp_path / "payrace-pg-test"
    (workdir / "pgdata").mkdir(parents=True)
    (workdir / "pgdata" / "postmaster.pid").write_text(f"{postmaster.pid}\n/some/dir\n")
    try:
        serve(io.BytesIO(f"+cluster {workdir}\n".encode()))
        postmaster.wait(timeout=10)
        assert postmaster.returncode == -signal.SIGQUIT
        assert not workdir.exists()
    finally:
        postmaster.kill()
        postmaster.wait()


def test_a_killed_payrace_leaves_neither_service_nor_postgresql(tmp_path: Path) -> None:
    """SIGKILL: no handler runs in payrace; the guardian sees its pipe close and cleans up."""
    marker = f"sigkill-{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k != "PAYRACE_DATABASE_URL"}
    env["PAYRACE_TEST_MARKER"] = marker
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", "--target", "http", "--trials", "5000",
         "--quiet", "--out", str(tmp_path)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 90
        names = ""
        while time.monotonic() < deadline:
            assert proc.poll() is None
            started = marked(marker, exclude=proc.pid)
            names = " ".join(cmdline(p) for p in started)
            if "uvicorn" in names and "postgres" in names:
                break
            time.sleep(0.2)
        assert "uvicorn" in names and "postgres" in names, "service or PostgreSQL never started"
        clusters = {Path(a).parent for a in names.split() if a.endswith("pgdata")}
        time.sleep(1.0)
        proc.kill()
        proc.wait(timeout=10)
        survivors = [p for p in started if "harness.watchdog" not in cmdline(p)]
        assert all(gone(p.pid) for p in survivors), [cmdline(p) for p in survivors]
        deadline = time.monotonic() + 20
        while any(c.exists() for c in clusters) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert clusters and not any(c.exists() for c in clusters)
    finally:
        if proc.poll() is None:
            proc.kill()
        for leftover in marked(marker, exclude=proc.pid):
            with contextlib.suppress(psutil.Error):
                leftover.kill()


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def marked(marker: str, exclude: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid != exclude and p.environ().get("PAYRACE_TEST_MARKER") == marker:
                found.append(p)
    return found
