"""`payrace` as a user runs it: a real process, real exit codes, real report files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from marked_run import cleared, cmdline, gone, marked_run

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.infra.provider import Database, ProviderError, provide_postgres


def payrace(*args: str, pg: Database, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PAYRACE_DATABASE_URL": pg.url, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "payrace.harness.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_run_exits_1_on_naive_and_writes_every_report(pg: Database, tmp_path: Path) -> None:
    done = payrace(
        "run", "--strategy", "naive", "--trials", "5", "--quiet", "--out", str(tmp_path), pg=pg
    )
    assert done.returncode == 1, done.stderr
    (run_dir,) = tmp_path.iterdir()
    assert {p.name for p in run_dir.iterdir()} >= {
        "history.jsonl", "summary.json", "junit.xml", "report.html",
    }  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["strategies"]["naive"]["violating_trials"] == 5
    assert "read payment (pending)" in done.stdout  # the timeline is printed


def test_run_exits_0_when_the_fix_holds(pg: Database, tmp_path: Path) -> None:
    done = payrace(
        "run", "--strategy", "for_update", "--trials", "5", "--quiet", "--out", str(tmp_path),
        pg=pg,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_run_forced_by_locks_says_how_many_trials_it_forced(pg: Database, tmp_path: Path) -> None:
    done = payrace(
        "run", "--strategy", "naive", "--trials", "4", "--force", "locks", "--quiet",
        "--out", str(tmp_path), pg=pg,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "4/4 by locks" in done.stdout


def test_a_breached_gate_exits_1(pg: Database, tmp_path: Path) -> None:
    done = payrace(
        "run", "--trials", "3", "--quiet", "--out", str(tmp_path), "--gate", "lock_max_ms<0",
        pg=pg,
    )  # fmt: skip
    assert done.returncode == 1
    assert "lock_max_ms<0" in done.stdout


def test_usage_errors_exit_2_with_a_message(pg: Database, tmp_path: Path) -> None:
    for args, hint in (
        (["--mode", "sideways"], "--mode must be one of"),
        (["--gate", "p99 small"], "is not of the form"),
        (["--strategy", "optimistic"], "unknown strategy"),
        (["--force", "spin"], "--force must be locks or pause"),
        (["--force", "locks", "--hold-ms", "10"], "--force locks does not use"),
    ):
        done = payrace("run", "--out", str(tmp_path), *args, pg=pg)
        assert done.returncode == 2, args
        assert hint in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_an_unreachable_database_is_an_infrastructure_error(tmp_path: Path) -> None:
    env = {**os.environ, "PAYRACE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    done = subprocess.run(
        [sys.executable, "-m", "payrace.harness.cli", "run", "--trials", "1",
         "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "127.0.0.1:1" in done.stderr
    assert "did not answer" in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.slow
def test_an_interrupted_run_stops_everything_it_started(
    signum: signal.Signals, tmp_path: Path
) -> None:
    """Ctrl-C or a CI runner's SIGTERM mid-run: the embedded PostgreSQL and the uvicorn
    service are gone afterwards, and the exit code says it was interrupted."""
    with marked_run(tmp_path) as run:
        run.proc.send_signal(signum)
        _, stderr = run.proc.communicate(timeout=90)
        assert run.proc.returncode == 130, stderr
        assert "interrupted" in stderr
        assert "Traceback" not in stderr
        assert all(gone(p.pid) for p in run.started), [cmdline(p) for p in run.started]
        assert run.clusters and cleared(run.clusters, within_s=0)


def test_explore_with_an_app_that_cannot_be_imported_exits_2(pg: Database, tmp_path: Path) -> None:
    profile = Path(__file__).resolve().parents[2] / "examples" / "starlette_shop" / "payrace.toml"
    done = payrace(
        "explore", "--app", "payrace_no_such_shop:create_app", "--profile", str(profile),
        "--out", str(tmp_path), pg=pg,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    text = " ".join(done.stdout.split())
    assert "no module named 'payrace_no_such_shop'" in text
    assert "Traceback" not in done.stdout + done.stderr


def _outside_server() -> str:
    """A PostgreSQL server payrace did not start (trust auth here), for DSN mistakes."""
    return os.environ.get(
        "PAYRACE_TEST_OUTSIDE_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
    )


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["--isolation", "bogus"], "unknown isolation level 'bogus'"),
        (["--webhooks", "-1"], "--webhooks must be between 0 and 16"),
        (["--webhooks", "100000"], "--webhooks must be between 0 and 16"),
        (["--mode", "jitter", "--jitter-ms", "nan"], "--jitter-ms must be a number"),
        (["--hold-ms", "inf"], "--hold-ms must be a number"),
        (["--strategy", ""], "--strategy names no strategy"),
        (["--strategy", " , "], "--strategy names no strategy"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_run_input_exits_2_before_any_work(
    args: list[str], hint: str, pg: Database, tmp_path: Path
) -> None:
    done = payrace("run", "--trials", "1", "--out", str(tmp_path / "out"), *args, pg=pg)
    assert done.returncode == 2, done.stdout + done.stderr
    assert hint in " ".join(done.stderr.split()), done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "payrace: using" not in done.stdout + done.stderr  # nothing was provisioned
    assert not any((tmp_path / "out").glob("*/summary.json"))


def test_a_binary_oracle_config_exits_2(pg: Database, tmp_path: Path) -> None:
    config = tmp_path / "oracle.toml"
    config.write_bytes(bytes(range(256)) * 4)
    done = payrace("run", "--trials", "1", "--oracle-config", str(config), "--out",
                   str(tmp_path), pg=pg)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "not UTF-8 text" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unwritable_out_is_refused_before_the_first_trial(pg: Database, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = payrace("run", "--trials", "1", "--out", str(blocker / "reports"), pg=pg)
    assert done.returncode == 2, done.stderr
    text = " ".join(done.stderr.split())
    assert f"--out {blocker / 'reports'} cannot take the reports" in text
    assert "payrace: using" not in done.stdout + done.stderr  # refused before provisioning


def test_a_refused_login_is_named_at_once_without_its_password(tmp_path: Path) -> None:
    """A login the server refuses (wrong password, unknown role) is not waited on as if the
    server were starting, and the error names the user, never the password."""
    from urllib.parse import urlsplit

    parts = urlsplit(_outside_server())
    dsn = (
        f"postgresql://payrace_no_such_role:hunter2@{parts.hostname}:{parts.port or 5432}/postgres"
    )
    env = {**os.environ, "PAYRACE_DATABASE_URL": dsn}
    started = time.monotonic()
    refused = pytest.raises(ProviderError, match="authentication failed for user payrace_no")
    with refused, provide_postgres(dsn):
        pass
    elapsed = time.monotonic() - started
    # The provider waits up to 5 s for a server that is starting; a refusal is final.
    assert elapsed < 2.5, f"a refused login was retried for {elapsed:.1f} s"
    done = subprocess.run(
        [sys.executable, "-m", "payrace.harness.cli", "run", "--trials", "1", "--out",
         str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    text = " ".join(done.stderr.split())
    assert done.returncode == 2, text
    assert "authentication failed for user payrace_no_such_role" in text
    assert "hunter2" not in done.stdout + done.stderr


@pytest.mark.slow
def test_a_running_target_whose_database_is_unreachable_is_named(tmp_path: Path) -> None:
    from payrace.harness.gateway.server import GatewayServer

    with GatewayServer(FakeRazorpay()) as server:  # anything that answers HTTP
        dsn = "postgresql://shop:hunter2@127.0.0.1:1/shop"
        done = subprocess.run(
            [sys.executable, "-m", "payrace.harness.cli", "run", "--trials", "1",
             "--target", server.url, "--gateway-url", server.url, "--target-dsn", dsn,
             "--out", str(tmp_path)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    text = " ".join(done.stderr.split())
    assert done.returncode == 2, text
    assert "cannot connect to --target-dsn postgresql://shop:***@127.0.0.1:1/shop" in text
    assert "hunter2" not in done.stdout + done.stderr


def test_gateway_refuses_a_port_out_of_range() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "payrace.harness.cli", "gateway", "--port", "99999"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--port must be between 0 and 65535" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr


def test_gateway_on_a_port_in_use_says_so() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "payrace.harness.cli", "gateway", "--port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    text = " ".join(done.stderr.split())
    assert done.returncode == 2, text
    assert f"cannot listen on 127.0.0.1:{port}" in text
    assert "Traceback" not in done.stderr


def test_a_password_in_the_dsn_reaches_no_artifact_and_no_message(tmp_path: Path) -> None:
    """The server trusts loopback, so any password logs in; none may be written anywhere."""
    from urllib.parse import urlsplit

    parts = urlsplit(_outside_server())
    user = parts.username or "postgres"
    dsn = f"postgresql://{user}:hunter2secret@{parts.hostname}:{parts.port or 5432}/postgres"
    done = subprocess.run(
        [sys.executable, "-m", "payrace.harness.cli", "run", "--strategy", "naive", "--trials",
         "2", "--quiet", "--out", str(tmp_path), "--dsn", dsn],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "hunter2secret" not in done.stdout + done.stderr
    (run_dir,) = tmp_path.iterdir()
    for name in ("summary.json", "report.html", "junit.xml", "history.jsonl"):
        text = (run_dir / name).read_text(encoding="utf-8")
        assert "hunter2secret" not in text, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{user}:***@" in summary["command"]
