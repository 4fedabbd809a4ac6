"""Where the CPU went during a load run: named groups of processes, sampled with psutil.

    CpuSampler        context manager: samples every process once a second; result() gives
                      each group's CPU seconds and its share of the machine and of the busy time,
                      plus "other" (whatever else kept the CPUs busy)
    ProcSample        one process in one sample: pid, parent, process group, CPU seconds
    Member            a group is a predicate over a ProcSample (and every process of the sample,
                      to look at its parent)
    in_group()        the members of one process group (the service, Locust)
    postmaster_pid()  the local postmaster behind a DSN, to count PostgreSQL's backends

Used by `payrace load` (load.launch), which names the groups.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psutil
import psycopg


@dataclass(frozen=True)
class ProcSample:
    pid: int
    ppid: int
    pgrp: int
    cpu_s: float  # user + system, since the process started


Member = Callable[[ProcSample, Mapping[int, ProcSample]], bool]


def _sample_processes() -> dict[int, ProcSample]:
    procs = {}
    for proc in psutil.process_iter(["ppid", "cpu_times"]):
        ppid, times = proc.info["ppid"], proc.info["cpu_times"]
        if ppid is None or times is None:
            continue  # not ours to read, or gone while being read
        try:
            pgrp = os.getpgid(proc.pid)
        except OSError:
            continue  # exited meanwhile
        procs[proc.pid] = ProcSample(proc.pid, ppid, pgrp, times.user + times.system)
    return procs


def _machine_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of all CPUs since boot."""
    times = psutil.cpu_times()
    # Guest time is already counted inside user (Linux); iowait is idle time.
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    idle = times.idle + getattr(times, "iowait", 0.0)
    return total - idle, total


class CpuSampler:
    """Samples once a second; groups are named predicates over processes.

    A process's CPU counts from the first sample it is seen in, or from its birth if it
    appears later (a backend forked for a new connection spends all its CPU in the run)."""

    def __init__(self, groups: Mapping[str, Member]) -> None:
        self.groups = dict(groups)
        self._seen: dict[tuple[int, str], float] = {}
        self._cpu: dict[str, float] = dict.fromkeys(self.groups, 0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._machine0 = self._machine1 = (0.0, 0.0)
        self._first = True
        self._t0 = self._t1 = 0.0

    def _sample(self) -> None:
        procs = _sample_processes()
        for proc in procs.values():
            for name, member in self.groups.items():
                if not member(proc, procs):
                    continue
                key = (proc.pid, name)
                start = self._seen.setdefault(key, proc.cpu_s if self._first else 0.0)
                self._cpu[name] += proc.cpu_s - start
                self._seen[key] = proc.cpu_s
        self._first = False
        self._machine1, self._t1 = _machine_seconds(), time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._machine0, self._t0 = _machine_seconds(), time.monotonic()
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
        """None when nothing was sampled."""
        if self._t1 <= self._t0:
            return None
        busy = self._machine1[0] - self._machine0[0]
        total = self._machine1[1] - self._machine0[1]
        out: dict[str, Any] = {
            "window_s": round(self._t1 - self._t0, 2),
            "cpus": os.cpu_count(),
            "machine_busy_percent": round(100.0 * busy / total, 1) if total else None,
            "groups": {},
        }
        for name, cpu_s in [*self._cpu.items(), ("other", busy - sum(self._cpu.values()))]:
            # "other": everything else that kept the CPUs busy (the kernel, other programs);
            # a large share means the figures above were measured on a shared machine.
            out["groups"][name] = {
                "cpu_s": round(cpu_s, 2),
                "percent_of_machine": round(100.0 * cpu_s / total, 1) if total else None,
                "percent_of_busy": round(100.0 * cpu_s / busy, 1) if busy else None,
            }
        return out


def in_group(pgrp: int) -> Member:
    return lambda proc, _: proc.pgrp == pgrp


def postmaster_pid(url: str) -> int | None:
    """The local postmaster behind `url`, found through one of its backends; None if remote."""
    try:
        with psycopg.connect(url, autocommit=True, application_name="payrace-load") as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            if row is None:
                return None
            # Looked at while connected: the backend exits with the connection. In a container
            # the pid is the container's own, so only a local postgres with a postgres parent
            # counts.
            backend = psutil.Process(int(row[0]))
            parent = backend.parent()
            if parent is None or {backend.name(), parent.name()} != {"postgres"}:
                return None
            return parent.pid
    except (psycopg.Error, psutil.Error):
        return None
