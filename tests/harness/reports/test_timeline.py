"""payrace/harness/reports/timeline.py: the seed's two-column table, in text and (escaped) HTML."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

from payrace.harness.model.deadlocks import CycleMember, LockCycle
from payrace.harness.model.lockwatch import WaitEpisode
from payrace.harness.model.oracle import AuditRow
from payrace.harness.reports.timeline import (
    TimelineEvent,
    from_audit,
    from_audit_waits,
    from_cycles,
    from_probes,
    from_waits,
    phrase,
    render_html,
    render_text,
    since,
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


class _Table(HTMLParser):
    """A timeline table read back as rows of (tag, class, text) cells: the page as a browser
    builds it, not the markup's spelling."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[tuple[str, str, str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = [tag, dict(attrs).get("class") or "", ""]

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[2] += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append((self._cell[0], self._cell[1], self._cell[2]))
            self._cell = None


def table(doc: str) -> list[list[tuple[str, str, str]]]:
    parser = _Table()
    parser.feed(doc)
    return parser.rows


MS = 1_000_000


def waited_trial() -> list[TimelineEvent]:
    """A naive trial: the webhook's update queues behind the client's row lock."""
    t0 = 5_000 * MS  # monotonic: far from zero, as a real clock is
    return [
        TimelineEvent(t0 + 1 * MS, "client", "read payment (pending)"),
        TimelineEvent(t0 + 2 * MS, "webhook-1", "read payment (pending)"),
        TimelineEvent(t0 + 3 * MS, "client", "update payment = captured"),
        TimelineEvent(t0 + 30 * MS, "client", "commit"),
        TimelineEvent(t0 + 31 * MS, "webhook-1", "update payment = captured"),
    ]


def test_from_waits_adds_a_requests_wait_and_marks_the_step_that_ended_it() -> None:
    t0 = 5_000 * MS
    episodes = [
        WaitEpisode(71, t0 + 4 * MS, t0 + 29 * MS, "transaction 900 (ShareLock)", (70,)),
        # The same backend in another trial (a pooled connection): not this trial's wait.
        WaitEpisode(71, t0 + 900 * MS, t0 + 950 * MS, "transaction 990 (ShareLock)", (70,)),
        # A backend that serves no request of this trial.
        WaitEpisode(99, t0 + 5 * MS, t0 + 6 * MS, "transaction 901 (ShareLock)", (98,)),
    ]
    events = from_waits(
        waited_trial(),
        episodes,
        {70: "client", 71: "webhook-1"},
        window=(t0, t0 + 40 * MS),
        interval_ms=5.0,
    )
    texts = [(e.process, e.text) for e in events]
    assert texts[3] == (
        "webhook-1",
        "waits ~30.0 ms for transaction 900 (ShareLock), held by client <waiting>",
    )
    assert texts[-1] == ("webhook-1", "<completed> update payment = captured")
    assert len(events) == len(waited_trial()) + 1


def test_a_wait_on_an_unnamed_backend_names_its_pid() -> None:
    events = from_waits(
        waited_trial(),
        [WaitEpisode(71, 5_004 * MS, 5_010 * MS, "row (0,1) of payments (ExclusiveLock)", (5,))],
        {71: "webhook-1"},
        window=(5_000 * MS, 5_040 * MS),
        interval_ms=5.0,
    )
    assert any("held by backend 5 <waiting>" in e.text for e in events)


def test_render_html_shades_the_waiting_stretch_and_shows_times_from_the_origin() -> None:
    t0 = 5_000 * MS
    events = from_waits(
        waited_trial(),
        [WaitEpisode(71, t0 + 4 * MS, t0 + 29 * MS, "transaction 900 (ShareLock)", (70,))],
        {70: "client", 71: "webhook-1"},
        window=(t0, t0 + 40 * MS),
        interval_ms=5.0,
    )
    rows = table(render_html(since(events, t0), times="from the trial's start"))
    head, body = rows[0], rows[1:]
    assert [text for _, _, text in head] == [
        "Time",
        "ms (from the trial's start)",
        "client",
        "webhook-1",
    ]
    assert [r[1][2] for r in body] == ["1.00", "2.00", "3.00", "4.00", "30.00", "31.00"]
    webhook = [(cls, text) for _, cls, text in (r[3] for r in body)]
    assert webhook[3][0] == "waited" and webhook[3][1].endswith("<waiting>")
    # T4 (the client's commit) is a row the webhook spent waiting; the next step ends it.
    assert webhook[4] == ("waiting", "waiting")
    assert webhook[5] == ("", "<completed> update payment = captured")
    assert all(cls != "waiting" for cls, _ in webhook[:3])


def test_render_html_shades_the_explorers_waits_too_but_shows_no_times() -> None:
    """The explorer's events are steps (0, 1, 2 ...), its marks the same <waiting>."""
    steps = [
        TimelineEvent(0, "client", "read payment FOR UPDATE"),
        TimelineEvent(1, "webhook", "read payment FOR UPDATE <waiting>"),
        TimelineEvent(2, "client", "commit → 200"),
        TimelineEvent(3, "webhook", "<completed> read payment (captured)"),
    ]
    rows = table(render_html(steps))
    assert [c[2] for c in rows[0]] == ["Time", "client", "webhook"]
    assert rows[3][2] == ("td", "waiting", "waiting")
    assert rows[4][2] == ("td", "", "<completed> read payment (captured)")


def test_render_text_with_times_prints_ms_per_row() -> None:
    lines = render_text(since(waited_trial()), times="from the first event").splitlines()
    assert lines[0] == "(ms: from the first event)"
    assert lines[2].split()[:2] == ["T0", "0.00"]
    assert lines[-1].split()[:2] == ["T4", "30.00"]


def test_since_keeps_the_order_and_moves_the_origin() -> None:
    assert [e.time_ns for e in since(waited_trial())] == [0, MS, 2 * MS, 29 * MS, 30 * MS]
    assert since([]) == []


def _row(i: int, payment: int, pid: int, ms: int, op: str = "UPDATE") -> AuditRow:
    at = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC) + timedelta(milliseconds=ms)
    return AuditRow(i, "payments", payment, payment, op, "pending", "captured", 900 + i, pid, at)


def _at(ms: int) -> datetime:
    return datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC) + timedelta(milliseconds=ms)


def test_over_http_a_pooled_backends_wait_belongs_to_the_payment_it_then_wrote() -> None:
    """Backend 8 serves payment 1 and then payment 2: its wait before payment 2's row is
    payment 2's, not payment 1's, although it lies inside payment 1's rows."""
    rows = [
        _row(1, 1, 7, 0, "INSERT"),
        _row(2, 1, 7, 10),
        _row(3, 2, 8, 11, "INSERT"),
        _row(4, 2, 8, 40),  # backend 8's next row after the first wait: payment 2
        _row(5, 1, 8, 90),  # after the second wait: payment 1
    ]
    first = WaitEpisode(8, 0, 0, "transaction 77 (ShareLock)", (9,), _at(20), _at(35))
    second = WaitEpisode(8, 0, 0, "transaction 902 (ShareLock)", (7,), _at(50), _at(85))
    outside = WaitEpisode(7, 0, 0, "transaction 5 (ShareLock)", (8,), _at(500), _at(505))
    events = from_audit(rows, 1)
    drawn = from_audit_waits(events, rows, 1, [first, second, outside], interval_ms=5.0)
    waits = [e for e in drawn if e.text.endswith("<waiting>")]
    assert [(e.process, e.time_ns) for e in waits] == [
        ("backend 8", int(_at(50).timestamp() * 1e9))
    ]
    assert "held by backend 7 <waiting>" in waits[0].text
    assert drawn[-1].process == "backend 8" and drawn[-1].text.startswith("<completed> UPDATE")
    # Payment 2's timeline gets the first wait instead.
    two = from_audit_waits(from_audit(rows, 2), rows, 2, [first, second], interval_ms=5.0)
    assert [e.text.split(" held by")[0] for e in two if e.text.endswith("<waiting>")] == [
        "waits ~20.0 ms for transaction 77 (ShareLock),"
    ]
