"""Timelines of concurrent requests, drawn the way the incident write-up drew its race.

    TimelineEvent     one thing one request did (or a mark: <waiting>, <completed>)
    from_probes()     events from the pause points the requests passed
                      (payrace.service.instrument.probes)
    from_audit()      events from the oracle's audit rows, one column per backend (over
                      HTTP there are no probes, but the database saw every write)
    from_cycles()     a deadlock's members waiting for each other, in the same backend columns
    from_waits()      a request's lock waits the sampler saw (model.lockwatch), as
                      "<waiting>" rows, the next step of that request marked "<completed>"
    from_audit_waits()  the same for from_audit's backend columns (over HTTP)
    since()           events re-timed from an origin (a trial's start), for "ms" columns
    render_text()     the two-column table: "Time  client  webhook / T0  read payment (pending)"
    render_html()     the same as an HTML table (escaped), for report.html; a request's
                      cells between its "<waiting>" row and its next row are shaded
                      "waiting", for the explorer's schedules and run mode's alike

Both renderers index events T0, T1, ... in time order, so a reader compares the columns
row by row exactly like the seed's table. Given `times` (what the times are measured from),
they add each row's time in ms; the explorer's events are steps, not times, and pass none.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from payrace.harness.model.deadlocks import LockCycle
from payrace.harness.model.oracle import AuditRow
from payrace.service.instrument.probes import ProbeContext

if TYPE_CHECKING:  # only its shape: the sampler itself (asyncpg) stays out of the reports
    from payrace.harness.model.lockwatch import WaitEpisode

PHRASES = {
    "txn_begun": "begin",
    "payment_read": "read payment ({detail})",
    "status_checked": "status {detail}: capture",
    "gateway_called": "capture at gateway",
    "payment_written": "update payment = captured",
    "invoice_written": "update invoice = paid",
    "order_written": "update order = paid",
    "before_commit": "commit",
}


@dataclass(frozen=True)
class TimelineEvent:
    time_ns: int
    process: str
    text: str

    def to_json(self) -> dict[str, object]:
        return {"time_ns": self.time_ns, "process": self.process, "text": self.text}


def phrase(point: str, detail: str | None) -> str:
    if point == "status_checked" and detail == "repeat":
        return "already captured: idempotent return"
    if point not in PHRASES:  # a team's own point (payrace.pause): its name, as written
        return f"{point} ({detail})" if detail else point
    return PHRASES[point].format(detail=detail or "?")


def from_probes(probes: Mapping[str, ProbeContext]) -> list[TimelineEvent]:
    events = [
        TimelineEvent(t, process, phrase(point, detail))
        for process, probe in probes.items()
        for point, t, detail in probe.points
    ]
    return sorted(events, key=lambda e: e.time_ns)


def from_audit(rows: Iterable[AuditRow], payment_id: int) -> list[TimelineEvent]:
    events = [
        TimelineEvent(
            int(row.at.timestamp() * 1e9),
            f"backend {row.backend_pid}",
            f"{row.op} {row.table} {row.old_status or '-'} -> {row.new_status} (tx {row.txid})",
        )
        for row in rows
        # INSERTs are the order being created before the race; the race is in the UPDATEs.
        if row.payment_id == payment_id and row.op != "INSERT"
    ]
    return sorted(events, key=lambda e: e.time_ns)


def from_cycles(cycles: Iterable[LockCycle]) -> list[TimelineEvent]:
    """Each member of each cycle at the moment the sampler confirmed it, and its fate: the
    victim PostgreSQL aborted, the survivors that went on."""
    fate = {"aborted": ": deadlock, rolled back", "committed": ": deadlock, went on"}
    events = [
        TimelineEvent(
            int(cycle.seen_at.timestamp() * 1e9),
            f"backend {m.pid}",
            f"waits for {m.waits_for}{fate.get(m.status or '', ': deadlock')}",
        )
        for cycle in cycles
        for m in cycle.members
    ]
    return sorted(events, key=lambda e: e.time_ns)


WAITING = "<waiting>"
COMPLETED = "<completed>"


def from_waits(
    events: Iterable[TimelineEvent],
    episodes: Iterable[WaitEpisode],
    backends: Mapping[int, str],
    *,
    window: tuple[int, int],
    interval_ms: float,
) -> list[TimelineEvent]:
    """`events` (a trial's probes) with the lock waits of its requests' backends added.

    `backends` names the pids: the requests' own (probe.backend_pid) and, under --force
    locks, payrace's barrier. A pid serves many trials over a run (a connection pool), so
    only waits inside `window` (monotonic ns, the trial's start .. end) are this trial's.
    The step a request took once its wait ended (its next event) is marked <completed>,
    as PostgreSQL's isolation tester and the explorer mark it."""
    start, end = window
    waits: list[tuple[TimelineEvent, int]] = []
    for ep in episodes:
        process = backends.get(ep.pid)
        if process is None or ep.last_ns < start or ep.first_ns > end:
            continue
        holders = ", ".join(backends.get(pid, f"backend {pid}") for pid in ep.blocked_by)
        # First and last seen are one poll apart from the real start and end at most.
        ms = (ep.last_ns - ep.first_ns) / 1e6 + interval_ms
        text = f"waits ~{ms:.1f} ms for {ep.waits_for}, held by {holders or '?'} {WAITING}"
        waits.append((TimelineEvent(ep.first_ns, process, text), ep.last_ns))
    out = sorted([*events, *(w for w, _ in waits)], key=lambda e: e.time_ns)
    for wait, last in waits:
        for i, e in enumerate(out):
            if e.process == wait.process and e.time_ns > last and not e.text.endswith(WAITING):
                out[i] = TimelineEvent(e.time_ns, e.process, f"{COMPLETED} {e.text}")
                break
    return out


def from_audit_waits(
    events: Iterable[TimelineEvent],
    rows: Iterable[AuditRow],
    payment_id: int,
    episodes: Iterable[WaitEpisode],
    *,
    interval_ms: float,
) -> list[TimelineEvent]:
    """`events` (from_audit: one column per backend, the database's clock) with the waits
    of the backends that wrote this payment's rows.

    Over HTTP payrace does not know which backend serves which request, and a pooled backend
    serves many payments. A wait is this payment's when it lies within the payment's rows
    (its order's INSERT .. its last write) and the next row its backend wrote after the wait
    is this payment's: the statement that waited went on to write it."""
    all_rows = sorted(rows, key=lambda r: r.at)
    mine = [r for r in all_rows if r.payment_id == payment_id]
    if not mine:
        return sorted(events, key=lambda e: e.time_ns)
    start, end = mine[0].at, mine[-1].at
    chosen = []
    for ep in episodes:
        if ep.first_at is None or ep.last_at is None:
            continue
        if not start <= ep.first_at <= end:
            continue
        after = next((r for r in all_rows if r.backend_pid == ep.pid and r.at >= ep.last_at), None)
        if after is not None and after.payment_id == payment_id:
            chosen.append(
                replace(ep, first_ns=_epoch_ns(ep.first_at), last_ns=_epoch_ns(ep.last_at))
            )
    names = {r.backend_pid: f"backend {r.backend_pid}" for r in mine}
    return from_waits(events, chosen, names, window=(0, 2**63), interval_ms=interval_ms)


def _epoch_ns(at: datetime) -> int:
    return int(at.timestamp() * 1e9)  # as from_audit times its rows


def since(events: Iterable[TimelineEvent], origin_ns: int | None = None) -> list[TimelineEvent]:
    """Events re-timed to ns after `origin_ns` (default: the first event)."""
    ordered = sorted(events, key=lambda e: e.time_ns)
    if not ordered:
        return []
    origin = ordered[0].time_ns if origin_ns is None else origin_ns
    return [TimelineEvent(e.time_ns - origin, e.process, e.text) for e in ordered]


def _rows(
    events: Iterable[TimelineEvent],
) -> tuple[list[str], list[tuple[str, str, str, int]]]:
    ordered = sorted(events, key=lambda e: e.time_ns)
    processes: list[str] = []
    for e in ordered:
        if e.process not in processes:
            processes.append(e.process)
    return processes, [(f"T{i}", e.process, e.text, e.time_ns) for i, e in enumerate(ordered)]


def _ms(time_ns: int) -> str:
    return f"{time_ns / 1e6:.2f}"


def render_text(
    events: Iterable[TimelineEvent], width: int = 34, *, times: str | None = None
) -> str:
    processes, rows = _rows(events)
    clock = 10 if times else 0
    lines = []
    if times:
        lines.append(f"(ms: {times})")
    head = "Time  " + ("ms".rjust(8) + "  " if times else "")
    lines.append(head + "".join(p.ljust(width) for p in processes).rstrip())
    for label, process, text, t in rows:
        cells = [text if p == process else "" for p in processes]
        stamp = _ms(t).rjust(clock - 2) + "  " if times else ""
        lines.append(label.ljust(6) + stamp + "".join(c.ljust(width) for c in cells).rstrip())
    return "\n".join(lines)


def render_html(events: Iterable[TimelineEvent], *, times: str | None = None) -> str:
    """The table; with `times`, a "ms" column (its title says from what). A request's empty
    cells from its <waiting> row to its next row read "waiting" (class waiting)."""
    processes, rows = _rows(events)
    head = "".join(f"<th>{html.escape(p)}</th>" for p in processes)
    clock = f'<th title="{html.escape(times)}">ms ({html.escape(times)})</th>' if times else ""
    body = []
    waiting: set[str] = set()
    for label, process, text, t in rows:
        waiting.discard(process)
        cells = []
        for p in processes:
            if p == process:
                cls = ' class="waited"' if text.endswith(WAITING) else ""
                cells.append(f"<td{cls}>{html.escape(text)}</td>")
            elif p in waiting:
                cells.append('<td class="waiting">waiting</td>')
            else:
                cells.append("<td></td>")
        if text.endswith(WAITING):
            waiting.add(process)
        stamp = f'<td class="num">{_ms(t)}</td>' if times else ""
        body.append(f"<tr><th>{label}</th>{stamp}{''.join(cells)}</tr>")
    return (
        f'<table class="timeline"><thead><tr><th>Time</th>{clock}{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )
