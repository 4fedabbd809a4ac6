"""Checkers: pure functions of (history, observation), in the style of Jepsen's bank test.

    Validity              True | False | "unknown"
    CheckResult           name, valid, count (violations), checked, first / worst / last, note
    Verdict               valid (composed), results by name, violating_payments
    compose()             false > unknown > true; compose_validity() of bare values
    check()               runs CHECKERS; a checker that raises is "unknown", its error in note
    CHECKERS
    ├── single_capture_write   audit: one transaction writes payments.status = captured
    ├── single_invoice_paid    audit: at most one paid write per invoice, one if captured
    ├── single_order_paid      audit: the same for orders
    ├── gateway_capture_once   gateway: at most one capture call per gateway payment id
    ├── no_lost_capture        confirmed to the client or by the gateway => ends captured
    ├── no_phantom_capture     captured in the database => captured at the gateway (the other
    │                          direction: a capture the gateway never made, e.g. a webhook
    │                          trusted before the gateway captured, or a capture call that
    │                          failed while the row was marked captured anyway)
    ├── no_5xx                 no crash: a 500, or a 5xx without a deliberate error code;
    │                          a request with no answer at all is unknown
    ├── no_deadlock            no deadlock: per payment through the lock sampler's cycles and
    │                          40P01 replies (model.deadlocks), the rest by pg_stat_database
    └── error_classes          completions by (f, status, error code); flags unexpected classes

Every checker has the signature `(ops, obs) -> CheckResult`, reads nothing else and changes
nothing. The audit-based checkers count *distinct transactions* (txid) that wrote the done
status, so the naive flow's second UPDATE — which waits for the first to commit, then writes
captured over captured — counts as the second capture it is. `first` / `worst` / `last` are
small JSON-able dicts naming the payment, the counts, the audit rows (id, txid, backend pid)
and the history operations (index, f, process) a human needs to find the case again.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from payrace.harness.model import deadlocks
from payrace.harness.model.answers import DELIBERATE_CODES
from payrace.harness.model.history import Operation
from payrace.harness.model.oracle import AuditRow, Observation

Validity = bool | Literal["unknown"]

CAPTURE_EVENTS = frozenset({"payment.captured", "order.paid"})
# Classes a correct target may answer during a race (see error_classes).
EXPECTED_ERRORS: frozenset[tuple[int, str]] = frozenset(
    {
        (409, "retry_later"),  # serialisation failure persisted: documented as safe to retry
        (502, "gateway_error"),  # the gateway failed; nothing was written
        (502, "gateway_refused"),  # the gateway refused the capture; nothing was written
        (503, "database_unavailable"),  # the connection was lost (a killed backend): retryable
    }
)
_MAX_LISTED = 10  # audit rows / ops listed per example: enough to find the case, not a dump


@dataclass(frozen=True)
class CheckResult:
    name: str
    valid: Validity
    count: int  # violations
    checked: int  # items examined
    first: dict[str, Any] | None = None
    worst: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    note: str = ""
    payments: frozenset[int] = field(default_factory=frozenset)  # the violating payments

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "valid": self.valid,
            "count": self.count,
            "checked": self.checked,
            "first": self.first,
            "worst": self.worst,
            "last": self.last,
            "note": self.note,
            "payments": sorted(self.payments),
        }


@dataclass(frozen=True)
class Verdict:
    valid: Validity
    results: dict[str, CheckResult]
    violating_payments: frozenset[int]

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "results": {name: r.to_json() for name, r in self.results.items()},
            "violating_payments": sorted(self.violating_payments),
        }


Checker = Callable[[Sequence[Operation], Observation], CheckResult]


def compose(results: Iterable[CheckResult]) -> Validity:
    """False over unknown over True; nothing checked is True (as in Jepsen's compose)."""
    return compose_validity(result.valid for result in results)


def compose_validity(values: Iterable[Validity]) -> Validity:
    """compose() of bare validities (checks read back from a summary.json)."""
    valid: Validity = True
    for value in values:
        if value is False:
            return False
        if value == "unknown":
            valid = "unknown"
    return valid


def _verdict(
    name: str,
    checked: int,
    violations: Sequence[dict[str, Any]],
    unknowns: Sequence[dict[str, Any]] = (),
    *,
    order: Callable[[dict[str, Any]], Any],
    severity: Callable[[dict[str, Any]], Any],
    note: str = "",
) -> CheckResult:
    """Violations decide; without them, unknown cases make the result unknown."""
    cases = violations or unknowns
    valid: Validity = False if violations else ("unknown" if unknowns else True)
    if not cases:
        return CheckResult(name, valid, 0, checked, note=note)
    ordered = sorted(cases, key=order)
    payments = frozenset(int(c["payment"]) for c in violations if isinstance(c.get("payment"), int))
    return CheckResult(
        name,
        valid,
        len(violations),
        checked,
        first=ordered[0],
        worst=max(ordered, key=severity),  # max keeps the earliest of equals
        last=ordered[-1],
        note=note,
        payments=payments,
    )


# -- history helpers ----------------------------------------------------------------------


def _completions(ops: Sequence[Operation]) -> list[Operation]:
    """Completed requests: the nemesis's own operations (faults it injected) are not."""
    return [op for op in ops if op.type != "invoke" and op.f != "nemesis"]


def _op_ref(op: Operation) -> dict[str, Any]:
    ref: dict[str, Any] = {"index": op.index, "f": op.f, "process": op.process, "type": op.type}
    if op.status is not None:
        ref["status"] = op.status
    if op.trial:
        ref["trial"] = op.trial
    return ref


def _ops_by_payment(ops: Sequence[Operation]) -> dict[int, list[dict[str, Any]]]:
    by: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for op in _completions(ops):
        if op.payment is not None and len(by[op.payment]) < _MAX_LISTED:
            by[op.payment].append(_op_ref(op))
    return by


def _paired(ops: Sequence[Operation]) -> list[tuple[Operation | None, Operation]]:
    """(invoke, completion) pairs. A process carries one operation at a time (as in Jepsen),
    so a completion closes the oldest open invoke of its (trial, process, payment, f)."""
    open_: dict[tuple[int, str, int | None, str], list[Operation]] = defaultdict(list)
    pairs: list[tuple[Operation | None, Operation]] = []
    for op in ops:
        key = (op.trial, op.process, op.payment, op.f)
        if op.type == "invoke":
            open_[key].append(op)
        else:
            pairs.append((open_[key].pop(0) if open_[key] else None, op))
    return pairs


def _error_code(op: Operation) -> str | None:
    error = op.value.get("error") if isinstance(op.value, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


# -- audit-based checkers -----------------------------------------------------------------


def _row_ref(row: AuditRow) -> dict[str, Any]:
    return {
        "audit_id": row.id,
        "op": row.op,
        "old": row.old_status,
        "new": row.new_status,
        "txid": row.txid,
        "pid": row.backend_pid,
        "at": row.at.isoformat(),
        "changed": list(row.changed),
    }


def _final_status(obs: Observation, table: str, payment: int) -> str | None:
    state = obs.payments.get(payment)
    if state is None:
        return None
    return {
        "payments": state.status,
        "invoices": state.invoice_status,
        "orders": state.order_status,
    }[table]


def _single_done_write(
    name: str, table: str, ops: Sequence[Operation], obs: Observation
) -> CheckResult:
    """Per payment and per row of `table`: how many transactions wrote its done status.

    More than one is a violation. None while the payment ends captured is a violation when
    the row is not done either (a lost update), and unknown when it is done (it was written
    before the baseline or while the oracle was not installed)."""
    watched = getattr(obs.config, table)
    done = watched.done_value
    ignore = frozenset(watched.ignore_columns)
    captured = obs.config.payments.done_value

    def writes_done(row: AuditRow) -> bool:
        if row.table != table or row.new_status != done or row.payment_id is None:
            return False
        if row.op == "INSERT":
            return True
        # A done row touched only in columns the target declared harmless (updated_at, ...)
        # was not written again; with no such columns every rewrite counts.
        touched_only_ignored = bool(ignore) and set(row.changed) <= ignore
        return row.op == "UPDATE" and not (row.old_status == done and touched_only_ignored)

    writes: dict[int, dict[int, list[AuditRow]]] = defaultdict(lambda: defaultdict(list))
    for row in obs.audit:
        if writes_done(row):
            writes[row.payment_id or 0][row.row_id].append(row)
    by_payment = _ops_by_payment(ops)
    violations: list[dict[str, Any]] = []
    unknowns: list[dict[str, Any]] = []
    payments = sorted(set(obs.payments) | set(writes))
    for payment in payments:
        final = _final_status(obs, table, payment)
        for row_id, rows in sorted(writes.get(payment, {}).items()):
            txids = list(dict.fromkeys(r.txid for r in rows))
            if len(txids) > 1:
                rewrites = sum(1 for r in rows if r.op == "UPDATE" and r.old_status == done)
                violations.append(
                    {
                        "payment": payment,
                        "table": table,
                        "row_id": row_id,
                        "writes": len(txids),
                        "rewrites": rewrites,  # done over done: the racing second writer
                        "txids": txids,
                        "backend_pids": sorted({r.backend_pid for r in rows}),
                        "final_status": final,
                        "audit": [_row_ref(r) for r in rows[:_MAX_LISTED]],
                        "ops": by_payment.get(payment, []),
                        "_at": rows[0].id,
                    }
                )
        state = obs.payments.get(payment)
        if payment in writes or state is None or state.status != captured or final is None:
            continue
        case = {
            "payment": payment,
            "table": table,
            "writes": 0,
            "final_status": final,
            "ops": by_payment.get(payment, []),
            "_at": float("inf"),
        }
        (unknowns if final == done else violations).append(case)
    for case in violations + unknowns:
        case.setdefault("problem", "no write seen" if case["writes"] == 0 else "written twice")
    note = (
        f"{len(payments)} payment(s); a write = a transaction that wrote a {table} row "
        f"with {watched.status_column} = '{done}'"
    )
    result = _verdict(
        name,
        len(payments),
        violations,
        unknowns,
        order=lambda c: (c["_at"], c["payment"]),
        severity=lambda c: c["writes"],
        note=note,
    )
    return _without_sort_keys(result)


def _without_sort_keys(result: CheckResult) -> CheckResult:
    """Drop the "_"-prefixed keys the examples carried only to be ordered."""

    def clean(case: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if case is None else {k: v for k, v in case.items() if not k.startswith("_")}

    return replace(
        result, first=clean(result.first), worst=clean(result.worst), last=clean(result.last)
    )


def single_capture_write(ops: Sequence[Operation], obs: Observation) -> CheckResult:
    """Exactly one transaction sets each captured payment's status to captured."""
    return _single_done_write("single_capture_write", "payments", ops, obs)


def single_invoice_paid(ops: Sequence[Operation], obs: Observation) -> CheckResult:
    """At most one transaction marks an invoice paid; exactly one if its payment is captured."""
    return _single_done_write("single_invoice_paid", "invoices", ops, obs)


def single_order_paid(ops: Sequence[Operation], obs: Observation) -> CheckResult:
    """At most one transaction marks an order paid; exactly one if its payment is captured."""
    return _single_done_write("single_order_paid", "orders", ops, obs)


# -- gateway and history checkers ---------------------------------------------------------


def _gateway_owner(ops: Sequence[Operation], obs: Observation) -> dict[str, int]:
    """Gateway payment id -> internal payment id, from the database and from the history
    (the latter also knows ids the database never recorded)."""
    owner: dict[str, int] = {}
    for op in ops:
        gid = op.value.get("gateway_payment_id") if isinstance(op.value, dict) else None
        if isinstance(gid, str) and op.payment is not None:
            owner.setdefault(gid, op.payment)
    for state in obs.payments.values():
        if state.gateway_payment_id:
            owner[state.gateway_payment_id] = state.payment_id
    return owner


def gateway_capture_once(ops: Sequence[Operation], obs: Observation) -> CheckResult:
    """At most one capture call reaches the gateway per gateway payment id, not counting the
    calls the harness's fault injection failed (gateway-errors): a client that sends the
    capture again after one (a reloaded callback) is doing what it should, and the money
    moved once. A second call after any other answer is a double capture attempt."""
    owner = _gateway_owner(ops, obs)
    by_payment = _ops_by_payment(ops)
    violations = [
        {
            "gateway_payment_id": gid,
            "payment": owner.get(gid),
            "calls": calls,
            "accepted": obs.gateway_accepted.get(gid, 0),
            "ops": by_payment.get(owner[gid], []) if gid in owner else [],
        }
        for gid, calls in sorted(obs.gateway_captures.items())
        if calls - obs.gateway_injected.get(gid, 0) > 1
    ]
    return _verdict(
        "gateway_capture_once",
        len(obs.gateway_captures),
        violations,
        order=lambda c: (c["ops"][0]["index"] if c["ops"] else 1 << 62, c["gateway_payment_id"]),
        severity=lambda c: c["calls"],
        note=f"{len(obs.gateway_captures)} gateway payment id(s) with capture calls",
    )


def no_lost_capture(ops: Sequence[Operation], obs: Observation) -> CheckResult:
    """A payment the client was told is captured, or the gateway says is, ends captured.

    Confirmed by: an ok verify / webhook answered `status: captured`; an ok webhook for
    payment.captured or order.paid (the gateway's own word); a capture the gateway accepted.
    A confirmed payment outside the observation's scope is unknown, not assumed fine."""
    captured = obs.config.payments.done_value
    evidence: dict[int, list[str]] = defaultdict(list)
    first_index: dict[int, int] = {}
    for invoke, done in _paired(ops):
        if done.type != "ok" or done.payment is None or done.f not in ("verify", "webhook"):
            continue
        reason = None
        event = (invoke.value if invoke else {}).get("event") or done.value.get("event")
        if done.f == "webhook" and event in CAPTURE_EVENTS:
            reason = f"webhook {event} ok #{done.index}"
        elif done.value.get("status") == captured:
            reason = f"{done.f} answered {captured} #{done.index}"
        if reason:
            evidence[done.payment].append(reason)
            first_index.setdefault(done.payment, done.index)
    owner = _gateway_owner(ops, obs)
    orphans = []
    for gid, accepted in sorted(obs.gateway_accepted.items()):
        if accepted <= 0:
            continue
        if gid not in owner:
            orphans.append(gid)
            continue
        evidence[owner[gid]].append(f"gateway accepted {accepted} capture(s) of {gid}")
    for gid in sorted(obs.gateway_captured - {g for g, n in obs.gateway_accepted.items() if n}):
        # Captured by the gateway itself (automatic capture, before its payment.captured).
        if gid not in owner:
            orphans.append(gid)
            continue
        evidence[owner[gid]].append(f"captured at the gateway ({gid})")
    by_payment = _ops_by_payment(ops)
    violations: list[dict[str, Any]] = []
    unknowns: list[dict[str, Any]] = []
    for payment, reasons in sorted(evidence.items()):
        state = obs.payments.get(payment)
        case = {
            "payment": payment,
            "final_status": state.status if state else None,
            "confirmed_by": reasons[:_MAX_LISTED],
            "confirmations": len(reasons),
            "ops": by_payment.get(payment, []),
            "_at": first_index.get(payment, 1 << 62),
        }
        if state is None:
            unknowns.append(case)
        elif state.status != captured:
            violations.append(case)
    note = f"{len(evidence)} confirmed payment(s)"
    if orphans:
        note += f"; gateway captures of {orphans[:_MAX_LISTED]} belong to no known payment"
        unknowns.append({"gateway_payment_ids": orphans[:_MAX_LISTED], "_at": 1 << 62})
    if any(c.get("final_status") is None and "payment" in c for c in unknowns):
        note += "; some confirmed payments are outside the observation's scope"
    result = _verdict(
        "no_lost_capture",
        len(evidence),
        violations,
        unknowns,
        order=lambda c: c["_at"],
        severity=lambda c: c.get("confirmations", 0),
        note=note,
    )
    return _without_sort_keys(result)


def no_phantom_capture(ops: Sequence[Operation], obs: Observation) -> CheckResult:
    """A payment the database says is captured is captured at the gateway: the money the
    shop books was taken. Read from the gateway's own state (observed after the run), for
    the gateway payment id the database row holds, else the one the history sent."""
    captured = obs.config.payments.done_value
    done = sorted(p for p, s in obs.payments.items() if s.status == captured)
    if not obs.gateway_observed:
        note = f"{len(done)} captured payment(s); the gateway's state was not read"
        return CheckResult(
            "no_phantom_capture", "unknown" if done else True, 0, len(done), note=note
        )
    sent: dict[int, str] = {}
    for op in ops:
        gid = op.value.get("gateway_payment_id") if isinstance(op.value, dict) else None
        if isinstance(gid, str) and op.payment is not None:
            sent.setdefault(op.payment, gid)
    by_payment = _ops_by_payment(ops)
    violations: list[dict[str, Any]] = []
    unknowns: list[dict[str, Any]] = []
    for payment in done:
        gid = obs.payments[payment].gateway_payment_id or sent.get(payment)
        case = {
            "payment": payment,
            "gateway_payment_id": gid,
            "capture_calls": obs.gateway_captures.get(gid, 0) if gid else 0,
            "ops": by_payment.get(payment, []),
            "_at": _first_index(by_payment.get(payment)),
        }
        if gid is None:
            unknowns.append({**case, "problem": "no gateway payment id to look up"})
        elif gid not in obs.gateway_captured:
            violations.append({**case, "problem": "captured in the database, not at the gateway"})
    result = _verdict(
        "no_phantom_capture",
        len(done),
        violations,
        unknowns,
        order=lambda c: (c["_at"], c["payment"]),
        severity=lambda c: 1,
        note=f"{len(done)} payment(s) captured in the database, checked at the gateway",
    )
    return _without_sort_keys(result)


def service_outages(ops: Sequence[Operation]) -> list[tuple[int, int]]:
    """(down, up) times of each restart-service the nemesis made, from its operations; one
    still down at the end of the history lasts to its end."""
    windows: list[tuple[int, int]] = []
    down: int | None = None
    for op in ops:
        if op.f != "nemesis" or op.type == "invoke":
            continue
        if op.value.get("fault") != "restart-service":
            continue
        if op.value.get("action") == "down":
            down = op.time
        elif op.value.get("action") == "up" and down is not None:
            windows.append((down, op.time))
            down = None
    if down is not None:
        windows.append((down, max((op.time for op in ops), default=down)))
    return windows


def no_5xx(ops: Sequence[Operation], obs: Observation) -> CheckResult:
    """No crash: no 500, and no other 5xx without one of DELIBERATE_CODES. A 502
    gateway_error or a 503 database_unavailable reports a fault the target handled (the
    nemesis injects those on purpose; error_classes counts them). A request that got no answer
    (timeout, dropped connection) may hide a crash, so it makes the result unknown unless a
    crash already decided it — except while the nemesis had killed the service process
    (restart-service, between its `down` and `up` operations): that silence is the fault
    injected, not the target's; those requests stay `info` (outcome unknown) in the history."""
    completions = _completions(ops)
    outages = service_outages(ops)
    violations, unknowns = [], []
    deliberate = silenced = 0
    for op in completions:
        code = _error_code(op)
        case = {**_op_ref(op), "payment": op.payment, "code": code, "error": op.error}
        if op.status is not None and op.status >= 500:
            if op.status == 500 or code not in DELIBERATE_CODES:
                violations.append(case)
            else:
                deliberate += 1
        elif op.status is None and op.type == "info":
            if any(down <= op.time <= up for down, up in outages):
                silenced += 1
            else:
                unknowns.append(case)
    note = f"{len(completions)} completion(s)"
    if deliberate:
        note += f", {deliberate} deliberate 5xx (a handled fault)"
    if silenced:
        note += f", {silenced} unanswered while the nemesis had killed the service"
    if unknowns:
        note += f", {len(unknowns)} without an answer"
    return _verdict(
        "no_5xx",
        len(completions),
        violations,
        unknowns,
        order=lambda c: c["index"],
        severity=lambda c: c.get("status") or 0,
        note=note,
    )


def no_deadlock(ops: Sequence[Operation], obs: Observation) -> CheckResult:
    """No deadlock, tied to the payments it hit where the harness can (model.deadlocks).

    A payment is violated by a wait-for cycle whose surviving transaction wrote its rows, or
    by a reply naming 40P01; its example carries the statements PostgreSQL's backends ran.
    pg_stat_database.deadlocks is the run's cross-check: what it counted beyond those
    attributed is a violation of no payment, the example saying why it could not be tied.
    A zero count is only trusted once the oracle says the reading settled; else unknown."""
    acc = deadlocks.account(ops, obs)
    facts = acc.to_json()
    by_payment = _ops_by_payment(ops)
    cases: list[dict[str, Any]] = [
        {**d.to_json(), "ops": by_payment.get(p, []), "_at": _first_index(by_payment.get(p))}
        for p, d in acc.payments.items()
    ]
    if acc.unattributed:
        cases.append(
            {"unattributed": acc.unattributed, "why": acc.why_unattributed(), "_at": 1 << 62}
        )
    checked = max(1, len(obs.payments))
    note = (
        f"{acc.counted} counted by pg_stat_database"
        + ("" if acc.settled else " (not settled)")
        + f", {acc.cycles_seen} wait-for cycle(s) seen, {acc.attributed} attributed to "
        f"{len(acc.payments)} payment(s), {acc.unattributed} not attributed"
    )
    if cases:
        result = _verdict(
            "no_deadlock",
            checked,
            cases,
            order=lambda c: (c["_at"], c.get("payment", 0)),
            severity=lambda c: c.get("deadlocks", c.get("unattributed", 0)),
            note=note,
        )
        return _without_sort_keys(replace(result, count=acc.attributed + acc.unattributed))
    if not obs.deadlocks_settled:
        return CheckResult(
            "no_deadlock", "unknown", 0, checked, facts, facts, facts, obs.deadlock_note or note
        )
    return CheckResult("no_deadlock", True, 0, checked, note=note)


def _first_index(refs: Sequence[dict[str, Any]] | None) -> int:
    return int(refs[0]["index"]) if refs else 1 << 61


def error_classes(ops: Sequence[Operation], obs: Observation) -> CheckResult:
    """Completions counted by (f, status, error code), Jepsen-bank style.

    Expected: any 2xx, a request with no answer (no_5xx judges those), and EXPECTED_ERRORS.
    Anything else is unexpected: a 500 is an unhandled crash, an error without a code breaks
    the error contract, and a 4xx means target and harness disagree about a request the
    harness built to be valid."""
    classes: Counter[tuple[str, int | None, str | None]] = Counter()
    seen: dict[tuple[str, int | None, str | None], list[int]] = {}
    for op in _completions(ops):
        key = (op.f, op.status, _error_code(op))
        classes[key] += 1
        seen.setdefault(key, []).append(op.index)

    def expected(status: int | None, code: str | None) -> bool:
        return status is None or 200 <= status < 300 or (status, code or "") in EXPECTED_ERRORS

    table: list[dict[str, Any]] = [
        {
            "f": f,
            "status": status,
            "code": code,
            "count": n,
            "expected": expected(status, code),
            "first_index": seen[(f, status, code)][0],
            "last_index": seen[(f, status, code)][-1],
        }
        for (f, status, code), n in sorted(
            classes.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2] or "")
        )
    ]
    unexpected = [c for c in table if not c["expected"]]
    note = ", ".join(
        f"{c['f']} {c['status'] if c['status'] is not None else 'no answer'}"
        + (f" {c['code']}" if c["code"] else "")
        + f": {c['count']}"
        + ("" if c["expected"] else " (unexpected)")
        for c in table
    )
    worst = max(unexpected, key=lambda c: c["count"]) if unexpected else None
    return CheckResult(
        "error_classes",
        not unexpected,
        sum(c["count"] for c in unexpected),
        sum(classes.values()),
        first={"classes": table},
        worst=worst,
        last=max(unexpected, key=lambda c: c["last_index"]) if unexpected else None,
        note=note or "no completions",
    )


CHECKERS: tuple[Checker, ...] = (
    single_capture_write,
    single_invoice_paid,
    single_order_paid,
    gateway_capture_once,
    no_lost_capture,
    no_phantom_capture,
    no_5xx,
    no_deadlock,
    error_classes,
)


def check(
    ops: Iterable[Operation], obs: Observation, *, checkers: Sequence[Checker] = CHECKERS
) -> Verdict:
    """Run every checker; a checker that raises says "unknown" and why, never "valid"."""
    history = list(ops)
    results: dict[str, CheckResult] = {}
    for checker in checkers:
        name = getattr(checker, "__name__", repr(checker))
        try:
            result = checker(history, obs)
        except Exception as exc:
            result = CheckResult(name, "unknown", 0, 0, note=f"checker raised {exc!r}")
        results[result.name] = result
    violating = frozenset().union(*(r.payments for r in results.values()))
    return Verdict(compose(results.values()), results, violating)
