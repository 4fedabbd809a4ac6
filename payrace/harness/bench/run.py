"""`payrace bench`: one run, one machine, one PostgreSQL; what the service and the harness
cost, written to reports/bench/<run>/bench.json and bench.md.

    BenchConfig        the budget: strategies, seconds per measurement, the sweeps (--quick:
                       a few seconds each, for the tests)
    bench_main()       PostgreSQL (provider) + the fake gateway (a thread of this process) ->
                       per strategy: ceiling, service, ceiling again -> ratio -> harness ->
                       load -> the report
    ceiling            per strategy: the capture's statement log (bench.ceiling) under pgbench
                       at each client count of the sweep, the best of it, then once more at
                       that count after each round of the service's windows (--rounds); the
                       ceiling is the median of those runs (the drift between the first and
                       the last reported)
    service            per strategy and uvicorn worker count: fresh authorized payments
                       captured over HTTP by bench.loadgen (its own process) at saturation,
                       each worker's pools sized for its share of the connections;
                       captures/s, request p50/p99, lock wait and hold (Server-Timing), the
                       CPU share of every process group (infra.cpu), the service's peak RSS;
                       with --rounds, the figures of the round of median captures/s
    ratio              service captures/s (the median round's) over the ceiling, per strategy
                       and worker count, computed from the two figures above
    harness            `payrace run` forced and aligned (trials/s), `payrace explore`
                       (schedules/s) on this database; a cold `payrace run --trials N` that
                       provisions its own embedded PostgreSQL (wall time, peak RSS); the
                       lock-wait instrumentation's own cost per request against the p50
    load               a short `payrace load`: the CPU shares its summary reports
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import psycopg

from payrace.harness.bench.ceiling import (
    Prepared,
    find_pgbench,
    pgbench_script,
    record_capture_sql,
    run_pgbench,
)
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys, client_callback
from payrace.harness.infra import env as env_vars
from payrace.harness.infra.cpu import CpuSampler, Member, in_group, postmaster_pid
from payrace.harness.infra.machine import machine
from payrace.harness.infra.processes import ServiceProcess, listeners, service_env
from payrace.harness.infra.provider import Database, provide_postgres
from payrace.service.db import create_schema, make_engine
from payrace.service.instrument import timing
from payrace.service.settings import Settings

_AMOUNT = 50_000
_PGBENCH_FIRST_ID = 10_000_001  # rows pgbench captures, apart from the HTTP payments
_RECORD_FIRST_ID = 9_000_001  # one per strategy: the capture whose statements are logged
_PGBENCH_ROWS_PER_STRATEGY = 100_000_000  # the ids of one strategy's pgbench rows
_CALIBRATION_PER_CLIENT = 100


@dataclass(frozen=True)
class BenchConfig:
    out: Path = Path("reports")
    run_id: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))
    dsn: str | None = None
    strategies: tuple[str, ...] = ("naive", "for_update", "advisory")
    service_seconds: float = 6.0
    pgbench_seconds: int = 4
    pgbench_clients: tuple[int, ...] = (1, 2, 4, 8, 16)
    workers: tuple[int, ...] = (1, 2)
    connections: int = 32
    harness_trials: int = 200
    cold_trials: int = 100
    load_seconds: int = 15
    compare_stacks: bool = True  # the service again on uvicorn's stock stack (before/after)
    # Service windows per strategy, each followed by the ceiling again: single rounds on a
    # shared 2-core VM gave ratios from 0.21 to 0.30 within the hour (docs/benchmarks.md).
    rounds: int = 3

    @classmethod
    def quick(cls, **changes: Any) -> BenchConfig:
        values: dict[str, Any] = {
            "strategies": ("for_update",),
            "service_seconds": 1.0,
            "pgbench_seconds": 1,
            "pgbench_clients": (2, 8),
            "connections": 16,
            "harness_trials": 10,
            "cold_trials": 5,
            "load_seconds": 2,
            "compare_stacks": False,
            "rounds": 1,
        }
        values.update(changes)
        return cls(**values)

    @property
    def run_dir(self) -> Path:
        return self.out / "bench" / self.run_id


def bench_main(config: BenchConfig, say: Callable[[str], None]) -> dict[str, Any]:
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict[str, Any] = {
        "run_id": config.run_id,
        "command": " ".join(["payrace", *sys.argv[1:]]) if sys.argv else "payrace bench",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "machine": machine(),
        "load_average_before": list(os.getloadavg()),
    }
    keys = GatewayKeys()
    with provide_postgres(config.dsn, announce=say) as db:
        report["database"] = db.describe()
        asyncio.run(_create_schema(db))
        fake = FakeRazorpay(keys)
        with GatewayServer(fake) as gateway:
            next_id = iter(range(1, _RECORD_FIRST_ID))
            report["ceiling"], report["service"] = {}, {}
            for i, s in enumerate(config.strategies):
                # Per strategy, the service's windows between pgbench measurements: the ratio's
                # two figures come from the same minutes of a shared machine.
                say(f"bench: {s}: ceiling (pgbench on the capture's statements)")
                ceiling, pgbench = _ceiling(config, db, fake, gateway.url, keys, s, i)
                rounds: list[dict[str, dict[str, Any]]] = []
                for r in range(config.rounds):
                    of = f" (round {r + 1} of {config.rounds})" if config.rounds > 1 else ""
                    say(f"bench: {s}: the service over HTTP{of}")
                    rounds.append(
                        {
                            str(w): _service(config, db, fake, gateway.url, keys, s, w, next_id)
                            for w in config.workers
                        }
                    )
                    if pgbench is not None:
                        say(f"bench: {s}: ceiling again{of}")
                        ceiling["runs"].append(pgbench.measured(ceiling["clients"]))
                if pgbench is not None:
                    _bracket(ceiling)
                report["ceiling"][s] = ceiling
                report["service"][s] = _median_rounds(rounds)
            if config.compare_stacks:
                report["stacks"] = _stacks(config, db, fake, gateway.url, keys, next_id, report)
        report["ratio"] = _ratios(report["ceiling"], report["service"])
        say("bench: the harness")
        report["harness"] = _harness(config, db)
    report["harness"]["cold_run"] = _cold_run(config)
    report["harness"]["instrumentation"] = _instrumentation(report["service"])
    say("bench: payrace load")
    report["load"] = _load(config)
    report["duration_s"] = round(time.monotonic() - started, 1)
    report["load_average_after"] = list(os.getloadavg())
    (run_dir / "bench.json").write_text(json.dumps(report, indent=2, default=str))
    (run_dir / "bench.md").write_text(markdown(report))
    return report


async def _create_schema(db: Database) -> None:
    engine = make_engine(Settings(database_url=db.asyncpg_url()), pool_size=1)
    try:
        await create_schema(engine)
    finally:
        await engine.dispose()


def _prepare(db: Database, fake: FakeRazorpay | None, ids: Iterator[int], n: int) -> list[Prepared]:
    """`n` pending payments with their order and invoice (one id for all three), authorized
    at the fake gateway (or named `pay_bench_<id>` for pgbench's rows, never called there)."""
    rows: list[Prepared] = []
    for _ in range(n):
        pid = next(ids)
        if fake is None:
            rows.append(Prepared(pid, f"order_bench_{pid}", f"pay_bench_{pid}"))
            continue
        order = fake.create_order({"amount": _AMOUNT, "currency": "INR"})
        payment = fake.authorize_payment(order["id"])
        rows.append(Prepared(pid, order["id"], payment["id"]))
    with psycopg.connect(db.url, autocommit=True) as conn, conn.transaction():
        with conn.cursor().copy(
            "COPY orders (id, gateway_order_id, amount, currency, status) FROM STDIN"
        ) as copy:
            for r in rows:
                copy.write_row((r.payment_id, r.gateway_order_id, _AMOUNT, "INR", "created"))
        with conn.cursor().copy(
            "COPY payments (id, order_id, amount, currency, status) FROM STDIN"
        ) as copy:
            for r in rows:
                copy.write_row((r.payment_id, r.payment_id, _AMOUNT, "INR", "pending"))
        with conn.cursor().copy(
            "COPY invoices (id, order_id, payment_id, amount, amount_paid, status) FROM STDIN"
        ) as copy:
            for r in rows:
                copy.write_row((r.payment_id, r.payment_id, r.payment_id, _AMOUNT, 0, "issued"))
    return rows


class _Pgbench:
    """pgbench on one strategy's recorded capture, each transaction capturing a fresh pending
    payment of its own (as the service's window does): rows are prepared per run from the
    strategy's own id range."""

    def __init__(self, config: BenchConfig, db: Database, pgbench: Path, script: Path, index: int):
        self.config = config
        self.db = db
        self.pgbench = pgbench
        self.script = script
        self.next_row = _PGBENCH_FIRST_ID + index * _PGBENCH_ROWS_PER_STRATEGY

    def captures_per_s(self, clients: int, per_client: int) -> float:
        first, count = self.next_row, clients * per_client
        self.next_row += count
        _prepare(self.db, None, iter(range(first, first + count)), count)
        tps = run_pgbench(
            self.pgbench, self.db.url, self.script, clients=clients,
            threads=os.cpu_count() or 1, first=first, transactions=per_client,
        )  # fmt: skip
        captured = _captured(self.db, first, count)
        if captured != count:
            # Each transaction must have captured a row of its own, or the figure is not
            # the service's capture.
            raise RuntimeError(
                f"pgbench captured {captured} of the {count} rows its {count} transactions "
                f"were given ({clients} clients); the ceiling would not be one capture each"
            )
        return tps

    def measured(self, clients: int) -> float:
        """A short run sizes the measured one to last about pgbench_seconds."""
        rate = self.captures_per_s(clients, _CALIBRATION_PER_CLIENT)
        seconds = self.config.pgbench_seconds
        per_client = max(_CALIBRATION_PER_CLIENT, math.ceil(rate * seconds / clients))
        return round(self.captures_per_s(clients, per_client), 1)


def _ceiling(
    config: BenchConfig,
    db: Database,
    fake: FakeRazorpay,
    gateway_url: str,
    keys: GatewayKeys,
    strategy: str,
    index: int,
) -> tuple[dict[str, Any], _Pgbench | None]:
    """The sweep over client counts; the best is the ceiling (until _bracket)."""
    pgbench = find_pgbench()
    if pgbench is None:
        return {"error": "no pgbench: install pgserver (it ships one) or put pgbench on PATH"}, None
    (recorded_payment,) = _prepare(db, fake, iter([_RECORD_FIRST_ID + index]), 1)
    recorded = asyncio.run(
        record_capture_sql(db.asyncpg_url(), gateway_url, strategy, keys, recorded_payment)
    )
    if recorded.status != 200:
        return {"error": f"the recorded capture answered {recorded.status}"}, None
    script = pgbench_script(recorded, recorded_payment)
    path = config.run_dir / f"ceiling-{strategy}.sql"
    path.write_text(script)
    runner = _Pgbench(config, db, pgbench, path, index)
    sweep = {str(c): runner.measured(c) for c in config.pgbench_clients}
    best = max(sweep, key=lambda c: sweep[c])
    statements = [s for s, _ in recorded.statements if s not in ("BEGIN", "COMMIT", "ROLLBACK")]
    return {
        "captures_per_s": sweep[best],
        "clients": int(best),
        "sweep_tps": sweep,
        "runs": [sweep[best]],  # at `clients`: the sweep's, then one after each service round
        "statements_per_capture": len(statements),
        "transactions_per_capture": sum(1 for s, _ in recorded.statements if s == "BEGIN"),
        "script": path.name,
        "how": "statements and BEGIN/COMMIT of one POST /payments/verify, logged from the "
        "capture pools' observers (payrace.service.sql), replayed by pgbench -M prepared, "
        "each transaction capturing a pending payment of its own",
    }, runner


def _bracket(ceiling: dict[str, Any]) -> None:
    """The ceiling over the strategy's service windows: the sweep's best before them and a
    run at that client count after each round (`runs`). The ratio divides by their median
    (with one round, the mean of before and after); the drift from the first to the last
    says how much the machine moved meanwhile (shared machines do: the ceiling has moved by
    half from one round to the next)."""
    runs = ceiling["runs"]
    before, after = runs[0], runs[-1]
    ceiling["before_captures_per_s"] = before
    ceiling["after_captures_per_s"] = after
    ceiling["captures_per_s"] = round(statistics.median(runs), 1)
    ceiling["drift_percent"] = round(100 * (after - before) / before, 1) if before else None


def _median_rounds(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per worker count, the round of median captures/s (the lower of the middle two for an
    even count: always a round that ran, with its latencies and CPU shares), and every
    round's captures/s beside it."""
    out: dict[str, dict[str, Any]] = {}
    for w in rounds[0]:
        results = [r[w] for r in rounds]
        figures = [r.get("captures_per_s") for r in results]
        failed = [r for r, f in zip(results, figures, strict=True) if not f]
        if failed:  # the error is the answer
            chosen = failed[0]
        else:
            chosen = results[figures.index(statistics.median_low(cast(list[float], figures)))]
        out[w] = {**chosen, "rounds_captures_per_s": figures}
    return out


def _captured(db: Database, first: int, count: int) -> int:
    with psycopg.connect(db.url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM payments WHERE id >= %s AND id < %s AND status = 'captured'",
            (first, first + count),
        ).fetchone()
    return int(row[0]) if row is not None else 0


def _service(
    config: BenchConfig,
    db: Database,
    fake: FakeRazorpay,
    gateway_url: str,
    keys: GatewayKeys,
    strategy: str,
    workers: int,
    ids: Iterator[int],
    server_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    # Enough fresh payments for a fast service, warm-up included (a window whose bodies run
    # out ends early, with its last connections idle); each is captured once (a repeat would
    # take the cheaper idempotent path and flatter the figure).
    n = int((config.service_seconds + 1) * 2500 * workers) + 500
    prepared = _prepare(db, fake, ids, n)
    bodies = [
        {
            **client_callback(p.gateway_order_id, p.gateway_payment_id, keys.key_secret),
            "internal_payment_id": p.payment_id,
        }
        for p in prepared
    ]
    tag = f"{strategy}-w{workers}" + ("-stock" if server_args else "")
    # Each worker's pools sized for its share of the load (the workers share the listening
    # socket), none beyond it: with a pool as large as the whole load in every worker, and
    # DB_MAX_OVERFLOW's 20 more for each pool, PostgreSQL kept about 60 backends for 32
    # requests in flight, and its CPU per capture rose with them (docs/benchmarks.md).
    pool = math.ceil(config.connections / workers)
    env = service_env(db, gateway_url, strategy, keys=keys, pool_size=pool)
    env["DB_MAX_OVERFLOW"] = "0"
    log = config.run_dir / f"service-{tag}.log"
    with ServiceProcess(env, workers=workers, log_path=log, server_args=server_args) as service:
        assert service.proc is not None
        spec = config.run_dir / f"load-{tag}.json"
        result_path = config.run_dir / f"load-{tag}.result.json"
        spec.write_text(
            json.dumps(
                {
                    "host": service.host,
                    "port": service.port,
                    "path": "/payments/verify",
                    "bodies": bodies,
                    "connections": config.connections,
                    "duration_s": config.service_seconds,
                    "warmup_s": min(1.0, config.service_seconds / 3),
                    "workers": _worker_pids(service.proc.pid, service.port, workers),
                    "probe_path": "/healthz",
                }
            )
        )
        groups: dict[str, Member] = {"service": in_group(service.proc.pid)}
        me = os.getpid()
        groups["payrace (fake gateway)"] = lambda proc, _: proc.pid == me
        postmaster = postmaster_pid(db.url)
        if postmaster is not None:
            groups["postgres"] = lambda proc, _: postmaster in (proc.pid, proc.ppid)
        holder: list[int] = []
        groups["load generator"] = lambda proc, _: proc.pid in holder
        with CpuSampler(groups) as cpu:
            gen = subprocess.Popen(
                [sys.executable, "-m", "payrace.harness.bench.loadgen", str(spec), str(result_path)]
            )
            holder.append(gen.pid)
            gen.wait(timeout=config.service_seconds + 120)
        peak_kib = _peak_rss_kib(service.proc.pid)
    spec.unlink()
    if gen.returncode != 0 or not result_path.exists():
        return {"error": f"the load generator exited with {gen.returncode}"}
    result: dict[str, Any] = json.loads(result_path.read_text())
    result["cpu"] = cpu.result()
    result["service_peak_rss_mib"] = round(peak_kib / 1024, 1)
    result["payments_prepared"] = n
    result["pool_per_worker"] = pool
    return result


def _worker_pids(supervisor: int, port: int, workers: int) -> list[int]:
    """uvicorn's worker processes (those of `--workers N` above 1, which share the listening
    socket on `port`), for the load generator to spread its connections over; [] with one
    worker, which serves in the supervisor's process. Waited for up to 10 s: the service is
    ready when one worker answers, the others may still be starting."""
    if workers < 2:
        return []
    deadline = time.monotonic() + 10
    while True:
        found = [pid for pid in listeners(supervisor, port) if pid != supervisor]
        if len(found) >= workers or time.monotonic() > deadline:
            return sorted(found)
        time.sleep(0.05)


STOCK = ("--loop", "asyncio", "--http", "h11")


def _stacks(
    config: BenchConfig,
    db: Database,
    fake: FakeRazorpay,
    gateway_url: str,
    keys: GatewayKeys,
    ids: Iterator[int],
    report: dict[str, Any],
) -> dict[str, Any]:
    """Before / after in one run: for_update (else the first strategy) again on uvicorn's
    stock stack (asyncio loop, h11), after it ran on uvicorn's auto choice (uvloop and
    httptools, both payrace dependencies); each set against the same ceiling."""
    strategy = "for_update" if "for_update" in config.strategies else config.strategies[0]
    top = report["ceiling"].get(strategy, {}).get("captures_per_s")
    out: dict[str, Any] = {
        "strategy": strategy,
        "before": "uvicorn " + " ".join(STOCK),
        "after": "uvicorn --loop auto --http auto (" + _auto_stack() + ")",
        "workers": {},
    }
    for w in config.workers:
        before = _service(config, db, fake, gateway_url, keys, strategy, w, ids, STOCK)
        after = report["service"][strategy][str(w)]
        row: dict[str, Any] = {
            "before_captures_per_s": before.get("captures_per_s"),
            "after_captures_per_s": after.get("captures_per_s"),
            "before": before,
        }
        if top and before.get("captures_per_s") and after.get("captures_per_s"):
            row["before_ratio"] = round(before["captures_per_s"] / top, 3)
            row["after_ratio"] = round(after["captures_per_s"] / top, 3)
        out["workers"][str(w)] = row
    return out


def _auto_stack() -> str:
    """What uvicorn's auto choice resolves to here: uvloop and httptools when importable."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop}, {http}"


def _peak_rss_kib(pgid: int) -> int:
    """The group's peak resident memory: each member's VmHWM (Linux), summed."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if os.getpgid(int(status.parent.name)) != pgid:
                continue
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total


def _ratios(ceiling: dict[str, Any], service: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for strategy, by_workers in service.items():
        top = ceiling.get(strategy, {}).get("captures_per_s")
        if not top:
            continue
        out[strategy] = {
            w: round(r["captures_per_s"] / top, 3)
            for w, r in by_workers.items()
            if r.get("captures_per_s")
        }
    return out


# The child reports its own peak RSS at exit: VmHWM belongs to its address space, which exec
# starts afresh (getrusage's ru_maxrss would keep the forking parent's high-water mark).
_MEASURED = (
    "import atexit, re, sys\n"
    "def _peak():\n"
    "    found = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())\n"
    "    print('PAYRACE_PEAK_RSS_KIB', found.group(1) if found else 0, file=sys.stderr)\n"
    "atexit.register(_peak)\n"
    "sys.argv = ['payrace', *sys.argv[1:]]\n"
    "from payrace.harness.cli import main\n"
    "main()\n"
)


def _payrace(args: list[str], *, env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """Run `payrace ARGS`; (wall seconds, exit code, peak RSS KiB of that process)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    wall = time.monotonic() - started
    peak = 0
    for line in done.stderr.splitlines():
        if line.startswith("PAYRACE_PEAK_RSS_KIB "):
            peak = int(line.split()[1])
    return wall, done.returncode, peak


def _summary(out: Path) -> dict[str, Any]:
    found = sorted(out.rglob("summary.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else {}


def _first(data: Any, key: str) -> Any:
    """The first value under `key` anywhere in a summary (its layout is the reports' own)."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        data = list(data.values())
    if isinstance(data, list):
        for item in data:
            found = _first(item, key)
            if found is not None:
                return found
    return None


def _harness(config: BenchConfig, db: Database) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = config.run_dir / "harness"
    for mode in ("forced", "aligned"):
        where = base / mode
        wall, code, rss = _payrace(
            ["run", "-s", "for_update", "--mode", mode, "--trials", str(config.harness_trials),
             "--quiet", "--dsn", db.url, "--out", str(where)]
        )  # fmt: skip
        out[mode] = {
            "trials": config.harness_trials,
            "trials_per_s": _first(_summary(where), "trials_per_second"),
            "wall_s": round(wall, 2),
            "exit": code,
            "payrace_peak_rss_mib": round(rss / 1024, 1),
        }
    where = base / "explore"
    wall, code, rss = _payrace(["explore", "--quiet", "--dsn", db.url, "--out", str(where)])
    out["explore"] = {
        "schedules_per_s": _first(_summary(where), "trials_per_second"),
        "wall_s": round(wall, 2),
        "exit": code,
        "payrace_peak_rss_mib": round(rss / 1024, 1),
    }
    return out


def _cold_run(config: BenchConfig) -> dict[str, Any]:
    """Provisioning included: no DSN, so the run starts its own embedded PostgreSQL."""
    where = config.run_dir / "harness" / "cold"
    skip = (env_vars.DSN, env_vars.DEPRECATED)
    env = {k: v for k, v in os.environ.items() if k not in skip}
    args = ["run", "--trials", str(config.cold_trials), "--quiet", "--out", str(where)]
    wall, code, rss = _payrace(args, env=env)
    return {
        "command": "payrace " + " ".join(args[:3]),
        "wall_s": round(wall, 2),
        "exit": code,
        "payrace_peak_rss_mib": round(rss / 1024, 1),
    }


def _instrumentation(service: dict[str, Any], rounds: int = 20_000) -> dict[str, Any]:
    """What the lock-wait instrumentation adds to one request, in this process: the Timings
    of a request, an attempt's clock around the lock and the commit, the header rendered,
    timed against the same loop without them; set against the service's request p50."""

    def with_timings() -> None:
        t = timing.begin()
        clock = timing.AttemptClock()
        with clock.waiting_for_lock():
            pass
        clock.committed()
        t.header()

    def without() -> None:
        return None

    def per_call_us(fn: Callable[[], None]) -> float:
        started = time.perf_counter()
        for _ in range(rounds):
            fn()
        return (time.perf_counter() - started) / rounds * 1e6

    cost_us = max(0.0, per_call_us(with_timings) - per_call_us(without))
    p50s = [
        r["request_p50_ms"]
        for by_workers in service.values()
        for r in by_workers.values()
        if r.get("request_p50_ms")
    ]
    p50_ms = min(p50s) if p50s else None
    return {
        "cost_us_per_request": round(cost_us, 2),
        "request_p50_ms": p50_ms,
        "percent_of_p50": round(100 * cost_us / 1000 / p50_ms, 3) if p50_ms else None,
    }


def _load(config: BenchConfig) -> dict[str, Any]:
    where = config.run_dir / "load"
    args = ["load", "-t", f"{config.load_seconds}s", "-u", "20", "-r", "20",
            "--out", str(where)]  # fmt: skip
    wall, code, _ = _payrace(args)
    summary = _summary(where)
    cpu = _first(summary, "cpu") or {}
    return {
        "command": "payrace " + " ".join(args[:-2]),
        "exit": code,
        "wall_s": round(wall, 2),
        "cpu": cpu,
    }


def _f(value: Any) -> str:
    return "—" if value is None else str(value)


def _others(service: dict[str, Any]) -> str:
    rounds = service.get("rounds_captures_per_s") or []
    return f" ({', '.join(_f(x) for x in rounds)})" if len(rounds) > 1 else ""


def markdown(report: dict[str, Any]) -> str:
    out = io.StringIO()
    m = report.get("machine", {})
    out.write(f"# payrace bench {report['run_id']}\n\n")
    out.write(f"`{report['command']}` · {_f(report.get('database'))}\n\n")
    out.write(f"Machine: `{json.dumps(m)}`; load average before {report['load_average_before']}")
    out.write(f", after {report.get('load_average_after')}\n\n")
    out.write("## Ceiling (pgbench) and the service over HTTP\n\n")
    out.write("| strategy | ceiling captures/s, median (clients; each run in order) | workers "
              "| service captures/s, median (each round) | ratio "
              "| p50 / p99 ms | lock p50 / p99 ms | hold p50 / p99 ms | load generator % of a core "
              "| service peak MiB |\n|---|---|---|---|---|---|---|---|---|---|\n")  # fmt: skip
    for strategy, by_workers in report["service"].items():
        c = report["ceiling"].get(strategy, {})
        for w, r in by_workers.items():
            ratio = report["ratio"].get(strategy, {}).get(w)
            out.write(
                f"| {strategy} | {_f(c.get('captures_per_s'))} ({_f(c.get('clients'))}; "
                f"{' → '.join(str(x) for x in c.get('runs', []))}) | {w} "
                f"| {_f(r.get('captures_per_s'))}{_others(r)} | {_f(ratio)} "
                f"| {_f(r.get('request_p50_ms'))} / {_f(r.get('request_p99_ms'))} "
                f"| {_f(r.get('lock_p50_ms'))} / {_f(r.get('lock_p99_ms'))} "
                f"| {_f(r.get('hold_p50_ms'))} / {_f(r.get('hold_p99_ms'))} "
                f"| {_f(r.get('loadgen_core_percent'))} | {_f(r.get('service_peak_rss_mib'))} |\n"
            )
    stacks = report.get("stacks") or {}
    if stacks:
        out.write(
            f"\nBefore / after ({stacks['strategy']}): {stacks['before']} → {stacks['after']}\n\n"
            "| workers | before captures/s (ratio) | after captures/s (ratio) |\n|---|---|---|\n"
        )
        for w, row in stacks["workers"].items():
            out.write(
                f"| {w} | {_f(row.get('before_captures_per_s'))} ({_f(row.get('before_ratio'))}) "
                f"| {_f(row.get('after_captures_per_s'))} ({_f(row.get('after_ratio'))}) |\n"
            )
    out.write("\nCPU share of the machine during each service run (%):\n\n")
    for strategy, by_workers in report["service"].items():
        for w, r in by_workers.items():
            groups = (r.get("cpu") or {}).get("groups", {})
            shares = ", ".join(f"{g} {v['percent_of_machine']}" for g, v in groups.items())
            pool = r.get("pool_per_worker")
            split = r.get("connections_per_worker") or []
            spread = f", connections {' / '.join(map(str, split))}" if split else ""
            out.write(
                f"- {strategy}, {w} worker(s), pool {_f(pool)} per worker{spread}: {shares}\n"
            )
    h = report["harness"]
    out.write("\n## The harness\n\n| figure | value |\n|---|---|\n")
    out.write(f"| forced trials/s | {_f(h['forced']['trials_per_s'])} |\n")
    out.write(f"| aligned trials/s | {_f(h['aligned']['trials_per_s'])} |\n")
    out.write(f"| explorer schedules/s | {_f(h['explore']['schedules_per_s'])} |\n")
    cold = h["cold_run"]
    out.write(f"| cold `{cold['command']}` s | {_f(cold['wall_s'])} |\n")
    inst = h["instrumentation"]
    out.write(
        f"| lock-wait instrumentation µs/request (% of p50) | "
        f"{_f(inst['cost_us_per_request'])} ({_f(inst['percent_of_p50'])} %) |\n"
    )
    peaks = [h[k]["payrace_peak_rss_mib"] for k in ("forced", "aligned", "explore")]
    out.write(f"| payrace peak RSS MiB (forced, aligned, explore, cold) | {peaks}, "
              f"{cold['payrace_peak_rss_mib']} |\n")  # fmt: skip
    load = report["load"]
    groups = (load.get("cpu") or {}).get("groups", {})
    shares = ", ".join(f"{g} {v.get('percent_of_machine')}" for g, v in groups.items())
    out.write(f"\n## `{load['command']}`\n\nCPU share of the machine (%): {shares or '—'}\n")
    out.write(f"\nTotal {report['duration_s']} s.\n")
    return out.getvalue()
