"""harness/load.py: arguments, the tallies workers send and the master merges, the CPU
sampler, stopping Locust's process group, and that no process outlives `payrace load`
(Ctrl-C in the middle of a run, and a run whose Locust fails)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from harness import checker
from harness.load import (
    CpuSampler,
    LoadPlan,
    LoadRun,
    LoadSettings,
    LoadTally,
    LocustProcess,
    UsageError,
    _in_group,
    load_main,
    locust_processes,
    parse_run_time,
    resolve_locustfile,
)
from harness.oracle import AuditRow, Observation, OracleConfig, PaymentState
from harness.provider import Database

ROOT = Path(__file__).resolve().parent.parent
MARKER = "PAYRACE_TEST_LOAD_MARKER"


# -- arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("45s", 45), ("1m30s", 90), ("2h", 7200), ("1h1m1s", 3661)]
)
def test_run_time_reads_locusts_syntax(text: str, seconds: float) -> None:
    assert parse_run_time(text) == seconds


@pytest.mark.parametrize("text", ["", "1.5m", "ten", "30 s", "s"])
def test_run_time_rejects_what_locust_would(text: str) -> None:
    with pytest.raises(UsageError, match="run time"):
        parse_run_time(text)


def test_locustfile_resolves_a_scenario_name_a_path_and_a_list() -> None:
    race = str(ROOT / "locustfiles" / "race_pairs.py")
    assert resolve_locustfile("race_pairs") == race
    assert resolve_locustfile(race) == race
    assert resolve_locustfile("race_pairs, mixed").split(",") == [
        race,
        str(ROOT / "locustfiles" / "mixed.py"),
    ]


def test_unknown_locustfile_names_the_scenarios_there_are() -> None:
    with pytest.raises(UsageError, match="race_pairs, webhook_storm"):
        resolve_locustfile("nope")
    with pytest.raises(UsageError, match="not found"):
        resolve_locustfile("_payrace")  # the helper module is not a scenario


def test_processes_one_means_one_local_locust() -> None:
    assert locust_processes(0) == locust_processes(1) == []
    assert locust_processes(4) == ["--processes", "4"]
    assert locust_processes(-1) == ["--processes", "-1"]
    with pytest.raises(UsageError):
        locust_processes(-2)


def test_plan_builds_the_locust_command_with_reports_in_the_run_dir(tmp_path: Path) -> None:
    plan = LoadPlan.build(
        strategy="naive",
        users=50,
        spawn_rate=12.5,
        run_time="1m",
        processes=2,
        workers=3,
        dsn=None,
        locustfile="webhook_storm",
        out_dir=tmp_path,
        extra_args=["--stop-timeout", "2"],
    )
    assert plan.run_dir.parent == tmp_path and plan.run_dir.name.endswith("-naive-webhook_storm")
    cmd = plan.locust_cmd("http://127.0.0.1:1", master_port=6123)
    assert cmd[1:3] == ["-m", "locust"] and "--headless" in cmd
    flags = [("-u", "50"), ("-r", "12.5"), ("-t", "1m"), ("--processes", "2")]
    # Not Locust's default 5557: two runs on one machine must not collide.
    flags += [("--master-bind-host", "127.0.0.1"), ("--master-bind-port", "6123")]
    for flag, value in [*flags, ("--master-port", "6123")]:
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[cmd.index("--html") + 1] == str(plan.run_dir / "locust.html")
    assert cmd[cmd.index("--csv") + 1] == str(plan.run_dir / "locust")
    assert cmd[-2:] == ["--stop-timeout", "2"]
    # 3 workers x (pool + overflow) stays under a default max_connections of 100.
    pool = plan.service_pool()
    assert 3 * (int(pool["DB_POOL_SIZE"]) + int(pool["DB_MAX_OVERFLOW"])) <= 90


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "optimistic"}, "--strategy"),
        ({"users": 0}, "--users"),
        ({"spawn_rate": 0.0}, "--spawn-rate"),
        ({"run_time": "soon"}, "run time"),
        ({"run_time": "0s"}, "longer than zero"),
        ({"workers": 0}, "--workers"),
        ({"locustfile": "missing_scenario"}, "not found"),
        ({"processes": -5}, "--processes"),
    ],
)
def test_usage_errors_exit_2_before_anything_starts(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {
        "strategy": "for_update",
        "users": 1,
        "spawn_rate": 1.0,
        "run_time": "1s",
        "processes": 1,
        "workers": 1,
        "dsn": None,
        "locustfile": "race_pairs",
        "out_dir": tmp_path,
        "extra_args": [],
    }
    args.update(changes)
    out = io.StringIO()
    code = load_main(console=Console(file=out, width=200), **args)  # type: ignore[arg-type]
    assert code == 2
    assert message in out.getvalue()
    assert list(tmp_path.iterdir()) == []  # no run directory, no database, no process


# -- tallies: workers -> master -----------------------------------------------------------


def _tally(requests: int, payments: list[tuple[int, str | None]], lock_ms: list[float]) -> dict:
    tally = LoadTally()
    for n in range(requests):
        tally.request(failed=n == 0)
    for payment_id, gateway_id in payments:
        tally.payment(payment_id, gateway_id)
    for ms in lock_ms:
        tally.timing("lock", "client", ms)
    return tally.drain()


def test_drain_hands_over_and_starts_afresh() -> None:
    tally = LoadTally()
    tally.request(failed=False)
    tally.timing("lock", "webhook", 1.5)
    tally.confirm(7, "verify", None)
    first = tally.drain()
    assert first["requests"] == 1 and first["pid"] == os.getpid()
    assert first["confirmed"] == [[7, "verify", None]]
    tally.confirm(7, "webhook", "payment.captured")  # old news about payment 7
    second = tally.drain()
    assert second["requests"] == 0 and second["confirmed"] == [] and second["hdr"] == {}


def test_master_merges_every_workers_reports() -> None:
    run = LoadRun(LoadSettings.from_env({}))
    run.absorb("w1", _tally(3, [(1, "pay_a")], [1.0, 2.0]))
    run.absorb("w2", _tally(5, [(2, "pay_b"), (3, None)], [3.0]))
    run.absorb("w1", _tally(2, [], [4.0]))
    assert {cid: w.requests for cid, w in run.workers.items()} == {"w1": 5, "w2": 5}
    assert {cid: w.failures for cid, w in run.workers.items()} == {"w1": 2, "w2": 1}
    assert run.workers["w1"].reports == 2
    assert run.payments == {1: "pay_a", 2: "pay_b", 3: None}
    lock = run.hist.get("lock", "client")
    assert lock.count == 4 and lock.summary()["max"] == pytest.approx(4.0, abs=0.01)


def _observation(states: dict[int, str], accepted: dict[str, int]) -> Observation:
    at = datetime.now(UTC)
    audit = tuple(
        AuditRow(n, "payments", pid, pid, "UPDATE", "pending", status, 100 + n, 1, at)
        for n, (pid, status) in enumerate(states.items())
        if status == "captured"
    )
    return Observation(
        audit=audit,
        payments={pid: PaymentState(pid, s, None, None, None) for pid, s in states.items()},
        gateway_captures=dict(accepted),
        gateway_accepted=dict(accepted),
        deadlocks=0,
        config=OracleConfig.reference(),
    )


def test_synthesised_ops_let_no_lost_capture_see_confirmations_and_gateway_owners() -> None:
    """Payment 1 was confirmed to the client, payment 2's capture was accepted by the gateway,
    and both end pending: two lost captures. The database never recorded pay_b's owner, so
    only the history the master synthesises can tie the gateway capture to payment 2."""
    run = LoadRun(LoadSettings.from_env({}))
    data = _tally(1, [(1, "pay_a"), (2, "pay_b"), (3, "pay_c")], [])
    data["confirmed"] = [[1, "verify", None], [3, "webhook", "payment.captured"]]
    run.absorb("w", data)
    obs = _observation({1: "pending", 2: "pending", 3: "captured"}, {"pay_b": 1})
    result = checker.no_lost_capture(run.ops(), obs)
    assert result.valid is False
    assert result.payments == frozenset({1, 2})


# -- processes ----------------------------------------------------------------------------

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
    proc = LocustProcess(
        [sys.executable, "-c", _STUBBORN],
        dict(os.environ),
        tmp_path / "locust.log",
        lines.append,
        stop_grace_s=(0.3, 0.3),
    )
    with proc:
        deadline = time.monotonic() + 10
        while "ready" not in lines and time.monotonic() < deadline:
            time.sleep(0.02)
        group = [p for p in psutil.process_iter() if _pgid(p.pid) == proc.pid]
        assert len(group) == 2
    assert [p for p in group if _alive(p)] == []
    assert (tmp_path / "locust.log").read_text() == "ready\n"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_cpu_sampler_counts_a_busy_group(tmp_path: Path) -> None:
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"],
        start_new_session=True,
    )
    try:
        with CpuSampler({"busy": _in_group(busy.pid)}) as sampler:
            busy.wait(timeout=10)
            time.sleep(1.1)  # one more sample after it exited changes nothing
        result = sampler.result()
    finally:
        busy.kill()
        busy.wait()
    assert result is not None
    assert 0.2 < result["groups"]["busy"]["cpu_s"] <= 2.0
    assert 0 < result["groups"]["busy"]["percent_of_machine"] <= 100


# -- no process outlives payrace load -----------------------------------------------------


def _marked(marker: str) -> list[psutil.Process]:
    """Every process whose environment carries the marker: payrace, the service and its
    workers, Locust and its workers, the postmaster (its children rewrite their environ
    area for the process title, but die with it)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            out.append(f"{p.pid} (gone)")
    return out


def _spawn_load(tmp_path: Path, marker: str, **kwargs: object) -> subprocess.Popen[bytes]:
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from rich.console import Console
        from harness.load import load_main
        args = {kwargs!r}
        sys.exit(load_main(console=Console(width=200), out_dir=Path({str(tmp_path)!r}),
                           extra_args=[], **args))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PAYRACE_DATABASE_URL"}
    env[MARKER] = marker
    log = (tmp_path / "payrace.log").open("wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    finally:
        log.close()


def test_ctrl_c_in_the_middle_of_a_run_stops_everything(tmp_path: Path) -> None:
    """The embedded PostgreSQL route, so the postmaster is payrace's to stop too."""
    marker = uuid.uuid4().hex
    proc = _spawn_load(
        tmp_path,
        marker,
        strategy="for_update",
        users=4,
        spawn_rate=4.0,
        run_time="60s",
        processes=2,
        workers=2,
        dsn=None,
        locustfile="race_pairs",
    )
    try:
        deadline = time.monotonic() + 60
        seen: list[str] = []
        while time.monotonic() < deadline and proc.poll() is None:
            seen = _describe(_marked(marker))
            if sum(" locust " in s for s in seen) >= 3:  # master + 2 workers
                break
            time.sleep(0.2)
        assert sum(" locust " in s for s in seen) >= 3, (tmp_path / "payrace.log").read_text()
        assert any("postgres" in s for s in seen) and any("uvicorn" in s for s in seen)
        time.sleep(2.0)  # users spawned and racing
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "payrace.log").read_text()
    assert code == 130, log
    assert "interrupted" in log
    assert _describe(_marked(marker)) == []


def test_a_failing_locust_run_exits_2_and_leaves_nothing_behind(
    tmp_path: Path, pg: Database
) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import locust\nraise RuntimeError('a locustfile that cannot load')\n")
    marker = uuid.uuid4().hex
    proc = _spawn_load(
        tmp_path,
        marker,
        strategy="for_update",
        users=1,
        spawn_rate=1.0,
        run_time="30s",
        processes=1,
        workers=1,
        dsn=pg.url,
        locustfile=str(broken),
    )
    try:
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "payrace.log").read_text()
    assert code == 2, log
    assert "before its gate wrote summary.json" in log
    assert "a locustfile that cannot load" in next(tmp_path.glob("*/locust.log")).read_text()
    assert _describe(_marked(marker)) == []
