"""A guardian for what payrace starts, for when payrace itself dies without unwinding.

    guard_group(pgid)        "if I die, stop this process group" (uvicorn, Locust)
    guard_cluster(workdir)   "if I die, stop the postmaster of workdir/pgdata and delete workdir"
    guard_database(url, name)  "if I die, DROP DATABASE name (WITH FORCE) on the server of url"
    release_group() / release_cluster() / release_database()   stopped properly: forget it
    running() / group_members()  a process, a group's members, that have not exited (zombies
                             have); infra.processes waits on them too
    main()                   the guardian itself (`python -m payrace.harness.infra.watchdog`)

Context managers stop what they started on errors, Ctrl-C and SIGTERM; nothing in-process can
run after SIGKILL or the OOM killer. The guardian is a small process of its own session,
started on first use, reading commands on a pipe. When payrace exits for any reason the
kernel closes the pipe; the guardian then stops whatever is still registered — which, after a
normal exit, is nothing. No polling, no timing guess: end of file is the signal.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO

_lock = threading.Lock()
_pipe: int | None = None  # write end of the guardian's stdin; closed by the kernel at our exit
_guardian: tuple[int, int] | None = None  # (guardian pid, pid of the process that started it)


def _spawn() -> int:
    global _guardian
    read, write = os.pipe()  # both close-on-exec: no later child can keep the pipe open
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", "payrace.harness.infra.watchdog"],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, read, 0),
                (os.POSIX_SPAWN_DUP2, devnull, 1),
                (os.POSIX_SPAWN_DUP2, devnull, 2),
            ],
            # Its own session: a terminal's Ctrl-C must not take it down before payrace.
            setsid=True,
        )
    finally:
        os.close(read)
        os.close(devnull)
    _guardian = (pid, os.getpid())
    atexit.register(_dismiss)
    # No Popen object and no file object on purpose: the guardian is meant to outlive this
    # process, and either would warn at interpreter exit about something left running.
    return write


def _send(line: str, *, start: bool = True) -> None:
    global _pipe
    with _lock:
        if _pipe is None:
            if not start:  # a release with no guardian: nothing was guarded
                return
            _pipe = _spawn()
        try:
            os.write(_pipe, line.encode() + b"\n")
        except BrokenPipeError:  # the guardian is gone; start another for what follows
            os.close(_pipe)
            _pipe = None


def _dismiss(timeout_s: float = 30.0) -> None:
    """At a normal exit: close the pipe and wait for the guardian to finish, so that no
    process payrace started outlives it, the guardian included (a test checks exactly that,
    and a guardian still exiting a few milliseconds after payrace would fail it)."""
    global _pipe, _guardian
    with _lock:
        if _guardian is None or _guardian[1] != os.getpid():  # a forked child: not ours
            return
        pid, _ = _guardian
        _guardian = None
        if _pipe is not None:
            os.close(_pipe)
            _pipe = None
    # After a normal exit nothing is registered and this is quick; the bound is for a
    # guardian stopping leftovers (at most 5 s per group, 10 s per cluster).
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # already reaped
            return
        if done:
            return
        time.sleep(0.01)


def guard_group(pgid: int) -> None:
    _send(f"+group {pgid}")


def release_group(pgid: int) -> None:
    _send(f"-group {pgid}", start=False)


def guard_cluster(workdir: Path) -> None:
    _send(f"+cluster {workdir}")


def release_cluster(workdir: Path) -> None:
    _send(f"-cluster {workdir}", start=False)


def guard_database(admin_url: str, name: str) -> None:
    # Over the pipe, never argv: the URL may carry a password.
    _send(f"+database {name} {admin_url}")


def release_database(name: str) -> None:
    _send(f"-database {name}", start=False)


def _drop_database(name: str, admin_url: str) -> None:
    import psycopg  # only the guardian of a --dsn database pays for it
    from psycopg import sql

    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    # A server that is restarting answers a moment later; one that is gone never will.
    deadline = time.monotonic() + 10
    while True:
        try:
            with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
                conn.execute(drop)
            return
        except psycopg.Error:
            if time.monotonic() > deadline:
                return
            time.sleep(0.5)


def running(pid: int) -> bool:
    """The process exists and has not exited: a zombie (exited, its parent not yet told)
    holds nothing, though os.kill(pid, 0) and os.killpg still find it."""
    import psutil  # only a guardian that stops something pays for it

    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def group_members(pgid: int) -> list[int]:
    """Pids of the living members of process group `pgid`."""
    import psutil

    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and running(pid):
                members.append(pid)
        except OSError:
            continue  # exited between listing and looking
    return members


def _stop_group(pgid: int) -> None:
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not group_members(pgid):
                return
            time.sleep(0.1)


def _stop_cluster(workdir: Path) -> None:
    pidfile = workdir / "pgdata" / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGQUIT)  # PostgreSQL's immediate shutdown: the data is throwaway
        deadline = time.monotonic() + 10
        # A postmaster removes its pid file as it exits; one that died without doing so (a
        # SIGKILL) is not waited for the whole 10 s.
        while time.monotonic() < deadline and pidfile.exists() and running(pid):
            time.sleep(0.1)
    shutil.rmtree(workdir, ignore_errors=True)


def serve(commands: IO[bytes]) -> None:
    groups: set[int] = set()
    clusters: set[Path] = set()
    databases: dict[str, str] = {}  # name -> admin URL of its server
    for raw in commands:
        op, _, arg = raw.decode(errors="replace").strip().partition(" ")
        with contextlib.suppress(ValueError):
            if op == "+group":
                groups.add(int(arg))
            elif op == "-group":
                groups.discard(int(arg))
            elif op == "+cluster":
                clusters.add(Path(arg))
            elif op == "-cluster":
                clusters.discard(Path(arg))
            elif op == "+database":
                name, _, url = arg.partition(" ")
                databases[name] = url
            elif op == "-database":
                databases.pop(arg, None)
    # End of file: payrace has exited. Whatever it did not release, it did not stop.
    for pgid in groups:  # first the processes that hold connections to the databases
        _stop_group(pgid)
    for name, url in databases.items():
        _drop_database(name, url)
    for workdir in clusters:
        _stop_cluster(workdir)


def main() -> None:
    # The guardian must outlive the signals that end payrace's process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(sys.stdin.buffer)


if __name__ == "__main__":
    main()
