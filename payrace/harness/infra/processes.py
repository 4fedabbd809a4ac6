"""Processes payrace starts, each a context manager that stops what it started.

    free_port()            a loopback port nobody listens on right now
    stop_process()         signal the whole group (SIGTERM, or the given signals in turn), wait,
                           then SIGKILL what is left, also after a second Ctrl-C, and wait
                           until the group has no living member
    group_members(), wait_for_group()   the living members of a process group (the guardian's
                           group_members(), which it waits on too)
    ServiceKeys            the Razorpay keys the service is configured with (gateway.signing's
                           GatewayKeys is one)
    service_env()          the reference service's environment for one database and gateway
    spawn_group()          an HTTP server process in its own session, under the guardian
    await_answer()         ready when its health route answers from the process itself (its
                           port may have been taken by another); stopped if it exits first
    listens()              whether a process or one it forked listens on a TCP port
    ServiceProcess         the reference service under uvicorn; ready when /healthz answers
                           (infra.readiness); halt() kills it with SIGKILL, resume() starts it
                           again on the same port (the restart-service nemesis)
    LocustProcess          locust, its output teed to a log and to a callback; stopped with SIGINT
                           (it writes its reports and runs the gate), SIGTERM, then SIGKILL

Every child gets its own session (process group): a terminal's Ctrl-C reaches only payrace,
which then stops the child in __exit__, and one killpg reaches whatever the child forked
(uvicorn and Locust workers), so nothing is left running either way. Each group is also
registered with the guardian (infra.watchdog) for when payrace dies without unwinding. What
the groups cost in CPU is infra.cpu's business.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import urlsplit

import psutil

from payrace.harness.infra import watchdog
from payrace.harness.infra.provider import Database
from payrace.harness.infra.readiness import wait_until_answers
from payrace.harness.infra.watchdog import group_members as group_members


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def stop_process(
    proc: subprocess.Popen[bytes],
    timeout_s: float = 10.0,
    *,
    signals: Sequence[tuple[signal.Signals, float]] = (),
) -> None:
    """Stop `proc` and its whole process group: each (signal, seconds to wait for the leader)
    of `signals` in turn until the leader exits (SIGTERM and timeout_s when none are given),
    then SIGKILL the group and reap the leader, whatever happened in between."""
    try:
        for sig, wait_s in signals or ((signal.SIGTERM, timeout_s),):
            # The group is signalled even when its leader has already exited: the leader's
            # children (uvicorn workers, multiprocessing's resource tracker) may not have.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait_s)
            if proc.returncode is not None:
                break
    finally:
        # Also when a second Ctrl-C cut the waits short: workers forked by Locust's
        # --processes stay in the group after their master exited.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
        # SIGKILL is delivered at once but a process takes a moment to tear down, and the
        # members that are not our children are not reaped by the wait above: return only
        # when they are gone, so nothing payrace started is still running after it says so.
        wait_for_group(proc.pid, timeout_s)
        watchdog.release_group(proc.pid)


def wait_for_group(pgid: int, timeout_s: float) -> bool:
    """Wait until no living process is left in group `pgid`; False if some outlast the bound."""
    deadline = time.monotonic() + timeout_s
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


class ServiceKeys(Protocol):
    # Read-only properties, so that a frozen dataclass such as GatewayKeys fits.
    @property
    def key_id(self) -> str: ...
    @property
    def key_secret(self) -> str: ...
    @property
    def webhook_secret(self) -> str: ...


def service_env(
    db: Database,
    gateway_url: str,
    strategy: str,
    *,
    keys: ServiceKeys,
    probes: bool = False,
    isolation_level: str = "READ COMMITTED",
    pool_size: int = 20,
    webhook_dedupe: bool = True,
) -> dict[str, str]:
    """The service must hold the keys of the gateway it talks to: the caller that started
    that gateway passes them."""
    return {
        "DATABASE_URL": db.asyncpg_url(),
        "CAPTURE_STRATEGY": strategy,
        "ISOLATION_LEVEL": isolation_level,
        "RAZORPAY_KEY_ID": keys.key_id,
        "RAZORPAY_KEY_SECRET": keys.key_secret,
        "RAZORPAY_WEBHOOK_SECRET": keys.webhook_secret,
        "RAZORPAY_BASE_URL": gateway_url,
        "PAYRACE_PROBES": "1" if probes else "0",
        "DB_POOL_SIZE": str(pool_size),
        "WEBHOOK_DEDUPE": "1" if webhook_dedupe else "0",
    }


def spawn_group(
    cmd: Sequence[str],
    env: Mapping[str, str],
    *,
    log_path: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server process in its own session (one killpg stops it and what it forks;
    Ctrl-C reaches only payrace), under the guardian, its output to `log_path`."""
    log = log_path.open("ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        if not isinstance(log, int):
            log.close()
    watchdog.guard_group(proc.pid)
    return proc


def await_answer(
    proc: subprocess.Popen[bytes],
    url: str,
    health_path: str,
    *,
    what: str,
    hint: str,
    log_path: Path | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Return once `url + health_path` answers and `proc` (or a process it forked) is the one
    listening on the URL's port; a process that exits first or never answers is stopped,
    with everything it forked, and the error names its exit code and log.

    The second condition: a free_port() is free only when asked. Another process (a parallel
    test worker's service, seen under five workers) can take the port before `proc` binds
    it, and its answer said "ready" for a server that was not this one: the load then ran
    against another database."""

    def exited() -> str | None:
        if proc.poll() is None:
            return None
        where = f"; see {log_path}" if log_path else ""
        return f"{what} exited with code {proc.returncode} before answering{where}"

    port = urlsplit(url).port
    deadline = time.monotonic() + timeout_s
    try:
        wait_until_answers(
            url, health_path, timeout_s=timeout_s, stopped=exited, what=what, hint=hint
        )
        while port is not None and not listens(proc.pid, port):
            said = exited()
            if said is not None:
                raise PortTaken(f"{said}: port {port} answered, but from another process")
            if time.monotonic() > deadline:
                raise PortTaken(f"{what} never listened on port {port}, another process does")
            time.sleep(0.05)
    except BaseException:
        stop_process(proc)
        raise


class PortTaken(RuntimeError):
    """The port a server was started on answered from another process."""


def listeners(pid: int, port: int) -> list[int]:
    """Process `pid` and the processes it forked that listen on TCP `port` (uvicorn's
    supervisor and its workers share one socket), in that order."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    found = []
    for member in family:
        try:
            sockets = member.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(
            c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in sockets
        ):
            found.append(member.pid)
    return found


def listens(pid: int, port: int) -> bool:
    """Whether process `pid`, or a process it forked, listens on TCP `port`."""
    return bool(listeners(pid, port))


class ServiceProcess:
    """`uvicorn payrace.service.app:create_served_app --factory` on loopback; ready at
    /healthz."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        workers: int = 1,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
        start_timeout_s: float = 30.0,
        server_args: Sequence[str] = (),
    ) -> None:
        self.env = dict(env)
        self.workers = workers
        # More uvicorn options, e.g. `--loop asyncio --http h11` (payrace bench's stock stack).
        self.server_args = list(server_args)
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self._port_chosen = port is None  # another may be taken if this one is
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServiceProcess:
        self._spawn()
        return self

    def halt(self) -> None:
        """SIGKILL the whole group, as a crash or the OOM killer would: nothing is flushed,
        no request in flight is answered."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        wait_for_group(proc.pid, 10)
        watchdog.release_group(proc.pid)

    def exited(self) -> bool:
        """It ended by itself (killed from outside, crashed): no answer will come. False while
        halt() has it down for a restart. halt() lets go of the process before it kills it,
        so one that died and is still the one held was not killed by halt()."""
        proc = self.proc
        return proc is not None and proc.poll() is not None and self.proc is proc

    def resume(self) -> None:
        """Start it again where it was (same port, environment and log)."""
        if self.proc is None:
            self._spawn(may_move=False)

    def _spawn(self, *, may_move: bool = True) -> None:
        for attempt in range(3):
            cmd = [
                sys.executable, "-m", "uvicorn", "payrace.service.app:create_served_app",
                "--factory", "--host", self.host, "--port", str(self.port),
                "--workers", str(self.workers), "--no-access-log", "--log-level", "warning",
                # Loopback only, no proxy in front: uvicorn's proxy-headers middleware would be
                # one more ASGI layer every request and every resumed await passes through.
                "--no-proxy-headers", "--no-server-header", *self.server_args,
            ]  # fmt: skip
            self.proc = spawn_group(cmd, self.env, log_path=self.log_path)
            try:
                await_answer(
                    self.proc,
                    self.url,
                    "/healthz",
                    what="service",
                    hint="check DATABASE_URL and the service log",
                    log_path=self.log_path,
                    timeout_s=self.start_timeout_s,
                )
                return
            except PortTaken:
                # A port payrace chose, taken meanwhile: another one. A port the caller
                # named (or the one a restart must keep) is the caller's to free.
                if not (self._port_chosen and may_move) or attempt == 2:
                    raise
                self.port = free_port(self.host)
                self.url = f"http://{self.host}:{self.port}"

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class LocustProcess:
    """locust in its own session, its output teed to a log and to `echo`.

    Its own session keeps a terminal's Ctrl-C away from it (payrace decides when it stops)
    and makes `--processes` workers, which Locust forks into the same group, stoppable with
    one killpg even when the master dies first."""

    def __init__(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        echo: Callable[[str], None],
        *,
        stop_grace_s: tuple[float, float] = (30.0, 10.0),
    ) -> None:
        self.cmd = list(cmd)
        # After SIGINT Locust still writes its reports and runs the gate; after SIGTERM only
        # its reports. Past both, SIGKILL.
        self.stop_grace_s = stop_grace_s
        self.env = dict(env)
        self.log_path = log_path
        self.echo = echo
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> LocustProcess:
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        watchdog.guard_group(self.proc.pid)
        assert self.proc.stdout is not None
        self._reader = threading.Thread(
            target=self._tee, args=(self.proc.stdout,), name="payrace-locust-log", daemon=True
        )
        self._reader.start()
        return self

    def _tee(self, stream: IO[bytes]) -> None:
        with stream, self.log_path.open("wb") as log:
            for raw in stream:
                log.write(raw)
                log.flush()
                self.echo(raw.decode("utf-8", errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None when Locust outlived `timeout_s`."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """SIGINT first: Locust then writes its reports and runs the gate before it exits."""
        assert self.proc is not None
        interrupt_s, terminate_s = self.stop_grace_s
        try:
            signals = ((signal.SIGINT, interrupt_s), (signal.SIGTERM, terminate_s))
            stop_process(self.proc, signals=signals)
        finally:
            if self._reader is not None:
                self._reader.join(timeout=5)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.stop()
