"""reports.html: report.html is self-contained, escaped, and draws plots and schedules."""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from report_summaries import (
    DEADLOCK_STATEMENTS,
    TIMELINE,
    deadlocked_summary,
    empty_summary,
    race_summary,
    realistic_summary,
)

from payrace.harness.model.gates import Gate
from payrace.harness.model.stats import PathHistograms
from payrace.harness.reports.html import write_html
from payrace.harness.reports.timeline import TimelineEvent, render_html
from payrace.harness.reports.writers import write_all

EXTERNAL = [
    re.compile(r"<script", re.I),
    re.compile(r"<link\b", re.I),
    re.compile(r"url\(\s*['\"]?\s*(https?:)?//", re.I),
    re.compile(r"(src|href)\s*=\s*['\"]?\s*(https?:)?//", re.I),
    re.compile(r"@import", re.I),
]


def html_of(summary: dict[str, Any], tmp_path: Path) -> str:
    path = tmp_path / "report.html"
    write_html(summary, path)
    return path.read_text(encoding="utf-8")


def test_html_gives_a_gates_threshold_beside_its_measured_value(tmp_path: Path) -> None:
    summary = realistic_summary()
    fixed = summary["strategies"]["for_update"]
    summary["gates"] = [Gate.parse("lock_p99_ms<=3*hold_p99_ms").judge("for_update", fixed)]
    text = html_of(summary, tmp_path)
    assert "<th>threshold</th>" in text
    assert "23.769 = 3 * 7.923 (hold_p99_ms)" in text


def test_html_is_self_contained(tmp_path: Path) -> None:
    text = html_of(realistic_summary(), tmp_path)
    for pattern in EXTERNAL:
        assert not pattern.search(text), pattern.pattern
    # the only URL allowed is the SVG namespace, which no browser fetches
    urls = set(re.findall(r"https?://[^\s\"'<>]+", text))
    assert urls == {"http://www.w3.org/2000/svg"}


def test_html_has_a_plot_per_kind_and_path_set_and_the_timeline(tmp_path: Path) -> None:
    text = html_of(realistic_summary(), tmp_path)
    # per strategy: lock histogram + lock CDF + hold CDF + request CDF
    assert text.count("<svg") == 2 * 4
    assert text.count('class="cdf"') == 2 * 3 * 2  # two paths on each CDF
    assert "lock wait: histogram" in text and "lock hold: CDF" in text
    assert "(ms, log scale)" in text or "(ms)" in text
    assert 'class="timeline"' in text
    for row in ("<th>T0</th>", "<th>T7</th>"):
        assert row in text
    assert "update invoice = paid &lt;dup&gt;" in text  # escaped, not markup
    assert "violated, as declared" in text
    assert "arrival spread" in text and "gate" in text
    assert "PostgreSQL 16.2 via embedded" in text
    assert "First violating schedule: trial 3, payment 17" in text
    assert "forced: 48/50 by locks, 2 timeouts" in text


def test_html_names_no_trial_for_a_load_runs_violation(tmp_path: Path) -> None:
    """A Locust run has payments, not numbered trials."""
    summary = realistic_summary()
    summary["strategies"]["naive"]["first_violation"]["trial"] = None
    text = html_of(summary, tmp_path)
    assert "First violating schedule: payment 17 (" in text and "trial None" not in text


def test_html_escapes_everything_from_the_summary(tmp_path: Path) -> None:
    summary = realistic_summary()
    evil = '<img src=x onerror="alert(1)">'
    summary["command"] = evil
    summary["strategies"]["naive"]["checks"]["single_capture_write"]["note"] = evil
    summary["strategies"][evil] = copy.deepcopy(summary["strategies"]["for_update"])
    text = html_of(summary, tmp_path)
    assert "<img" not in text
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in text


WAITED = [
    TimelineEvent(0, "client", "begin"),
    TimelineEvent(1, "client", "read payment (pending)"),
    TimelineEvent(2, "webhook-1", "lock payment <waiting>"),
    TimelineEvent(3, "client", "commit → 200 captured"),
    TimelineEvent(4, "webhook-1", "<completed> read payment (captured)"),
]


def explored(**extra: Any) -> dict[str, Any]:
    """An explore-mode summary of for_update: every schedule valid, one drawn that waited."""
    summary = realistic_summary()
    for_update = summary["strategies"]["for_update"]
    for_update["explore"] = {
        "mode": "exhaustive",
        "waiting": 8,
        # As payrace.harness.explore.findings.ExploreResult.html_fragment() builds it.
        "timeline_html": "<h3>a schedule where webhook-1 waited for client: "
        "<code>for_update.rc.cw.a5b2ab4</code></h3>" + render_html(WAITED),
        "runs": [{"id": "for_update.rc.cw.a5b2ab4", "outcome": "client 200 captured"}],
    }
    for_update.update(extra)
    summary["strategies"] = {"for_update": for_update}
    return summary


def test_html_shows_the_schedule_where_a_request_waited_for_the_lock(tmp_path: Path) -> None:
    text = html_of(explored(), tmp_path)
    heading = "<h3>a schedule where webhook-1 waited for client: <code>for_update.rc.cw."
    assert text.count(heading) == 1
    drawn = text[text.index(heading) :]
    assert drawn.index("lock payment &lt;waiting&gt;") < drawn.index("commit → 200 captured")
    assert "&lt;completed&gt; read payment (captured)" in drawn
    assert drawn.index("</table>") < drawn.index("<h3>Plots</h3>")  # in its strategy's section


def test_html_draws_a_violating_schedule_once_and_trusts_only_the_timeline_key(
    tmp_path: Path,
) -> None:
    violation = {"trial": 3, "payment": 17, "checks": ["x"], "timeline": TIMELINE}
    summary = explored(first_violation=violation)
    evil = '<img src=x onerror="alert(1)">'
    summary["strategies"]["for_update"]["explore"]["runs"][0]["outcome"] = evil
    summary["strategies"]["for_update"]["explore"]["mode"] = evil
    text = html_of(summary, tmp_path)
    assert "waited for client" not in text  # the explorer drew the violation: shown once
    assert text.count('<table class="timeline">') == 1
    assert "<img" not in text


def test_a_run_with_zero_trials_still_renders(tmp_path: Path) -> None:
    summary = empty_summary()
    written = write_all(summary, tmp_path)
    text = written["html"].read_text()
    assert "no latency samples recorded" in text and "no checker ran" in text
    bare: dict[str, Any] = {"strategies": {}}
    write_all(bare, tmp_path / "bare")


# ---------------------------------------------------------------------------- Chromium


def chromium() -> str:
    for candidate in (
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.skip("chromium not installed: apt-get install chromium (.ci/run does)")


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        *args,
    ]
    # Popen + kill, not run(timeout=): chromium forks helpers that keep the pipes open,
    # and run() would wait for them after its own kill.
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"chromium did not finish within 60 s: {' '.join(command)}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    binary = chromium()
    report = write_all(realistic_summary(), tmp_path / "run")["html"]
    dom = run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == 8
    assert "<polyline" in dom.stdout and 'class="timeline"' in dom.stdout

    png = tmp_path / "r.png"
    shot = run_chromium(
        binary,
        tmp_path / "profile-shot",
        f"--screenshot={png}",
        "--window-size=1200,2000",
        "--hide-scrollbars",
        report.as_uri(),
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert png.exists() and png.stat().st_size > 20_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_shows_a_deadlocked_trial_with_its_statements(tmp_path: Path) -> None:
    text = html_of(deadlocked_summary(), tmp_path)
    assert "First violating schedule: trial 3, payment 17 (no_deadlock)" in text
    statements = re.search(r'<pre class="statements">(.*?)</pre>', text, re.S)
    assert statements is not None
    for statement in DEADLOCK_STATEMENTS:
        assert statement.replace("'", "&#x27;") in statements.group(1)
    assert "deadlock detected &lt;40P01&gt;" in statements.group(1)  # escaped
    assert (
        '<p class="fail">deadlocks: 3 counted by PostgreSQL, 1 tied to 1 trial(s), 2 could' in text
    )


def test_html_header_says_the_runs_verdict_and_exit_code(tmp_path: Path) -> None:
    run = html_of(realistic_summary(), tmp_path)
    assert '<h1>payrace 20261126-101500-forced: <span class="fail">violated (exit code 1)' in run
    assert "naive: violated" in run  # why
    race = html_of(race_summary(), tmp_path)
    assert '<span class="pass">as declared (exit code 0)</span></h1>' in race


def test_html_examples_are_words_not_json_or_a_python_repr(tmp_path: Path) -> None:
    summary = realistic_summary()
    summary["strategies"]["naive"]["server_side"] = {
        "samples": 12,
        "wait_ms": {"count": 3, "p99": 15.711},
    }
    text = html_of(summary, tmp_path)
    assert "<b>first</b> payment 17 (trial 3): 2 transactions set its payments row to captured" in (
        text
    )
    assert "{&quot;" not in text and "{&#x27;" not in text  # no JSON, no dict repr
    assert "samples 12, wait_ms (count 3, p99 15.711)" in text


class _Cells(HTMLParser):
    """Every table row of the page as its cells' text, and every paragraph's text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.paragraphs: list[str] = []
        self._cell: str | None = None
        self._p: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "p":
            self._p = ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell += data
        if self._p is not None:
            self._p += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(self._cell)
            self._cell = None
        elif tag == "p" and self._p is not None:
            self.paragraphs.append(self._p)
            self._p = None


def cells(text: str) -> _Cells:
    parser = _Cells()
    parser.feed(text)
    return parser


def unmeasured_summary() -> dict[str, Any]:
    """An aligned run against a target that stamps nothing: no spread, no lock samples on
    the webhook path, no request times."""
    summary = realistic_summary()
    empty = PathHistograms().get("lock", "client").summary()
    fu = summary["strategies"]["for_update"]
    fu["arrival_spread_ms"] = empty
    fu["latency_ms"]["lock"]["webhook"] = empty
    fu["server_side"] = {"samples": 40, "wait_ms": empty}
    summary["gates"] = [
        {"expr": "request_p99_ms<=100", "strategy": "for_update", "value": None, "passed": False}
    ]
    return summary


def test_a_statistic_of_no_samples_reads_not_measured_never_zero(tmp_path: Path) -> None:
    page = cells(html_of(unmeasured_summary(), tmp_path))
    spread = [p for p in page.paragraphs if p.startswith("arrival spread")]
    assert spread == ["arrival spread (server receive times within a trial, ms): not measured"]
    server = [p for p in page.paragraphs if p.startswith("seen in pg_stat_activity")]
    assert server[-1] == "seen in pg_stat_activity / pg_locks: samples 40, wait_ms (not measured)"
    webhook_lock = [r for r in page.rows if r[:2] == ["lock wait", "webhook"]]
    assert webhook_lock[-1] == ["lock wait", "webhook", "0", *["not measured"] * 5]
    overview = [r for r in page.rows if r and r[0] == "for_update"]
    assert overview[0][8] == "not measured"  # lock webhook p50/p99/max
    assert overview[0][7].count(" / ") == 2  # the client path was measured
    gate = [r for r in page.rows if r and r[0] == "request_p99_ms<=100"]
    assert gate == [["request_p99_ms<=100", "for_update", "-", "-", "not measured"]]


def test_measured_statistics_still_show_their_numbers(tmp_path: Path) -> None:
    page = cells(html_of(realistic_summary(), tmp_path))
    spread = [p for p in page.paragraphs if p.startswith("arrival spread")]
    assert spread == ["arrival spread (server receive times within a trial, ms): count 50, "
                      "p50 0.2, p99 1.1, max 2"]  # fmt: skip
    assert not any("not measured" in c for r in page.rows for c in r)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a" and (href := dict(attrs).get("href")):
            self.hrefs.append(href)


def links(text: str) -> list[str]:
    parser = _Links()
    parser.feed(text)
    return [h for h in parser.hrefs if not h.startswith("#")]


def test_a_load_run_links_locusts_report_beside_it(tmp_path: Path) -> None:
    summary = realistic_summary()
    summary["locust"] = {"html": "locust.html", "requests": 10}
    assert links(html_of(summary, tmp_path)) == ["locust.html"]
    assert links(html_of(realistic_summary(), tmp_path)) == []  # run mode: no Locust
    for unsafe in ("https://example.com/x.html", "../../etc/passwd", "C:\\x.html"):
        summary["locust"]["html"] = unsafe
        assert links(html_of(summary, tmp_path)) == [], unsafe


def test_the_page_fetches_nothing_in_any_shape_it_takes(tmp_path: Path) -> None:
    """Every shape of the page (run, load with Locust's link, explore, unmeasured, empty)
    names no resource a browser would fetch: no src, no stylesheet link, no script, no
    absolute href; the only URL is the SVG namespace."""
    load = realistic_summary()
    load["locust"] = {"html": "locust.html"}
    explore = realistic_summary()
    explore["mode"] = "explore"
    naive = explore["strategies"]["naive"]
    naive["first_violation"].update(
        schedule_id="naive.rc.cw.a5b4", replay="payrace explore --replay naive.rc.cw.a5b4"
    )
    waited = render_html([TimelineEvent(0, "webhook", "lock payment <waiting>")])
    explore["strategies"]["for_update"]["explore"] = {"timeline_html": waited}
    shapes = (realistic_summary(), load, explore, unmeasured_summary(), empty_summary())
    for summary in shapes:
        text = html_of(summary, tmp_path)
        for pattern in EXTERNAL:
            assert not pattern.search(text), pattern.pattern
        fetched = _Fetched()
        fetched.feed(text)
        assert fetched.found == [], fetched.found
        assert set(re.findall(r"https?://[^\s\"'<>]+", text)) <= {"http://www.w3.org/2000/svg"}


class _Fetched(HTMLParser):
    """Attributes a browser loads without a click, and links that leave the directory."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "srcset", "data", "poster", "background") or (
                tag in ("link", "script", "iframe", "object", "embed", "img")
            ):
                self.found.append(f"<{tag} {name}={value!r}>")
            if name == "href" and value and re.match(r"^([a-z]+:|//|/)", value, re.I):
                self.found.append(f"<{tag} href={value!r}>")


def test_an_explored_violation_names_its_schedule_and_the_command_that_replays_it(
    tmp_path: Path,
) -> None:
    summary = realistic_summary()
    summary["strategies"]["naive"]["first_violation"].update(
        schedule_id="naive.rc.cw.a5b4", replay="payrace explore --replay naive.rc.cw.a5b4"
    )
    page = cells(html_of(summary, tmp_path))
    assert "replay it: payrace explore --replay naive.rc.cw.a5b4" in page.paragraphs
    text = html_of(summary, tmp_path)
    assert "First violating schedule: trial 3, payment 17, schedule naive.rc.cw.a5b4 (" in text
