"""Processes payrace starts, each a context manager that stops what it started.

    free_port()       a loopback port nobody listens on right now
    ServiceProcess    the reference service under uvicorn in its own process group
    stop_process()    SIGTERM the group, wait, SIGKILL what is left (shared by Locust runs)

The child gets its own session (process group) so that a terminal's Ctrl-C reaches only
payrace, which then stops the child in __exit__ and nothing is left running either way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import httpx

from harness.gateway import GatewayKeys
from harness.provider import Database


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    # The group is signalled even when its leader has already exited: the leader's children
    # (uvicorn workers, multiprocessing's resource tracker) may not have.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=timeout_s)


def service_env(
    db: Database,
    gateway_url: str,
    strategy: str,
    *,
    keys: GatewayKeys = GatewayKeys(),
    probes: bool = False,
    isolation_level: str = "READ COMMITTED",
    pool_size: int = 20,
) -> dict[str, str]:
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
            sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
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
        try:
            self._wait_ready()
        except BaseException:
            stop_process(self.proc)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        last = "no answer yet"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    where = f"; see {self.log_path}" if self.log_path else ""
                    raise RuntimeError(
                        f"service exited with code {self.proc.returncode} before answering{where}"
                    )
                try:
                    response = client.get(f"{self.url}/healthz")
                    if response.status_code == 200:
                        return
                    last = f"HTTP {response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.1)
        raise TimeoutError(
            f"service at {self.url} did not answer /healthz within {self.start_timeout_s}s "
            f"(last seen: {last}); check DATABASE_URL and the service log"
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None:
            stop_process(self.proc)
