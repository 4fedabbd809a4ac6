"""Timelines of concurrent requests, drawn the way the incident write-up drew its race.

    TimelineEvent     one thing one request did (or a mark: <waiting>, <completed>)
    from_probes()     events from the pause points the requests passed
                      (payrace.service.instrument.probes)
    from_audit()      events from the oracle's audit rows, one column per backend (over
                      HTTP there are no probes, but the database saw every write)
    from_cycles()     a deadlock's members waiting for each other, in the same backend columns
    render_text()     the two-column table: "Time  client  webhook / T0  read payment (pending)"
    render_html()     the same as an HTML table (escaped), for report.html

Both renderers index events T0, T1, ... in time order, so a reader compares the columns
row by row exactly like the seed's table.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from payrace.harness.model.deadlocks import LockCycle
from payrace.harness.model.oracle import AuditRow
from payrace.service.instrument.probes import ProbeContext

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


def _rows(events: Iterable[TimelineEvent]) -> tuple[list[str], list[tuple[str, str, str]]]:
    ordered = sorted(events, key=lambda e: e.time_ns)
    processes: list[str] = []
    for e in ordered:
        if e.process not in processes:
            processes.append(e.process)
    return processes, [(f"T{i}", e.process, e.text) for i, e in enumerate(ordered)]


def render_text(events: Iterable[TimelineEvent], width: int = 34) -> str:
    processes, rows = _rows(events)
    lines = ["Time  " + "".join(p.ljust(width) for p in processes).rstrip()]
    for label, process, text in rows:
        cells = [text if p == process else "" for p in processes]
        lines.append(label.ljust(6) + "".join(c.ljust(width) for c in cells).rstrip())
    return "\n".join(lines)


def render_html(events: Iterable[TimelineEvent]) -> str:
    processes, rows = _rows(events)
    head = "".join(f"<th>{html.escape(p)}</th>" for p in processes)
    body = []
    for label, process, text in rows:
        cells = "".join(
            f"<td>{html.escape(text)}</td>" if p == process else "<td></td>" for p in processes
        )
        body.append(f"<tr><th>{label}</th>{cells}</tr>")
    return (
        f'<table class="timeline"><thead><tr><th>Time</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )
