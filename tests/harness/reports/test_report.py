"""reports.report: summary.json, junit.xml, report.html and the console, from one summary."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import signal
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from payrace.harness.model.stats import PathHistograms
from payrace.harness.reports.report import (
    outcome,
    render_console,
    write_all,
    write_html,
    write_junit,
)
from payrace.harness.reports.timeline import TimelineEvent, render_html

TIMELINE = [
    {"time_ns": 100, "process": "client", "text": "read payment (pending)"},
    {"time_ns": 200, "process": "webhook-1", "text": "read payment (pending)"},
    {"time_ns": 300, "process": "client", "text": "status pending: capture"},
    {"time_ns": 400, "process": "webhook-1", "text": "status pending: capture"},
    {"time_ns": 500, "process": "client", "text": "update payment = captured"},
    {"time_ns": 600, "process": "webhook-1", "text": "update payment = captured"},
    {"time_ns": 700, "process": "client", "text": "update invoice = paid"},
    {"time_ns": 800, "process": "webhook-1", "text": "update invoice = paid <dup>"},
]


def measured(seed: int, lock_scale_ms: float, trials: int) -> PathHistograms:
    """Latencies shaped like a real run: most lock waits tiny, the loser of each race
    waiting for the winner's whole hold."""
    rng = random.Random(seed)
    paths = PathHistograms()
    for _ in range(trials):
        hold = rng.uniform(2.0, 8.0)
        winner, loser = rng.sample(["client", "webhook"], 2)
        paths.record("lock", winner, rng.uniform(0.01, 0.05))
        paths.record("lock", loser, hold * lock_scale_ms + rng.uniform(0.0, 0.3))
        paths.record("hold", winner, hold)
        paths.record("hold", loser, rng.uniform(0.2, 0.5))
        for path in ("client", "webhook"):
            paths.record("request", path, hold + rng.uniform(1.0, 4.0))
    return paths


def check(name: str, valid: object, count: int, checked: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "valid": valid,
        "count": count,
        "checked": checked,
        "first": extra.get("first"),
        "worst": extra.get("worst"),
        "last": extra.get("last"),
        "note": extra.get("note", ""),
    }


def strategy(expected: str, valid: object, paths: PathHistograms, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "expected": expected,
        "valid": valid,
        "trials": 50,
        "violating_trials": 0,
        "trials_per_second": 41.7,
        "duration_s": 1.2,
        "checks": {},
        "latency_ms": paths.summary(),
        "plots": paths.plots(),
        "server_side": {"samples": 40, "waiting_max": 1, "waiting_seen": 12},
        "arrival_spread_ms": None,
        "first_violation": None,
    }
    doc.update(extra)
    return doc


def realistic_summary() -> dict[str, Any]:
    duplicate = {"payment": 17, "trial": 3, "writes": 2, "processes": ["client", "webhook-1"]}
    naive = strategy(
        "violated",
        False,
        measured(1, 0.0, 50),  # naive takes no lock: waits are ~0
        violating_trials=50,
        checks={
            "single_capture_write": check(
                "single_capture_write", False, 50, 50, first=duplicate, worst=duplicate
            ),
            "single_invoice_paid": check("single_invoice_paid", False, 50, 50, first=duplicate),
            "no_5xx": check("no_5xx", True, 0, 100),
        },
        first_violation={
            "trial": 3,
            "payment": 17,
            "checks": ["single_capture_write", "single_invoice_paid"],
            "timeline": TIMELINE,
        },
    )
    for_update = strategy(
        "valid",
        True,
        measured(2, 1.0, 50),
        checks={
            "single_capture_write": check("single_capture_write", True, 0, 50),
            "single_invoice_paid": check("single_invoice_paid", True, 0, 50),
            "no_deadlock": check("no_deadlock", True, 0, 50),
        },
        arrival_spread_ms={"count": 50, "p50": 0.2, "p99": 1.1, "max": 2.0},
    )
    return {
        "run_id": "20261126-101500-forced",
        "command": "payrace run --strategy naive,for_update --mode forced --trials 50",
        "started_at": "2026-11-26T10:15:00+00:00",
        "duration_s": 3.4,
        "machine": {"hostname": "ci-1", "cpus": 2, "python": "3.11.7", "platform": "Linux"},
        "database": {"route": "embedded", "server_version": "16.2", "fast": True},
        "target": "inproc",
        "mode": "forced",
        "trials": 50,
        "seed": 1,
        "webhooks_per_trial": 1,
        "strategies": {"naive": naive, "for_update": for_update},
        "gates": [
            {"expr": "lock_p99_ms<=100", "strategy": "for_update", "value": 9.1, "passed": True}
        ],
        "verdict": "valid",
        "exit_code": 0,
    }


def empty_summary() -> dict[str, Any]:
    return {
        "run_id": "empty",
        "trials": 0,
        "strategies": {
            "for_update": {
                "expected": "valid",
                "valid": "unknown",
                "trials": 0,
                "violating_trials": 0,
                "checks": {},
                "latency_ms": {},
                "plots": {},
                "arrival_spread_ms": None,
                "first_violation": None,
            }
        },
        "gates": [],
        "verdict": "unexpected",
        "exit_code": 1,
    }


def cases(root: ET.Element) -> dict[str, ET.Element]:
    return {f"{c.get('classname')}/{c.get('name')}": c for c in root.iter("testcase")}


# ---------------------------------------------------------------------------- outcome


@pytest.mark.parametrize(
    ("expected", "valid", "passed"),
    [
        ("violated", False, True),
        ("violated", True, False),
        ("valid", False, False),
        ("valid", True, True),
        (None, False, False),
        ("valid", "unknown", None),
        ("violated", "unknown", None),
    ],
)
def test_outcome_judges_against_the_declaration(
    expected: str | None, valid: object, passed: bool | None
) -> None:
    assert outcome({"expected": expected, "valid": valid}).passed is passed


# ---------------------------------------------------------------------------- write_all, JSON


def test_write_all_writes_three_files_and_json_round_trips(tmp_path: Path) -> None:
    summary = realistic_summary()
    written = write_all(summary, tmp_path / "run")
    assert set(written) == {"summary", "junit", "html"}
    assert [p.name for p in written.values()] == ["summary.json", "junit.xml", "report.html"]
    assert json.loads(written["summary"].read_text()) == summary
    assert not list((tmp_path / "run").glob(".*"))  # no temp files left behind


def test_json_refuses_nan_rather_than_writing_invalid_json(tmp_path: Path) -> None:
    summary = realistic_summary()
    summary["duration_s"] = float("nan")
    with pytest.raises(ValueError):
        write_all(summary, tmp_path)


# ---------------------------------------------------------------------------- JUnit


def test_junit_mirrors_the_cli_verdict(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    write_junit(realistic_summary(), path)
    root = ET.parse(path).getroot()
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert set(suites) == {"payrace.naive", "payrace.for_update"}
    found = cases(root)
    # declared unsafe and caught: passing "caught:" cases, no failures
    assert "payrace.naive/caught:violation" in found
    assert "payrace.naive/caught:single_capture_write" in found
    assert "payrace.naive/caught:single_invoice_paid" in found
    assert "payrace.naive/no_5xx" in found
    assert "payrace.for_update/gate:lock_p99_ms<=100" in found
    assert root.get("failures") == "0" and root.get("errors") == "0"
    for suite in suites.values():
        assert int(suite.get("tests", "0")) == len(suite.findall("testcase"))
        assert suite.get("failures") == "0"
    assert root.get("tests") == str(len(found)) == "8"
    # the schedule that did it travels with the run and with the catching case
    suite_out = suites["payrace.naive"].find("system-out")
    assert suite_out is not None and "T7" in (suite_out.text or "")
    case_out = found["payrace.naive/caught:single_capture_write"].find("system-out")
    assert case_out is not None and "update invoice = paid <dup>" in (case_out.text or "")


def test_junit_fails_a_violated_safe_strategy_and_a_missed_race(tmp_path: Path) -> None:
    summary = realistic_summary()
    naive, fixed = summary["strategies"]["naive"], summary["strategies"]["for_update"]
    # the "fix" double-captured, and the bug went unprovoked
    fixed["valid"] = False
    fixed["checks"]["single_capture_write"] = check(
        "single_capture_write", False, 2, 50, first={"payment": 9}
    )
    fixed["checks"]["no_deadlock"] = check("no_deadlock", "unknown", 0, 0, note="no counter")
    naive["valid"] = True
    for name in ("single_capture_write", "single_invoice_paid"):
        naive["checks"][name] = check(name, True, 0, 50)
    naive["first_violation"] = None
    summary["gates"] = [
        {"expr": "lock_p99_ms<=1", "strategy": "for_update", "value": 9.1, "passed": False},
        {"expr": "hold_p99_ms<=5", "strategy": "missing", "value": None, "passed": False},
    ]
    path = tmp_path / "junit.xml"
    write_junit(summary, path)
    root = ET.parse(path).getroot()
    found = cases(root)

    failure = found["payrace.for_update/single_capture_write"].find("failure")
    assert failure is not None
    assert "2 of 50" in failure.get("message", "") and '"payment": 9' in failure.get("message", "")
    assert found["payrace.for_update/no_deadlock"].find("error") is not None
    assert found["payrace.naive/caught:violation"].find("failure") is not None
    assert not any(name.startswith("payrace.naive/caught:single") for name in found)
    assert found["payrace.for_update/gate:lock_p99_ms<=1"].find("failure") is not None
    assert found["payrace.gates/gate:hold_p99_ms<=5"].find("error") is not None

    failures = sum(1 for c in found.values() if c.find("failure") is not None)
    errors = sum(1 for c in found.values() if c.find("error") is not None)
    assert (failures, errors) == (3, 2)
    assert root.get("failures") == "3" and root.get("errors") == "2"
    assert sum(int(s.get("failures", "0")) for s in root.iter("testsuite")) == 3


def test_junit_of_a_run_that_checked_nothing_is_not_green(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    write_junit(empty_summary(), path)
    root = ET.parse(path).getroot()
    assert root.get("tests") == "1" and root.get("errors") == "1"


# ---------------------------------------------------------------------------- HTML

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
    console = Console(record=True, width=160)
    render_console(summary, console)
    assert "unknown" in console.export_text()
    bare: dict[str, Any] = {"strategies": {}}
    write_all(bare, tmp_path / "bare")
    render_console(bare, Console(record=True, width=160))


# ---------------------------------------------------------------------------- console


def test_console_shows_verdicts_checks_timeline_gates_and_paths(tmp_path: Path) -> None:
    summary = realistic_summary()
    console = Console(record=True, width=160)
    written = write_all(summary, tmp_path)
    render_console(summary, console, paths=written)
    text = console.export_text()
    assert "violated, as declared" in text
    assert "valid" in text
    assert "violated (caught)" in text
    assert "single_capture_write" in text
    assert "first violation: naive, trial 3" in text
    assert "read payment (pending)" in text and "T7" in text
    assert "update invoice = paid <dup>" in text  # rich markup not interpreted
    assert "gate lock_p99_ms<=100 on for_update: measured 9.1 passed" in text
    assert str(written["html"]) in text
    assert "verdict: valid (exit code 0)" in text


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
