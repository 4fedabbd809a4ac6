"""The gate a Locust run ends with: the master's (or a single Locust process's) side.

    WorkerTotals     per worker on the master: requests, failures, payments, reports
    LoadRun          the master's merge of every tally; prepare() installs the oracle and takes
                     the baseline, finish() settles, observes, checks, judges the gates
                     (PAYRACE_GATES, model.gates, on the run's measured figures), writes the
                     summary
    settle_deadlocks()   no_deadlock on a reading taken after the service stopped (payrace load)
    wait_quiet()     until the target's transactions are done, before the oracle looks

What every Locust process needs (LoadSettings, LoadTally) is load.worker, light enough for a
load machine with only Locust installed; this module is imported on the master only.

How the parts talk: PAYRACE_* variables -> locustfiles/_payrace.py, whose event listeners feed
a LoadTally per process, ship it to the master in Locust's own worker reports, merge it into a
LoadRun there and call LoadRun.finish() at `quitting`. The same locustfiles run without
`payrace load` (distributed Locust against an external PostgreSQL) when the variables are set
by hand; see locustfiles/README.md. harness.load.launch starts the stack and Locust around this.

A setup mistake (model.profile.Profile.setup_mistake, or the create-order reply that names no
payment) ends the run early with exit 2 and the message naming the fix: it is not the
target's bug, and no payment of such a run was raced.

The gate judges what the database and the gateway saw, not what Locust saw: the oracle's
audit rows (a second transaction writing captured is a double capture even when the final
state looks right) and the fake gateway's capture counters. The one thing it takes from the
load side is the target's own 5xx answers (no_5xx: a crash under load fails the run too).
The deadlock counter decides once its reading has settled (see GATE_CHECKERS). Locust's
failure counts are reported beside the verdict but do not decide it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg

from payrace.harness.errors import UsageError
from payrace.harness.gateway.controls import RemoteGateway
from payrace.harness.infra.machine import machine
from payrace.harness.load.worker import (
    ENV_GATEWAY_URL,
    ENV_TARGET_DSN,
    SPREAD,
    LoadSettings,
    keep,
    keep_setup_error,
)
from payrace.harness.model import checker, deadlocks, oracle, watched
from payrace.harness.model.gates import Baseline, Gate, judge_gates
from payrace.harness.model.history import Operation
from payrace.harness.model.judge import Judgement, judge
from payrace.harness.model.stats import PathHistograms
from payrace.harness.model.verdict import DECLARED, EXIT_ERROR, overall
from payrace.harness.reports.writers import write_all

# The invariants the gate decides on. no_5xx reads the target's 5xx answers, which every
# Locust process ships to the master (a crash under load fails the run like a double
# capture). error_classes reads a full history, which a load run does not keep (Locust's
# failure table is the load run's error classes). no_deadlock joins when its reading is
# decisive: a zero delta cannot settle while the service's pool is open (harness.model.oracle), so
# payrace load reads it again once it has stopped the service (settle_deadlocks).
GATE_CHECKERS: tuple[checker.Checker, ...] = (
    checker.single_capture_write,
    checker.single_invoice_paid,
    checker.single_order_paid,
    checker.gateway_capture_once,
    checker.no_lost_capture,
    checker.no_5xx,
)
_QUIET_POLLS = 3  # consecutive quiet readings of pg_stat_activity before the oracle looks


@dataclass
class WorkerTotals:
    pid: int
    host: str
    requests: int = 0
    failures: int = 0
    payments: int = 0
    reports: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "host": self.host,
            "requests": self.requests,
            "failures": self.failures,
            "payments": self.payments,
            "reports": self.reports,
        }


@dataclass
class LoadRun:
    """The master's view: every worker's tallies merged, then judged once at the end."""

    settings: LoadSettings
    hist: PathHistograms = field(default_factory=PathHistograms)
    workers: dict[str, WorkerTotals] = field(default_factory=dict)
    payments: dict[int, str | None] = field(default_factory=dict)
    confirmed: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    answered: int = 0
    server_errors: int = 0
    crashes: int = 0
    server_error_examples: list[list[Any]] = field(default_factory=list)
    setup_errors: list[str] = field(default_factory=list)
    conflicts: int = 0  # 409 answers; Locust's users do not send them again
    serialization_failures: int = 0
    deadlocks_retried: int = 0
    baseline: oracle.Baseline | None = None
    problems: list[str] = field(default_factory=list)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.perf_counter)

    def absorb(self, client_id: str, data: Mapping[str, Any]) -> None:
        totals = self.workers.get(client_id)
        if totals is None:
            totals = self.workers[client_id] = WorkerTotals(int(data["pid"]), str(data["host"]))
        totals.requests += int(data["requests"])
        totals.failures += int(data["failures"])
        totals.payments += len(data["payments"])
        totals.reports += 1
        for payment_id, gateway_payment_id in data["payments"]:
            self.payments[int(payment_id)] = gateway_payment_id
        for payment_id, f, event in data["confirmed"]:
            self.confirmed.setdefault(int(payment_id), (str(f), event))
        # .get: a worker running an older locustfile sends no answers; the gate still works.
        self.answered += int(data.get("answered", 0))
        self.server_errors += int(data.get("server_errors", 0))
        self.crashes += int(data.get("crashes", 0))
        for f, status, code, payment_id in data.get("server_error_examples", []):
            pid = None if payment_id is None else int(payment_id)
            keep(self.server_error_examples, [str(f), int(status), code, pid])
        self.conflicts += int(data.get("conflicts", 0))
        self.serialization_failures += int(data.get("serialization_failures", 0))
        self.deadlocks_retried += int(data.get("deadlocks_retried", 0))
        for message in data.get("setup_errors", []):
            keep_setup_error(self.setup_errors, str(message))
        self.hist.merge(PathHistograms.decode(data["hdr"]))

    def prepare(self) -> None:
        """Install the oracle if it is missing and take the baseline (master, before users)."""
        url = self.settings.database_url
        if url is None:
            self.problems.append(f"{ENV_TARGET_DSN} is not set: the database is not checked")
            return
        if not oracle.installed(url):
            oracle.install(url, self.settings.target_profile().oracle)
        self.baseline = oracle.baseline(url)

    def ops(self) -> list[Operation]:
        """The little history the checkers need: who owns which gateway payment, which
        payments the target confirmed as captured (no_lost_capture's evidence), and the
        target's 5xx answers (no_5xx's)."""
        out: list[Operation] = []

        def add(**fields: Any) -> None:
            out.append(Operation(index=len(out), trial=0, time=0, **fields))

        for payment_id, gateway_payment_id in sorted(self.payments.items()):
            if gateway_payment_id:
                value = {"gateway_payment_id": gateway_payment_id}
                add(type="invoke", f="authorize", process="locust", payment=payment_id, value=value)
        for payment_id, (f, event) in sorted(self.confirmed.items()):
            process = f"locust-{payment_id}"
            add(type="invoke", f=f, process=process, payment=payment_id, value={"event": event})
            done = {"status": "captured", "event": event}
            add(type="ok", f=f, process=process, payment=payment_id, value=done, status=200)
        for f, status, code, payment_id in self.server_error_examples:
            error = {"error": {"code": code}} if code else {}
            add(type="info", f=f, process="locust", payment=payment_id, value=error, status=status)
        return out

    def _no_5xx_in_full(self, result: checker.CheckResult) -> checker.CheckResult:
        """no_5xx saw the examples the workers kept; say what it stands for: every answer."""
        kept = len(self.server_error_examples)
        note = (
            f"{self.answered} answer(s) from the target, {self.server_errors} of them 5xx, "
            f"{self.crashes} crash(es)"
        )
        if self.server_errors > kept:
            note += f"; {kept} kept as examples"
        count = max(result.count, self.crashes)
        return replace(result, count=count, checked=self.answered, note=note)

    def finish(self, *, host: str, locust: Mapping[str, Any], window_s: float) -> dict[str, Any]:
        """Wait for the target to go quiet, observe, check, write the reports; the summary.

        A run that met a setup mistake is not judged: exit 2, the mistake first in problems."""
        strategy, expected = self._named(host)
        problems = [*self.setup_errors, *self.problems]
        result: dict[str, Any] = {
            "expected": expected,
            "valid": "unknown",
            "trials": len(self.payments),
            "violating_trials": 0,
            "duration_s": round(window_s, 3),
            "trials_per_second": round(len(self.payments) / window_s, 2) if window_s else 0.0,
            "captures": None,
            "captures_per_second": None,
            "checks": {},
            "first_violation": None,
            "conflicts": {
                "answered_409": self.conflicts,
                "retried": 0,
                "serialization_failures": self.serialization_failures,
                "deadlocks_retried": self.deadlocks_retried,
            },
            "gateway_capture_calls": None,
            **self._latency(),
        }
        url = self.settings.database_url
        if self.setup_errors:
            pass  # nothing was raced that a verdict could be about
        elif url is not None and self.baseline is not None:
            try:
                result.update(self._judge(url, self.baseline, window_s, problems))
            except (psycopg.Error, watched.OracleError, httpx.HTTPError, OSError) as exc:
                problems.append(f"the oracle could not judge the run: {type(exc).__name__}: {exc}")
        elif url is not None:
            problems.append("no oracle baseline was taken, so the run cannot be judged")
        gates: list[dict[str, Any]] = []
        try:
            wanted, baseline = self.settings.judged_gates()
        except UsageError as exc:
            keep_setup_error(self.setup_errors, str(exc))
            problems.insert(0, str(exc))
        else:
            gates = judge_gates(wanted, {strategy: result}, baseline)
        verdict, code = overall({strategy: result}, gates, unknown_exit=EXIT_ERROR)
        if self.setup_errors:
            verdict, code = "setup_error", EXIT_ERROR
        database = f"{ENV_TARGET_DSN} (set for Locust)"
        if self.settings.profile is not None:
            database = f"the target's own database ({ENV_TARGET_DSN}, --target-dsn)"
        summary = {
            "run_id": self.settings.run_id,
            "command": self.settings.command,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "duration_s": round(time.perf_counter() - self.started, 3),
            "machine": machine(),
            "database": {
                "route": "target" if self.settings.profile else "dsn",
                "describe": database,
            },
            "target": host,
            "mode": "load",
            "trials": len(self.payments),
            "strategies": {strategy: result},
            "locust": {
                **locust,
                "workers": {cid: w.to_json() for cid, w in sorted(self.workers.items())},
                "worker_count": len(self.workers),
            },
            "problems": problems,
            "setup_errors": list(self.setup_errors),
            "gates": gates,
            "verdict": verdict,
            "exit_code": code,
        }
        self.write(summary)
        return summary

    def _named(self, host: str) -> tuple[str, str | None]:
        """The run's name and what the target is declared to be: a profile names its target
        (and says valid unless told otherwise, as `payrace run` does); the reference service
        says its strategy on /healthz, which is declared (model.verdict)."""
        if self.settings.profile is not None:
            profile = self.settings.target_profile()
            return profile.name, self.settings.expect or profile.expect or "valid"
        strategy = _target_strategy(host)
        return strategy, self.settings.expect or DECLARED.get(strategy)

    def _latency(self) -> dict[str, Any]:
        latency, plots = self.hist.summary(), self.hist.plots()
        spread = latency.pop(SPREAD, {}).get("race")
        plots.pop(SPREAD, None)  # a spread is not a latency; summary.json has its own key
        return {"latency_ms": latency, "plots": plots, "arrival_spread_ms": spread}

    def _judge(
        self, url: str, since: oracle.Baseline, window_s: float, problems: list[str]
    ) -> dict[str, Any]:
        if not wait_quiet(url):
            problems.append("the target's transactions did not go quiet within 10 s")
        counters = None
        if self.settings.gateway_url:
            gateway = RemoteGateway(self.settings.gateway_url)
            try:
                counters = gateway.counters()
            finally:
                gateway.close()
        else:
            problems.append(f"{ENV_GATEWAY_URL} is not set: gateway captures are not counted")
        reconciliation = None
        if counters is not None and self.settings.gateway_url:
            reconciliation = self._await_reconciled(url, self.settings.gateway_url)
            gateway = RemoteGateway(self.settings.gateway_url)
            try:
                counters = gateway.counters()  # what the reconciliation changed
            finally:
                gateway.close()
        running_target = self.settings.profile is not None
        wait_s = self.settings.settle_timeout_s()
        # A running target's pool stays open, so its deadlock count takes ~11 s to settle
        # (model.deadlocks): read at once first, and waited for only when the verdict could
        # still be valid (as payrace run does); an explicit --settle-s waits always.
        early = running_target and self.settings.settle_s is None and wait_s > 0
        obs = oracle.observe(
            url,
            self.settings.target_profile().oracle,
            since=since,
            payment_ids=set(self.payments),
            gateway_counters=counters,
            gateway_payment_ids=[g for g in self.payments.values() if g],
            settle_timeout_s=0.0 if early else wait_s,
        )
        # The gateway's automatic capture comes just before its webhook; a run that ends
        # between the two (Locust stops its users mid-race) never told the target, so that
        # capture is no evidence against it. A webhook the target did answer "captured" is
        # in the confirmations (ops()); one it failed is a 5xx (no_5xx).
        obs = replace(obs, gateway_captured=frozenset())
        judged = self._checked(obs, running_target)
        if early and not obs.deadlocks_settled:
            violated = judged.verdict.valid is False
            obs = oracle.settled(url, since, obs, wait_s=wait_s, violated=violated)
            judged = self._checked(obs, running_target)
        verdict = judged.verdict
        captured = obs.config.payments.done_value
        captures = sum(1 for s in obs.payments.values() if s.status == captured)
        calls = None
        if counters is not None:
            per_payment = counters.get("captures", {})
            calls = sum(int(per_payment.get(g, 0)) for g in self.payments.values() if g)
        return {
            "valid": verdict.valid,
            "gateway_capture_calls": calls,
            "violating_trials": len(verdict.violating_payments),
            "captures": captures,
            "captures_per_second": round(captures / window_s, 2) if window_s else 0.0,
            "checks": judged.checks(),
            "deadlocks": {
                # counted / attributed / unattributed / why_unattributed: as payrace run's
                **judged.deadlock_summary(),
                "delta": obs.deadlocks,
                "settled": obs.deadlocks_settled,
                "baseline": since.to_json(),
            },
            "first_violation": judged.first_violation(),
            "reconciliation": reconciliation,
        }

    def _checked(self, obs: oracle.Observation, running_target: bool) -> Judgement:
        """The gate's checkers on `obs`. A positive deadlock delta is always a violation; a
        zero one only counts once it has settled, which it rarely has while the reference
        service's pool is still open (payrace load reads it again after stopping it:
        settle_deadlocks). A running target is never stopped by payrace, so its reading is
        the last: no_deadlock always joins, and says "unknown", naming the wait that would
        settle it, when it did not settle."""
        decisive = obs.deadlocks > 0 or obs.deadlocks_settled or running_target
        checkers = (*GATE_CHECKERS, checker.no_deadlock) if decisive else GATE_CHECKERS
        judged = judge(self.ops(), obs, checkers=checkers)
        verdict = judged.verdict
        if "no_5xx" in verdict.results:
            verdict.results["no_5xx"] = self._no_5xx_in_full(verdict.results["no_5xx"])
        return judged

    def _await_reconciled(self, url: str, gateway_url: str) -> dict[str, Any]:
        """As `payrace run` does (runner.reconcile): a capture the service asked the gateway
        for and whose answer it lost (40001 retries used up after the gateway said yes, a
        killed backend) is its reconciler's to record; it gets a bounded window to do so
        before the oracle judges. Only the service's own capture calls count here (the
        gateway's automatic capture is no evidence in a load run: _judge)."""
        from payrace.harness.runner.reconcile import (
            OWN_WINDOW_S,
            RUNNING_WINDOW_S,
            Waited,
            pending,
        )

        config = self.settings.target_profile().oracle
        done = config.payments.done_value
        payments = {p: g for p, g in self.payments.items() if g}
        waited = Waited(
            RUNNING_WINDOW_S if self.settings.profile is not None else OWN_WINDOW_S,
            "polling the target's database: its own reconciler",
            waited_for=(
                "payments whose capture the gateway accepted from the service that the "
                "target's database did not show captured, until none was left or the window "
                "closed"
            ),
        )
        gateway = RemoteGateway(gateway_url)

        def look() -> list[int]:
            accepted = {"accepted": gateway.counters().get("accepted", {})}
            return pending(payments, accepted, oracle.statuses(url, config, payments), done)

        started = time.monotonic()
        try:
            waited.pending_before = waited.pending_after = look()
            while waited.pending_after and time.monotonic() - started < waited.window_s:
                time.sleep(0.25)
                waited.pending_after = look()
        finally:
            gateway.close()
        waited.waited_s = time.monotonic() - started
        return waited.to_json()

    def write(self, summary: dict[str, Any]) -> None:
        out = self.settings.report_dir
        out.mkdir(parents=True, exist_ok=True)
        hdr = {
            kind: {
                path: {"summary": self.hist.get(kind, path).summary(), "hdr": text}
                for path, text in paths.items()
            }
            for kind, paths in self.hist.encode().items()
        }
        (out / "latency_hdr.json").write_text(json.dumps(hdr, indent=2) + "\n", encoding="utf-8")
        write_all(summary, out)


def settle_deadlocks(
    summary: dict[str, Any],
    delta: int,
    settled: bool,
    note: str,
    *,
    gates: Sequence[Gate] = (),
    baseline: Baseline | None = None,
) -> None:
    """Judge no_deadlock on a reading taken after the target closed its pool, and update
    the verdict and exit code with it (payrace load does this once it stopped the service).
    The gates are judged again (the `violations` gate counts the deadlocks no trial was tied
    to); without them, the gates finish() judged stand.

    A reading that still did not settle changes nothing: the gate's own reading stands."""
    if not settled and delta <= 0:
        return
    for result in (summary.get("strategies") or {}).values():
        if not isinstance(result, dict) or "deadlocks" not in result:
            continue  # the gate never observed (no database): nothing to compare with
        obs = oracle.Observation(
            audit=(),
            payments={},
            gateway_captures={},
            gateway_accepted={},
            deadlocks=delta,
            config=watched.OracleConfig.reference(),
            deadlocks_settled=settled,
            deadlock_note=note,
        )
        # The gate's own reading tied `attributed` (40P01 replies) to payments; Locust runs no
        # lock sampler, so the rest of the counter stays untied.
        untied = max(delta - int(result["deadlocks"].get("attributed") or 0), 0)
        result["deadlocks"].update(
            delta=delta,
            counted=delta,
            settled=settled,
            read="after the service stopped",
            unattributed=untied,
            why_unattributed=(
                f"{untied} counted by pg_stat_database while no lock sampler watched the "
                "database's wait-for cycles, and no reply named 40P01"
                if untied
                else ""
            ),
        )
        result.setdefault("checks", {})["no_deadlock"] = checker.no_deadlock([], obs).to_json()
        checks = result["checks"].values()
        result["valid"] = checker.compose_validity(c.get("valid", "unknown") for c in checks)
    strategies = summary.get("strategies") or {}
    if gates:
        summary["gates"] = judge_gates(gates, strategies, baseline)
    summary["verdict"], summary["exit_code"] = overall(
        strategies, summary.get("gates") or [], unknown_exit=EXIT_ERROR
    )


def _target_strategy(host: str) -> str:
    """The reference service says its strategy on /healthz; any other target is 'target'."""
    try:
        body = httpx.get(f"{host.rstrip('/')}/healthz", timeout=5.0).json()
    except (httpx.HTTPError, ValueError):
        return "target"
    strategy = body.get("strategy") if isinstance(body, dict) else None
    return strategy if isinstance(strategy, str) else "target"


def wait_quiet(url: str, timeout_s: float = 10.0) -> bool:
    """Wait until no client backend of the target is inside a statement or transaction.

    Locust kills its users mid-request when the run ends, but the service finishes what it
    already received; observing before those captures commit would judge a half-done run.
    """
    deadline = time.monotonic() + timeout_s
    quiet = 0
    with psycopg.connect(url, autocommit=True, application_name="payrace-load") as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
                "AND coalesce(application_name, '') NOT LIKE %s "
                "AND state IS DISTINCT FROM 'idle'",
                (deadlocks.HARNESS_APPLICATION_PREFIX + "%",),
            ).fetchone()
            quiet = quiet + 1 if row is not None and row[0] == 0 else 0
            if quiet >= _QUIET_POLLS:
                return True
            time.sleep(0.1)
    return False
