"""Who breaks things: faults injected while a strategy's trials run (Jepsen's nemesis).

    FAULTS          the registry: fault name -> what its parameter means, the range it must
                    lie in, an example value and what the run must own for it (`needs`); the
                    one list of nemeses (`run --help`, the README and `make chaos` read it)
    described()     every fault's form, meaning and range, one wrapped line each (`run --help`)
    Fault           one parsed `name:parameter`
    parse_spec()    "gateway-errors:0.2,gateway-latency:50,kill-backends:0.5" -> [Fault];
                    a bad spec raises NemesisSpecError naming the valid forms
    unfit()         why a fault cannot run against this target (payrace does not own the
                    server or the process it would restart), or None: exit 2 before any work
    (the gateway's knobs are turned through harness.gateway.controls.GatewayControl:
    LocalGateway for an in-process fake, RemoteGateway for one in another process)
    Nemesis         async context manager: faults on at enter; at exit the killer stops and the
                    knobs are restored; report() says what was injected
    BackendKiller   every SECONDS, pg_terminate_backend() of one seeded-random client backend of
                    the target's database that is inside a transaction ('idle in transaction',
                    or 'active' holding an xid / snapshot), never a `payrace-…` connection
    Timeouts        lock_timeout / statement_timeout set on the target's database for the run
                    (ALTER DATABASE ... SET, reset after); its idle pooled connections are
                    terminated so the pool reopens them with the setting
    Restarter       every SECONDS, stop something payrace started and start it again: the
                    embedded PostgreSQL (Restartable: infra.provider.Cluster) or the service's
                    uvicorn process, killed with SIGKILL (infra.processes.ServiceProcess);
                    steady() lets a new trial start only while it is up
    CaptureKiller   the fake gateway's after-capture hook: at RATE, once it has captured and
                    before it answers, the target's backends idle in a transaction (the one
                    that asked, waiting for this answer, among them) are terminated

Every fault is an operation in the history (process "nemesis", f "nemesis", type info, as
Jepsen records its nemesis): its start and stop, each backend killed with its pid, each
failure the gateway injects (with a fake in this process; a remote one's counted, at the
end), each restart (down, then up with how long it was down), each capture whose
transaction was killed. gateway-latency and the timeouts are settings: start and stop.

Faults:
    gateway-errors:RATE     captures fail with a 502/503 at this rate (0..1), seeded by the fake
    gateway-latency:MS      every capture at the gateway takes this much longer
    gateway-timeout:RATE    captures the gateway performs, then answers 504 (the answer lost):
                            the money is taken and the caller does not know
    kill-backends:SECONDS   one backend killed this often: a transaction dies mid-flight, which
                            is what a crashed worker, a failover or an operator's kill look like
    lock-timeout:MS         a lock waited for longer than this aborts the statement (55P03)
    statement-timeout:MS    a statement running longer than this is cancelled (57014)
    restart-postgres:SECONDS  the PostgreSQL payrace started is stopped (fast shutdown) and
                            started again this often: every connection dies, new ones are
                            refused until it is back; the service answers 503, never 500
    restart-service:SECONDS the service process payrace started (--target http) is killed with
                            SIGKILL and started again this often: requests in flight end with
                            no answer (`info`: outcome unknown), a capture the gateway took is
                            left to the capture intent and the reconciler
    kill-after-capture:RATE at this rate the gateway captures, then, before it answers, the
                            target's backends idle in a transaction are terminated: the one
                            waiting for this answer dies before COMMIT (others idle in one at
                            that instant die too, as in a failover)

A killed transaction wrote nothing (PostgreSQL rolls it back with its backend), so the
invariants must hold as before; the target may answer a 503 it chose, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol

import asyncpg
import psycopg

from payrace.harness.gateway.controls import GatewayControl, LocalGateway
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.model.history import History
from payrace.harness.model.lockwatch import CONNECTION_LOST

# Harness connections name themselves `payrace-…` (oracle.py); killing one would break the
# observer, not the system under test.
HARNESS_PREFIX = "payrace-"
APPLICATION_NAME = "payrace-nemesis"


# What a fault acts on, and so what the run must give it: the fake gateway payrace drives
# (in this process or not), the target's database (any), or what payrace itself started and
# may therefore restart or reach into: the embedded PostgreSQL, the service's process, the
# fake gateway in this process.
Needs = Literal["gateway", "database", "own-postgres", "own-service", "own-gateway"]


@dataclass(frozen=True)
class _Param:
    unit: str
    low: float
    high: float
    meaning: str
    example: float  # a value worth running (a chaos campaign's default)
    needs: Needs


FAULTS: dict[str, _Param] = {
    "gateway-errors": _Param(
        "RATE", 0.0, 1.0, "fraction of gateway captures failed", 0.2, "gateway"
    ),
    "gateway-latency": _Param(
        "MS", 0.0, 60_000.0, "ms added to each gateway capture", 50, "gateway"
    ),
    "gateway-timeout": _Param(
        "RATE", 0.0, 1.0, "fraction of gateway captures made, then answered 504", 0.1, "gateway"
    ),
    "kill-backends": _Param(
        "SECONDS", 0.01, 3_600.0, "kill one backend in a transaction this often", 0.5, "database"
    ),
    "lock-timeout": _Param(
        "MS", 1.0, 600_000.0, "the target database's lock_timeout", 50, "database"
    ),
    "statement-timeout": _Param(
        "MS", 1.0, 600_000.0, "the target database's statement_timeout", 200, "database"
    ),
    "restart-postgres": _Param(
        "SECONDS",
        0.5,
        3_600.0,
        "restart the PostgreSQL payrace started this often",
        2,
        "own-postgres",
    ),
    "restart-service": _Param(
        "SECONDS",
        0.5,
        3_600.0,
        "kill -9 and restart the service payrace started this often",
        3,
        "own-service",
    ),
    "kill-after-capture": _Param(
        "RATE",
        0.0,
        1.0,
        "fraction of captures whose transaction is killed before COMMIT",
        0.2,
        "own-gateway",
    ),
}

# Why a fault needs what it needs, said when the run cannot give it (unfit()).
_OWNER_OF = {
    "own-postgres": "restarts the PostgreSQL server payrace starts itself (embedded)",
    "own-service": "kills and restarts the service process payrace starts (--target http)",
    "own-gateway": "reaches into the fake gateway payrace runs in its own process",
}


def described(width: int = 78) -> list[str]:
    """Each fault as `name:UNIT  meaning (low..high)`, wrapped to `width`: `run --help`."""
    lines: list[str] = []
    for name, p in FAULTS.items():
        head = f"  {name}:{p.unit}"
        text = f"{p.meaning} ({p.low:g}..{p.high:g})"
        lines += textwrap.wrap(
            text, width, initial_indent=head.ljust(27) if len(head) < 27 else head + " ",
            subsequent_indent=" " * 27,
        )  # fmt: skip
    return lines


class NemesisSpecError(ValueError):
    """The spec cannot work; the message lists the valid forms."""


def _forms() -> str:
    return "; ".join(
        f"{name}:{p.unit} ({p.meaning}, {p.low:g}..{p.high:g})" for name, p in FAULTS.items()
    )


@dataclass(frozen=True)
class Fault:
    name: str
    value: float

    def __str__(self) -> str:
        return f"{self.name}:{self.value:g}"


def parse_spec(spec: str) -> list[Fault]:
    """`fault:parameter[,fault:parameter...]`, each fault at most once."""
    faults: list[Fault] = []
    parts = [p.strip() for p in spec.split(",")]
    if not any(parts):
        raise NemesisSpecError(f"--nemesis is empty; use one or more of: {_forms()}")
    for part in parts:
        name, sep, raw = (s.strip() for s in part.partition(":"))
        param = FAULTS.get(name)
        if param is None or not sep:
            what = f"unknown fault {name!r}" if param is None else f"{name} needs a parameter"
            raise NemesisSpecError(f"--nemesis {part!r}: {what}; use {_forms()}")
        try:
            value = float(raw)
        except ValueError:
            raise NemesisSpecError(
                f"--nemesis {part!r}: {raw!r} is not a number; use {name}:{param.unit} "
                f"({param.meaning}, {param.low:g}..{param.high:g})"
            ) from None
        if not param.low <= value <= param.high:
            raise NemesisSpecError(
                f"--nemesis {part!r}: {param.unit} must be within {param.low:g}..{param.high:g} "
                f"({param.meaning})"
            )
        if any(f.name == name for f in faults):
            raise NemesisSpecError(f"--nemesis names {name} twice; give each fault once")
        faults.append(Fault(name, value))
    return faults


def unfit(faults: list[Fault], *, target: str, external: bool, dsn: str | None) -> str | None:
    """Why one of `faults` cannot act on this run, naming the fix; None when all can.
    `target` is inproc, http or a URL; `external` a running target payrace did not start;
    `dsn` a server the user named (--dsn / PAYRACE_DSN), which payrace does not own."""
    for fault in faults:
        needs = FAULTS[fault.name].needs
        if needs not in _OWNER_OF:
            continue
        does = f"--nemesis {fault.name} {_OWNER_OF[needs]}"
        if external:
            return (
                f"{does}; payrace did not start this target (--target URL, --target-dsn, "
                f"--gateway-url): leave {fault.name} out, or race the reference service"
            )
        if needs == "own-postgres" and dsn:
            return (
                f"{does}; --dsn (or PAYRACE_DSN) names a server payrace does not own: leave "
                f"--dsn out so payrace starts its own, or leave {fault.name} out"
            )
        if needs == "own-service" and target != "http":
            return (
                f"{does}; --target {target} runs the service inside payrace's own process: "
                "use --target http"
            )
    return None


# Client backends of this database inside a transaction: idle in one (a request held between
# statements, waiting on the gateway), or running a statement with an xid or a snapshot.
CANDIDATES = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_type = 'client backend'
  AND coalesce(application_name, '') NOT LIKE $1
  AND (state IN ('idle in transaction', 'idle in transaction (aborted)')
       OR (state = 'active' AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)))
ORDER BY pid
"""
# Re-checked in the statement that kills: a backend that committed meanwhile is left alone.
KILL = """
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
WHERE pid = $1 AND state IS DISTINCT FROM 'idle'
  AND coalesce(application_name, '') NOT LIKE $2
"""


class BackendKiller:
    """Every `interval_s`, terminate one random in-transaction backend of `dsn`'s database."""

    def __init__(
        self,
        dsn: str,
        interval_s: float,
        rng: random.Random,
        on_kill: Callable[[int], None] = lambda pid: None,
    ) -> None:
        self.dsn = dsn
        self.on_kill = on_kill
        self.interval_s = interval_s
        self.rng = rng
        self.killed = 0
        self.idle_ticks = 0  # ticks that found no backend inside a transaction
        self.lost_connections = 0  # times the killer's own connection was lost
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None

    async def _connect(self) -> Any:
        return await asyncpg.connect(
            self.dsn, server_settings={"application_name": APPLICATION_NAME}, timeout=5
        )

    async def start(self) -> None:
        self._conn = await self._connect()
        self._task = asyncio.create_task(self._loop())

    async def tick(self) -> int | None:
        """Kill one candidate now; its pid, or None when there was none (or it just left)."""
        pids = [int(r["pid"]) for r in await self._conn.fetch(CANDIDATES, HARNESS_PREFIX + "%")]
        if not pids:
            self.idle_ticks += 1
            return None
        pid = self.rng.choice(pids)
        if not await self._conn.fetchval(KILL, pid, HARNESS_PREFIX + "%"):
            self.idle_ticks += 1
            return None
        self.killed += 1
        self.on_kill(pid)
        return pid

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except CONNECTION_LOST:
                # The database restarted (or another fault took this connection): the killer
                # carries on with a new one at the next tick, as a real operator would.
                self.lost_connections += 1
                with contextlib.suppress(Exception):
                    self._conn.terminate()
                with contextlib.suppress(*CONNECTION_LOST):
                    self._conn = await self._connect()

    async def stop(self) -> None:
        """Stop killing; a failure of the killer itself is raised here, not swallowed."""
        try:
            if self._task is not None:
                if self._task.done():
                    self._task.result()
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        finally:
            if self._conn is not None:
                try:
                    await self._conn.close(timeout=2)
                except Exception:  # lost with the server: nothing to close politely
                    self._conn.terminate()


# Idle client backends of the target: its pool's connections, reopened with the new settings.
_KILL_IDLE = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_type = 'client backend' AND state = 'idle'
  AND coalesce(application_name, '') NOT LIKE $1
"""


class Timeouts:
    """lock_timeout / statement_timeout on the target's database while the trials run."""

    def __init__(self, dsn: str, settings: dict[str, float]) -> None:
        self.dsn = dsn
        self.settings = settings  # GUC name -> milliseconds
        self.reopened = 0  # idle pooled connections terminated so they pick the settings up
        self._database: str | None = None

    async def start(self) -> None:
        conn = await asyncpg.connect(
            self.dsn, server_settings={"application_name": APPLICATION_NAME}, timeout=5
        )
        try:
            self._database = str(await conn.fetchval("SELECT current_database()"))
            ident = _ident(self._database)
            for name, ms in self.settings.items():
                await conn.execute(f"ALTER DATABASE {ident} SET {name} = {int(ms)}")
            self.reopened = int(await conn.fetchval(_KILL_IDLE, HARNESS_PREFIX + "%"))
        finally:
            await conn.close()

    async def stop(self) -> None:
        if self._database is None:
            return
        conn = await asyncpg.connect(
            self.dsn, server_settings={"application_name": APPLICATION_NAME}, timeout=5
        )
        try:
            for name in self.settings:
                await conn.execute(f"ALTER DATABASE {_ident(self._database)} RESET {name}")
        finally:
            await conn.close()


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Restartable(Protocol):
    """Something payrace started and can stop and start again (blocking calls, run in a
    thread): infra.provider.Cluster, infra.processes.ServiceProcess."""

    def halt(self) -> None: ...

    def resume(self) -> None: ...


# How long a restarted part stays down: long enough that requests meet the outage (the
# service's 503s, the harness's reconnects), short enough for a run of a few seconds.
DOWN_S = 0.5


class Restarter:
    """Every `interval_s`: halt, stay down DOWN_S, resume; each one two operations in the
    history (down; up, with how long it was down). A restart under way when the run ends is
    finished first, so nothing payrace started is left stopped."""

    def __init__(
        self,
        fault: str,
        interval_s: float,
        part: Restartable,
        record: Callable[[dict[str, Any]], None],
    ) -> None:
        self.fault = fault
        self.interval_s = interval_s
        self.part = part
        self.record = record
        self.restarts = 0
        self.down_s: list[float] = []
        self._up = asyncio.Event()
        self._up.set()
        self._task: asyncio.Task[None] | None = None
        self._current: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def steady(self) -> None:
        """Return once the part is up (at once when no restart is under way)."""
        await self._up.wait()

    async def restart_once(self) -> None:
        self._up.clear()
        self.record({"fault": self.fault, "action": "down"})
        started = time.monotonic()
        try:
            try:
                await asyncio.to_thread(self.part.halt)
                await asyncio.sleep(DOWN_S)
            finally:
                await asyncio.to_thread(self.part.resume)
        except Exception as exc:
            # The run cannot go on without the part: an infrastructure error (exit 2), named.
            raise RuntimeError(f"{self.fault} could not restart it: {type(exc).__name__}: "
                               f"{exc}") from exc  # fmt: skip
        finally:
            self._up.set()
        down = round(time.monotonic() - started, 3)
        self.restarts += 1
        self.down_s.append(down)
        self.record({"fault": self.fault, "action": "up", "down_s": down})

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._current = asyncio.ensure_future(self.restart_once())
            # Shielded: the run ending (this task cancelled) must not leave the part down.
            await asyncio.shield(self._current)

    async def stop(self) -> None:
        """Stop restarting; a restart under way is finished, and its failure raised here."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._current is not None:
            await self._current

    def report(self) -> dict[str, Any]:
        return {
            "count": self.restarts,
            "down_s_max": max(self.down_s, default=0.0),
        }


# The target's client backends idle inside a transaction: the one waiting for the gateway's
# answer is one of them (the capture path holds its transaction open across the call).
_KILL_IDLE_IN_TRANSACTION = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_type = 'client backend' AND state = 'idle in transaction'
  AND coalesce(application_name, '') NOT LIKE %s
  AND pg_terminate_backend(pid)
"""


class CaptureKiller:
    """The fake gateway's after-capture hook (gateway.fake.FakeRazorpay.after_capture): at
    `rate` (seeded), the capture is made and, before the answer leaves, the target's
    transactions waiting on it die: the gateway has the money, the database never commits."""

    def __init__(
        self,
        dsn: str,
        rate: float,
        rng: random.Random,
        record: Callable[[dict[str, Any]], None],
    ) -> None:
        self.dsn = dsn
        self.rate = rate
        self.rng = rng
        self.record = record
        self.captures = 0  # captures whose waiting transaction was killed
        self.killed = 0  # backends terminated in all
        self.missed = 0  # drawn, but no backend was waiting (or the database was down)
        self._draw = threading.Lock()  # the gateway's worker threads call it concurrently

    def __call__(self, gateway_payment_id: str) -> None:
        """Runs in a worker thread of the gateway's server, the answer held until it returns."""
        with self._draw:
            if self.rng.random() >= self.rate:
                return
        try:
            with psycopg.connect(
                self.dsn, application_name=APPLICATION_NAME, autocommit=True, connect_timeout=5
            ) as conn:
                pids = sorted(int(r[0]) for r in conn.execute(
                    _KILL_IDLE_IN_TRANSACTION, (HARNESS_PREFIX + "%",)
                ))  # fmt: skip
        except psycopg.Error:
            pids = []  # the database is down (another fault): nothing waits on it anyway
        if not pids:
            with self._draw:
                self.missed += 1
            return
        with self._draw:
            self.captures += 1
            self.killed += len(pids)
        self.record(
            {"fault": "kill-after-capture", "action": "kill", "gateway_payment": gateway_payment_id,
             "pids": pids}
        )  # fmt: skip


class Nemesis:
    """The faults of a spec, on for the duration of an `async with` block; each one an
    operation in `history` when one is given."""

    def __init__(
        self,
        faults: list[Fault],
        *,
        gateway: GatewayControl | None = None,
        dsn: str | None = None,
        seed: int = 0,
        history: History | None = None,
        cluster: Restartable | None = None,
        service: Restartable | None = None,
    ) -> None:
        """`cluster`: the PostgreSQL payrace started; `service`: the service process it
        started; each None when payrace does not own one (unfit() has said so to the user)."""
        self.faults = faults
        self.history = history
        by_name = {f.name: f.value for f in faults}
        self._fail_rate = by_name.get("gateway-errors")
        self._latency_ms = by_name.get("gateway-latency")
        self._timeout_rate = by_name.get("gateway-timeout")
        self._kill_every = by_name.get("kill-backends")
        gateway_faults = any(
            v is not None for v in (self._fail_rate, self._latency_ms, self._timeout_rate)
        )
        if gateway_faults and gateway is None:
            raise ValueError("gateway faults need the fake gateway")
        if self._kill_every is not None and dsn is None:
            raise ValueError("kill-backends needs the target's database (a DSN)")
        self._knobs = gateway if gateway is not None and gateway_faults else None
        self._killer = (
            BackendKiller(dsn, self._kill_every, random.Random(seed), self._killed)
            if dsn is not None and self._kill_every is not None
            else None
        )
        timeouts = {
            guc: by_name[name]
            for name, guc in (
                ("lock-timeout", "lock_timeout"),
                ("statement-timeout", "statement_timeout"),
            )
            if name in by_name
        }
        if timeouts and dsn is None:
            raise ValueError("lock-timeout / statement-timeout need the target's database")
        self._timeouts = Timeouts(dsn, timeouts) if dsn is not None and timeouts else None
        self._restarters: list[Restarter] = []
        for name, part in (("restart-postgres", cluster), ("restart-service", service)):
            if name in by_name:
                if part is None:
                    raise ValueError(f"{name} needs what it restarts, started by payrace")
                self._restarters.append(Restarter(name, by_name[name], part, self._record))
        self._capture_killer: CaptureKiller | None = None
        self._hooked: FakeRazorpay | None = None
        if "kill-after-capture" in by_name:
            if not isinstance(gateway, LocalGateway) or dsn is None:
                raise ValueError("kill-after-capture needs the fake gateway in this process")
            self._hooked = gateway.fake
            self._capture_killer = CaptureKiller(
                dsn, by_name["kill-after-capture"], random.Random(seed + 1), self._record
            )
        # Each failure the gateway knobs inject is an operation, when the fake is in this
        # process; a remote one's are counted at the end (one operation with the counts).
        failing = self._fail_rate is not None or self._timeout_rate is not None
        self._local_fake = gateway.fake if failing and isinstance(gateway, LocalGateway) else None
        self._saved: dict[str, float] | None = None
        self._injected_before = 0
        self._timed_out_before = 0
        self.gateway_errors_injected = 0
        self.gateway_timeouts_injected = 0

    @classmethod
    def from_spec(cls, spec: str | None, **kwargs: Any) -> Nemesis:
        return cls(parse_spec(spec) if spec else [], **kwargs)

    def _injected(self, counter: str = "injected") -> int:
        assert self._knobs is not None
        return sum(self._knobs.counters().get(counter, {}).values())

    def _record(self, value: dict[str, Any]) -> None:
        """One fault as an operation of the history: invoked and done at once, `info` (it
        happened to the system, it is not a request with an outcome)."""
        if self.history is None:
            return
        op = self.history.invoke("nemesis", "nemesis", -1, None, value)
        self.history.complete(op, "info", value=value)

    def _injected_fault(self, fault: str, gateway_payment: str, status: int) -> None:
        action = "fail" if fault == "gateway-errors" else "capture, then lose the answer"
        self._record(
            {"fault": fault, "action": action, "gateway_payment": gateway_payment,
             "status": status}
        )  # fmt: skip

    def _killed(self, pid: int) -> None:
        self._record({"fault": "kill-backends", "action": "kill", "pid": pid})

    async def __aenter__(self) -> Nemesis:
        for fault in self.faults:
            self._record({"fault": str(fault), "action": "start"})
        if self._timeouts is not None:
            await self._timeouts.start()
        if self._knobs is not None:
            self._saved = await asyncio.to_thread(self._knobs.knobs)
            self._injected_before = await asyncio.to_thread(self._injected)
            self._timed_out_before = await asyncio.to_thread(self._injected, "timed_out")
            latency = None if self._latency_ms is None else self._latency_ms / 1000
            await asyncio.to_thread(
                self._knobs.set_knobs,
                fail_rate=self._fail_rate,
                capture_latency_s=latency,
                timeout_rate=self._timeout_rate,
            )
        if self._killer is not None:
            try:
                await self._killer.start()
            except BaseException:
                await self._restore()
                raise
        if self._hooked is not None and self._capture_killer is not None:
            self._hooked.add_after_capture(self._capture_killer)
        if self._local_fake is not None:
            self._local_fake.add_on_fault(self._injected_fault)
        for restarter in self._restarters:
            await restarter.start()
        return self

    async def steady(self) -> None:
        """Return once nothing this nemesis restarts is down: a new trial starts against a
        target that is up (the trials in flight meet the outage)."""
        for restarter in self._restarters:
            await restarter.steady()

    async def _restore(self) -> None:
        if self._knobs is None or self._saved is None:
            return
        knobs, saved = self._knobs, self._saved
        self._saved = None
        await asyncio.to_thread(knobs.set_knobs, **saved)
        self.gateway_errors_injected = await asyncio.to_thread(self._injected)
        self.gateway_errors_injected -= self._injected_before
        timed_out = await asyncio.to_thread(self._injected, "timed_out")
        self.gateway_timeouts_injected = timed_out - self._timed_out_before
        if self._local_fake is None and (
            self.gateway_errors_injected or self.gateway_timeouts_injected
        ):
            # A gateway in another process: its failures, counted, as one operation.
            self._record(
                {"fault": "gateway", "action": "injected",
                 "gateway_errors": self.gateway_errors_injected,
                 "gateway_timeouts": self.gateway_timeouts_injected}
            )  # fmt: skip

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            try:
                await asyncio.gather(*(r.stop() for r in self._restarters))
            finally:
                if self._hooked is not None and self._capture_killer is not None:
                    self._hooked.remove_after_capture(self._capture_killer)
                if self._local_fake is not None:
                    self._local_fake.remove_on_fault(self._injected_fault)
                if self._killer is not None:
                    await self._killer.stop()
        finally:
            try:
                await self._restore()
            finally:
                if self._timeouts is not None:
                    await self._timeouts.stop()
                for fault in self.faults:
                    self._record({"fault": str(fault), "action": "stop"})

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "faults": [str(f) for f in self.faults],
            "gateway_errors_injected": self.gateway_errors_injected,
            "gateway_timeouts_injected": self.gateway_timeouts_injected,
            "backends_killed": self._killer.killed if self._killer else 0,
        }
        if self._killer is not None:
            report["kill_ticks_without_target"] = self._killer.idle_ticks
        if self._timeouts is not None:
            report["timeouts"] = {k: int(v) for k, v in self._timeouts.settings.items()}
            report["pooled_connections_reopened"] = self._timeouts.reopened
        if self._restarters:
            report["restarts"] = {r.fault: r.report() for r in self._restarters}
        if self._capture_killer is not None:
            report["captures_killed_before_commit"] = self._capture_killer.captures
            report["backends_killed_after_capture"] = self._capture_killer.killed
            report["capture_kills_without_target"] = self._capture_killer.missed
        return report
