"""A `payrace run --target http` in a process of its own, and every process it starts.

Shared by the tests that end payrace mid-run (Ctrl-C, SIGTERM, SIGKILL) and then check that
nothing it started is left. Every process of the run inherits a marker in its environment
(pg_ctl's postmaster too, which is not payrace's child), so other payrace runs on the
machine are never mistaken for this one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MARKER = "PAYRACE_TEST_MARKER"


@dataclass
class MarkedRun:
    proc: subprocess.Popen[str]
    marker: str
    started: list[psutil.Process] = field(default_factory=list)
    clusters: set[Path] = field(default_factory=set)

    def children(self) -> list[psutil.Process]:
        return marked(self.marker, exclude=self.proc.pid)


@contextlib.contextmanager
def marked_run(out: Path, *, background: bool = False) -> Iterator[MarkedRun]:
    """Start the run, wait until its service and its embedded PostgreSQL are up and trials
    are going, yield; afterwards kill whatever is left, so a failing test leaks nothing.
    `background`: started as a shell starts `payrace run &`, with SIGINT ignored."""
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("PAYRACE_DSN", "PAYRACE_DATABASE_URL")}
    env[MARKER] = marker
    proc = subprocess.Popen(
        [sys.executable, "-m", "payrace.harness.cli", "run", "--target", "http", "--trials", "5000",
         "--quiet", "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_ignore_sigint if background else None,
    )  # fmt: skip
    run = MarkedRun(proc, marker)
    try:
        deadline = time.monotonic() + 90
        names = ""
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            run.started = run.children()
            names = " ".join(cmdline(p) for p in run.started)
            if "uvicorn" in names and "postgres" in names:
                break
            time.sleep(0.2)
        assert "uvicorn" in names and "postgres" in names, "service or PostgreSQL never started"
        run.clusters = {Path(a).parent for a in names.split() if a.endswith("pgdata")}
        time.sleep(1.0)  # let trials run, so what ends payrace lands mid-run
        yield run
    finally:
        if proc.poll() is None:
            proc.kill()
        for leftover in run.children():
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait(timeout=10)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # short-lived (pg_ctl) or already gone
        return ""


def marked(marker: str, exclude: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid != exclude and p.environ().get(MARKER) == marker:
                found.append(p)
    return found


def gone(pid: int, within_s: float = 5.0) -> bool:
    """Not running: exited (a zombie until this machine's init reaps it counts as exited)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def cleared(dirs: set[Path], within_s: float = 20.0) -> bool:
    deadline = time.monotonic() + within_s
    while any(d.exists() for d in dirs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(d.exists() for d in dirs)
