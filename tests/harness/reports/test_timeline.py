"""payrace/harness/reports/timeline.py: the seed's two-column table, in text and (escaped) HTML."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from payrace.harness.model.deadlocks import CycleMember, LockCycle
from payrace.harness.reports.timeline import (
    TimelineEvent,
    from_cycles,
    from_probes,
    phrase,
    render_html,
    render_text,
)
from payrace.service.instrument.probes import ProbeContext

WIDTH = 34


def race() -> list[TimelineEvent]:
    """The README's race, given out of time order on purpose."""
    return [
        TimelineEvent(40, "client", "update payment = captured"),
        TimelineEvent(10, "client", "read payment (pending)"),
        TimelineEvent(50, "webhook", "update payment = captured"),
        TimelineEvent(20, "webhook", "read payment (pending)"),
    ]


def test_render_text_has_the_seeds_header_and_rows_in_time_order() -> None:
    lines = render_text(race()).splitlines()
    assert lines[0] == "Time  " + "client".ljust(WIDTH) + "webhook"
    assert lines[1:] == [
        "T0    read payment (pending)",
        "T1    " + " " * WIDTH + "read payment (pending)",
        "T2    update payment = captured",
        "T3    " + " " * WIDTH + "update payment = captured",
    ]


def test_render_text_puts_each_text_in_its_process_column() -> None:
    events = [
        TimelineEvent(1, "webhook-1", "begin"),
        TimelineEvent(2, "client", "commit"),
        TimelineEvent(3, "webhook-2", "capture at gateway"),
        TimelineEvent(4, "client", "begin"),
    ]
    lines = render_text(events, width=20).splitlines()
    header = lines[0]
    # Columns appear in the order their process first acts.
    columns = {p: header.index(p) for p in ("webhook-1", "client", "webhook-2")}
    assert list(columns.values()) == [6, 26, 46]
    for line, event in zip(lines[1:], events, strict=True):
        assert re.match(r"T\d+ +", line)
        assert line.index(event.text) == columns[event.process]
        assert line.rstrip() == line


def test_row_labels_count_up_from_t0() -> None:
    events = [TimelineEvent(t, "client", f"step {t}") for t in range(12)]
    labels = [line.split()[0] for line in render_text(events).splitlines()[1:]]
    assert labels == [f"T{i}" for i in range(12)]


def test_render_html_draws_the_same_table() -> None:
    doc = render_html(race())
    assert doc.startswith('<table class="timeline">')
    assert "<thead><tr><th>Time</th><th>client</th><th>webhook</th></tr></thead>" in doc
    rows = re.findall(r"<tr><th>(T\d+)</th>(.*?)</tr>", doc)
    assert [label for label, _ in rows] == ["T0", "T1", "T2", "T3"]
    assert rows[1][1] == "<td></td><td>read payment (pending)</td>"
    assert rows[2][1] == "<td>update payment = captured</td><td></td>"


def test_render_html_escapes_text_and_process_names() -> None:
    events = [
        TimelineEvent(1, "<b>client</b>", "<script>alert('x')</script>"),
        TimelineEvent(2, "webhook", 'a & b "quoted"'),
    ]
    doc = render_html(events)
    assert "<script>" not in doc and "<b>" not in doc
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in doc
    assert "<th>&lt;b&gt;client&lt;/b&gt;</th>" in doc
    assert "a &amp; b &quot;quoted&quot;" in doc


def test_phrase_turns_pause_points_into_the_seeds_words() -> None:
    assert phrase("payment_read", "pending") == "read payment (pending)"
    assert phrase("payment_read", None) == "read payment (?)"
    assert phrase("status_checked", "pending") == "status pending: capture"
    assert phrase("status_checked", "repeat") == "already captured: idempotent return"
    assert phrase("payment_written", None) == "update payment = captured"
    assert phrase("no_such_point", None) == "no_such_point"
    # A team's own point (payrace.pause): its name as written, its detail beside it.
    assert phrase("charge_read", "pending") == "charge_read (pending)"
    assert phrase("odd{name}", "{x}") == "odd{name} ({x})"


def test_from_probes_merges_processes_in_time_order() -> None:
    client = ProbeContext("client")
    client.points = [("txn_begun", 10, None), ("payment_read", 30, "pending")]
    webhook = ProbeContext("webhook-1")
    webhook.points = [("txn_begun", 20, None), ("status_checked", 40, "repeat")]
    events = from_probes({"client": client, "webhook-1": webhook})
    assert events == [
        TimelineEvent(10, "client", "begin"),
        TimelineEvent(20, "webhook-1", "begin"),
        TimelineEvent(30, "client", "read payment (pending)"),
        TimelineEvent(40, "webhook-1", "already captured: idempotent return"),
    ]
    assert events[0].to_json() == {"time_ns": 10, "process": "client", "text": "begin"}


def test_empty_timeline_renders_a_bare_header() -> None:
    assert render_text([]).strip() == "Time"
    assert "<tbody></tbody>" in render_html([])


def test_from_cycles_puts_each_member_in_its_backend_column_with_its_fate() -> None:
    at = datetime(2026, 11, 26, 10, 15, 1, tzinfo=UTC)
    cycle = LockCycle(
        at,
        (
            CycleMember(7, 812, "UPDATE a", "transaction 813 (ShareLock)", (8,), 812, "aborted"),
            CycleMember(
                8, 813, "UPDATE b", "row (0,1) of payments (ExclusiveLock)", (7,), 813, "committed"
            ),
        ),
    )
    events = from_cycles([cycle])
    assert [(e.process, e.text) for e in events] == [
        ("backend 7", "waits for transaction 813 (ShareLock): deadlock, rolled back"),
        ("backend 8", "waits for row (0,1) of payments (ExclusiveLock): deadlock, went on"),
    ]
    assert {e.time_ns for e in events} == {int(at.timestamp() * 1e9)}  # the audit rows' clock
