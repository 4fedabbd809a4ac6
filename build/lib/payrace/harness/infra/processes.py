"""Processes payrace starts, each a context manager that stops what it started, and their CPU.

    free_port()            a loopback port nobody listens on right now
    stop_process()         signal the whole group (SIGTERM, or the given signals in turn), wait,
                           then SIGKILL what is left, also after a second Ctrl-C, and wait
                           until the group has no living member
    group_members(), wait_for_group()   the living members of a process group
    wait_until_answers()   GET a URL until it answers 200; fails at once when the server stopped,
                           and on timeout says what it saw last
    service_env()          the reference service's environment for one database and gateway
    ServiceProcess         the reference service under uvicorn; ready when /healthz answers
    LocustProcess          locust, its output teed to a log and to a callback; stopped with SIGINT
                           (it writes its reports and runs the gate), SIGTERM, then SIGKILL
    CpuSampler             CPU seconds of named groups of processes, sampled from /proc
        ProcStat, read_procs(), in_group(), postmaster_pid()   what the groups are made of

Every child gets its own session (process group): a terminal's Ctrl-C reaches only payrace,
which then stops the child in __exit__, and one killpg reaches whatever the child forked
(uvicorn and Locust workers), so nothing is left running either way.
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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx
import psycopg

from payrace.harness.infra import watchdog
from payrace.harness.infra.provider import Database

if TYPE_CHECKING:
    from payrace.harness.gateway.fake import GatewayKeys


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


def group_members(pgid: int) -> list[int]:
    """Pids of the living members of process group `pgid` (zombies are done running)."""
    return [p.pid for p in read_procs().values() if p.pgrp == pgid and p.state not in "ZX"]


def wait_for_group(pgid: int, timeout_s: float) -> bool:
    """Wait until no living process is left in group `pgid`; False if some outlast the bound."""
    deadline = time.monotonic() + timeout_s
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def wait_until_answers(
    url: str,
    path: str,
    *,
    timeout_s: float,
    stopped: Callable[[], str | None],
    what: str,
    hint: str,
    poll_s: float = 0.1,
    request_timeout_s: float = 2.0,
) -> None:
    """GET `url + path` until it answers 200.

    `stopped()` says why the server is gone (None while it runs): that is raised as a
    RuntimeError at once instead of waiting out the timeout. Past `timeout_s`, a TimeoutError
    names what was last seen and ends with `hint` (what to check)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    with httpx.Client(timeout=request_timeout_s) as client:
        while time.monotonic() < deadline:
            reason = stopped()
            if reason is not None:
                raise RuntimeError(reason)
            try:
                response = client.get(f"{url}{path}")
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(poll_s)
    raise TimeoutError(
        f"{what} at {url} did not answer {path} within {timeout_s}s (last seen: {last}); {hint}"
    )


def service_env(
    db: Database,
    gateway_url: str,
    strategy: str,
    *,
    keys: GatewayKeys | None = None,
    probes: bool = False,
    isolation_level: str = "READ COMMITTED",
    pool_size: int = 20,
) -> dict[str, str]:
    if keys is None:
        # Imported here, not at the top, so payrace.harness.gateway.fake can use wait_until_answers.
        from payrace.harness.gateway.fake import GatewayKeys

        keys = GatewayKeys()
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
    }


class ServiceProcess:
    """`uvicorn service.app:create_app --factory` on loopback; ready when /healthz answers."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        workers: int = 1,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.env = dict(env)
        self.workers = workers
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServiceProcess:
        cmd = [
            sys.executable, "-m", "uvicorn", "payrace.service.app:create_app", "--factory",
            "--host", self.host, "--port", str(self.port), "--workers", str(self.workers),
            "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                cmd,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT if self.log_path else subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if self.log_path and not isinstance(log, int):
                log.close()
        watchdog.guard_group(self.proc.pid)
        try:
            wait_until_answers(
                self.url,
                "/healthz",
                timeout_s=self.start_timeout_s,
                stopped=self._exited,
                what="service",
                hint="check DATABASE_URL and the service log",
            )
        except BaseException:
            stop_process(self.proc)
            raise
        return self

    def _exited(self) -> str | None:
        assert self.proc is not None
        if self.proc.poll() is None:
            return None
        where = f"; see {self.log_path}" if self.log_path else ""
        return f"service exited with code {self.proc.returncode} before answering{where}"

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


# -- CPU shares ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    pgrp: int
    ticks: int  # utime + stime
    state: str  # R, S, D, Z (zombie), X (dead), ... as in /proc/<pid>/stat


# Whether a process belongs to a group, given every process (to look at its parent).
Member = Callable[[ProcStat, Mapping[int, ProcStat]], bool]


def read_procs() -> dict[int, ProcStat]:
    procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue  # exited between listing and reading
        # The command name may hold spaces and parentheses; the fields follow the last ')'.
        rest = stat.rsplit(")", 1)[1].split()
        pid = int(entry.name)
        ticks = int(rest[11]) + int(rest[12])
        procs[pid] = ProcStat(pid, int(rest[1]), int(rest[2]), ticks, rest[0])
    return procs


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user
    return total - idle, total


class CpuSampler:
    """Samples /proc once a second; groups are named predicates over processes.

    A process's ticks count from the first sample it is seen in, or from its birth if it
    appears later (a backend forked for a new connection spends all its CPU in the run)."""

    def __init__(self, groups: Mapping[str, Member]) -> None:
        self.groups = dict(groups)
        self.enabled = Path("/proc/stat").exists()
        self._seen: dict[tuple[int, str], int] = {}
        self._cpu: dict[str, int] = dict.fromkeys(self.groups, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._machine0 = self._machine1 = (0, 0)
        self._first = True
        self._t0 = self._t1 = 0.0

    def _sample(self) -> None:
        procs = read_procs()
        for proc in procs.values():
            for name, member in self.groups.items():
                if not member(proc, procs):
                    continue
                key = (proc.pid, name)
                start = self._seen.setdefault(key, proc.ticks if self._first else 0)
                self._cpu[name] += proc.ticks - start
                self._seen[key] = proc.ticks
        self._first = False
        self._machine1, self._t1 = _machine_ticks(), time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def __enter__(self) -> CpuSampler:
        if self.enabled:
            self._machine0, self._t0 = _machine_ticks(), time.monotonic()
            self._sample()
            self._thread = threading.Thread(target=self._loop, name="payrace-cpu", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._sample()
            self._thread = None

    def result(self) -> dict[str, Any] | None:
        if not self.enabled or self._t1 <= self._t0:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = self._machine1[0] - self._machine0[0]
        total = self._machine1[1] - self._machine0[1]
        out: dict[str, Any] = {
            "window_s": round(self._t1 - self._t0, 2),
            "cpus": os.cpu_count(),
            "machine_busy_percent": round(100.0 * busy / total, 1) if total else None,
            "groups": {},
        }
        for name, ticks in [*self._cpu.items(), ("other", busy - sum(self._cpu.values()))]:
            # "other": everything else that kept the CPUs busy (the kernel, other programs);
            # a large share means the figures above were measured on a shared machine.
            out["groups"][name] = {
                "cpu_s": round(ticks / hz, 2),
                "percent_of_machine": round(100.0 * ticks / total, 1) if total else None,
                "percent_of_busy": round(100.0 * ticks / busy, 1) if busy else None,
            }
        return out


def in_group(pgrp: int) -> Member:
    return lambda proc, _: proc.pgrp == pgrp


def postmaster_pid(url: str) -> int | None:
    """The local postmaster behind `url`, found through one of its backends; None if remote."""
    try:
        with psycopg.connect(url, autocommit=True, application_name="payrace-load") as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            # Looked at while connected: the backend exits with the connection. In a container
            # the pid is the container's own, so only a local postgres with a postgres parent
            # counts.
            backend = read_procs().get(int(row[0])) if row is not None else None
            if backend is None or {_comm(backend.pid), _comm(backend.ppid)} != {"postgres"}:
                return None
            return backend.ppid
    except psycopg.Error:
        return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""
