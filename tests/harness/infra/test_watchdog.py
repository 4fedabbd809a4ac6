"""The guardian stops what payrace started when payrace dies without unwinding."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import psycopg
import pytest
from marked_run import cleared, cmdline, gone, marked_run
from psycopg import sql

from payrace.harness.infra.watchdog import serve

# Starts guardian processes and sends them signals: `make test-fast` skips these.
pytestmark = pytest.mark.slow


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "300"], start_new_session=True)


def test_at_end_of_input_a_guarded_group_is_stopped_and_a_released_one_is_not() -> None:
    guarded, released = sleeper(), sleeper()
    try:
        commands = f"+group {guarded.pid}\n+group {released.pid}\n-group {released.pid}\n"
        started = time.monotonic()
        serve(io.BytesIO(commands.encode()))
        # SIGTERM ended it; unreaped by us, it is a zombie, which is not waited on for 5 s.
        assert time.monotonic() - started < 4
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
        started = time.monotonic()
        serve(io.BytesIO(f"+cluster {workdir}\n".encode()))
        # It died without removing its pid file (this one is our child, left unreaped): the
        # guardian sees that and does not wait out its 10 s for the file to go.
        assert time.monotonic() - started < 5
        postmaster.wait(timeout=10)
        assert postmaster.returncode == -signal.SIGQUIT
        assert not workdir.exists()
    finally:
        postmaster.kill()
        postmaster.wait()


def test_a_killed_payrace_leaves_neither_service_nor_postgresql(tmp_path: Path) -> None:
    """SIGKILL: no handler runs in payrace; the guardian sees its pipe close and cleans up."""
    with marked_run(tmp_path) as run:
        run.proc.kill()
        run.proc.wait(timeout=10)
        survivors = [p for p in run.started if "payrace.harness.infra.watchdog" not in cmdline(p)]
        assert all(gone(p.pid, within_s=20) for p in survivors), [cmdline(p) for p in survivors]
        assert run.clusters and cleared(run.clusters)


def test_a_normal_exit_waits_for_the_guardian_so_nothing_outlives_payrace() -> None:
    """The guarded group ignores SIGTERM, so the guardian needs its 5 s before SIGKILL: a
    payrace that did not wait for it would exit while the guardian is still running."""
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300"], start_new_session=True)
    script = (
        "import os; from payrace.harness.infra import watchdog\n"
        f"watchdog.guard_group({stubborn.pid})\n"
        "print(watchdog._guardian[0], flush=True)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
        )
        guardian = int(done.stdout.strip())
        # Right after the exit, not eventually: the guardian and what it stopped are gone.
        assert not psutil.pid_exists(guardian) or psutil.Process(guardian).status() == "zombie"
        stubborn.wait(timeout=1)
        assert stubborn.returncode == -signal.SIGKILL
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
            stubborn.wait()


def _outside_server() -> str:
    return os.environ.get(
        "PAYRACE_TEST_OUTSIDE_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
    )


def _databases(admin_url: str) -> set[str]:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'payrace\\_%'")
        return {str(r[0]) for r in rows.fetchall()}


def test_at_end_of_input_a_guarded_database_is_dropped_and_a_released_one_is_not() -> None:
    admin = _outside_server()
    names = [f"payrace_guardtest_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        for name in names:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        guarded, released = names
        commands = f"+database {guarded} {admin}\n+database {released} {admin}\n"
        commands += f"-database {released}\n"
        serve(io.BytesIO(commands.encode()))
        left = _databases(admin)
        assert guarded not in left
        assert released in left
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            for name in names:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def test_a_killed_payrace_leaves_no_database_on_the_dsn_server(tmp_path: Path) -> None:
    """SIGKILL of `payrace run --dsn`: its payrace_* database is dropped by the guardian."""
    admin = _outside_server()
    before = _databases(admin)
    env = {**os.environ, "PAYRACE_DATABASE_URL": admin}
    proc = subprocess.Popen(
        [sys.executable, "-m", "payrace.harness.cli", "run", "--trials", "5000", "--quiet",
         "--out", str(tmp_path)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        created: set[str] = set()
        while time.monotonic() < deadline and not created:
            assert proc.poll() is None, "payrace ended before its database was created"
            created = _databases(admin) - before
            time.sleep(0.1)
        assert created, "payrace created no database within 60 s"
        time.sleep(1.0)  # trials running: connections open in the database
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and created & _databases(admin):
            time.sleep(0.2)
        assert not created & _databases(admin), f"{created} outlived a killed payrace"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
