"""The locustfiles under real, short Locust runs through `payrace load` (loopback only).

Two runs, shared by the tests below:
- for_update, all three scenarios at once in one local Locust: exits 0, every invariant
  holds, and the lock wait and lock hold rows are in Locust's CSV and HTML;
- naive, race_pairs, `--processes 2`: exits 1 with the double captures it found, and the
  master's totals are the sum of both workers' reports.
And `payrace load --profile`: the reference service started by hand as a running target and
raced through a profile (its own, plus base_url): naive exits 1, for_update exits 0, a route
typo in the profile exits 2 naming the key to fix.

Locust itself never runs inside pytest (importing it would let gevent patch this process).
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import psutil
import pytest
from rich.console import Console

from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.processes import ServiceProcess, service_env
from payrace.harness.infra.provider import Database
from payrace.harness.load.launch import load_main
from payrace.harness.model import profile as profile_module

# Starts the whole stack and Locust: `make test-fast` skips these.
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Run:
    code: int
    dir: Path
    summary: dict[str, Any]
    output: str

    def stats_rows(self) -> list[dict[str, str]]:
        with (self.dir / "locust_stats.csv").open(newline="") as fh:
            return list(csv.DictReader(fh))

    def strategy(self) -> dict[str, Any]:
        (result,) = self.summary["strategies"].values()
        return dict(result)


# Every process a run here starts inherits this (os.environ is copied into each child), so
# the leak check finds Locust workers and uvicorn even after they were re-parented to init.
MARKER = ("PAYRACE_TEST_LOCUSTFILES_MARKER", uuid.uuid4().hex)


def _load(out: Path, pg: Database, **kwargs: Any) -> Run:
    """`payrace load` of the reference service it starts, on the session's PostgreSQL."""
    return _load_main(out, dsn=pg.url, workers=1, **kwargs)


def _load_main(out: Path, **kwargs: Any) -> Run:
    console = Console(file=io.StringIO(), width=240)
    os.environ[MARKER[0]] = MARKER[1]
    try:
        code = load_main(
            spawn_rate=20.0,
            run_time="3s",
            out_dir=out,
            console=console,
            extra_args=[],
            **kwargs,
        )
    finally:
        del os.environ[MARKER[0]]
    output = console.file.getvalue()  # type: ignore[attr-defined]
    (run_dir,) = out.iterdir()
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    return Run(code, run_dir, summary, output)


@pytest.fixture(scope="module")
def load_baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("baseline") / "load-baseline.json"


# A request's lock wait is part of that request's time: this gate holds on any machine.
HELD_GATE = "lock_max_ms<=request_max_ms"


@pytest.fixture(scope="module")
def for_update_run(
    pg: Database, tmp_path_factory: pytest.TempPathFactory, load_baseline: Path
) -> Run:
    return _load(
        tmp_path_factory.mktemp("for_update"),
        pg,
        strategy="for_update",
        users=9,
        processes=1,
        locustfile="race_pairs,webhook_storm,mixed",
        gates=[HELD_GATE, "violations<=0"],
        write_baseline=load_baseline,
    )


@pytest.fixture(scope="module")
def naive_run(pg: Database, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _load(
        tmp_path_factory.mktemp("naive"),
        pg,
        strategy="naive",
        users=8,
        processes=2,
        locustfile="race_pairs",
    )


# -- for_update ---------------------------------------------------------------------------


def test_for_update_under_load_exits_0_with_every_invariant_holding(for_update_run: Run) -> None:
    run = for_update_run
    assert run.code == 0, run.output
    assert run.summary["verdict"] == "valid" and run.summary["exit_code"] == 0
    result = run.strategy()
    assert result["expected"] == "valid" and result["valid"] is True
    assert result["trials"] > 20 and result["captures"] > 10
    for name in ("single_capture_write", "single_invoice_paid", "single_order_paid",
                 "gateway_capture_once", "no_lost_capture", "no_5xx"):  # fmt: skip
        check = result["checks"][name]
        assert check["valid"] is True and check["count"] == 0 and check["checked"] > 0, check
    # Read again once the service had stopped: its backends flushed, so zero is trusted.
    assert result["deadlocks"]["settled"] is True, result["deadlocks"]
    assert result["deadlocks"]["read"] == "after the service stopped"
    assert result["checks"]["no_deadlock"]["valid"] is True


def test_load_gates_are_judged_on_the_runs_figures(for_update_run: Run) -> None:
    gates = {g["expr"]: g for g in for_update_run.summary["gates"]}
    held = gates[HELD_GATE]
    assert held["passed"] is True and 0 < held["value"] <= held["threshold"]
    assert held["threshold_from"].endswith("(request_max_ms)")
    assert gates["violations<=0"]["passed"] is True
    assert f"gate {HELD_GATE} on for_update: measured" in for_update_run.output


def test_a_load_run_breaching_its_baseline_gate_exits_1(
    pg: Database, tmp_path: Path, for_update_run: Run, load_baseline: Path
) -> None:
    assert "baseline written to" in for_update_run.output
    run = _load(
        tmp_path, pg, strategy="for_update", users=4, processes=1, locustfile="race_pairs",
        gates=["request_p99_ms<=0.001*baseline"], baseline=load_baseline,
    )  # fmt: skip
    assert run.code == 1, run.output
    assert (run.summary["verdict"], run.summary["exit_code"]) == ("gate_breached", 1)
    (gate,) = run.summary["gates"]
    assert gate["passed"] is False and gate["value"] > gate["threshold"] > 0
    assert str(load_baseline) in gate["threshold_from"]
    assert all(r["valid"] is True for r in run.summary["strategies"].values())


def test_lock_and_hold_are_rows_of_their_own_in_locusts_csv(for_update_run: Run) -> None:
    rows = for_update_run.stats_rows()
    by_key = {(r["Type"], r["Name"]): r for r in rows}
    for request_type in ("LOCK", "HOLD"):
        for name in ("/payments/verify", "/webhooks/razorpay"):
            row = by_key[(request_type, name)]
            assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0, row
    # They bypass the request event: the Aggregated row counts HTTP requests only.
    http = sum(int(r["Request Count"]) for r in rows if r["Type"] not in ("LOCK", "HOLD", ""))
    assert int(by_key[("", "Aggregated")]["Request Count"]) == http


def test_lock_rows_are_in_locusts_html_report(for_update_run: Run) -> None:
    page = (for_update_run.dir / "locust.html").read_text()
    assert '"method": "LOCK"' in page or '"LOCK"' in page
    assert "HOLD" in page


def test_hdr_histograms_are_written_next_to_locusts_reports(for_update_run: Run) -> None:
    hdr = json.loads((for_update_run.dir / "latency_hdr.json").read_text())
    rows = {(r["Type"], r["Name"]): r for r in for_update_run.stats_rows()}
    for kind, request_type in (("lock", "LOCK"), ("hold", "HOLD")):
        for path, name in (("client", "/payments/verify"), ("webhook", "/webhooks/razorpay")):
            summary = hdr[kind][path]["summary"]
            assert hdr[kind][path]["hdr"]  # the encoded histogram, mergeable later
            # Locust's CSV is written once a second, so it may trail the final tally.
            assert summary["count"] >= int(rows[(request_type, name)]["Request Count"]) > 0
    assert for_update_run.strategy()["latency_ms"]["lock"]["all"]["count"] > 0


def test_every_scenario_ran_and_no_response_was_judged_a_failure(for_update_run: Run) -> None:
    names = {r["Name"] for r in for_update_run.stats_rows()}
    assert "/payments/[id]" in names  # mixed.py's status reads
    assert {"/orders", "/payments/verify", "/webhooks/razorpay [order.paid]"} <= names
    page = (for_update_run.dir / "locust.html").read_text()
    assert all(user in page for user in ("RacePairs", "WebhookStorm", "Shopper"))
    locust = for_update_run.summary["locust"]
    assert locust["failures"] == 0, locust["errors"]


def test_requests_released_together_reach_the_service_together(for_update_run: Run) -> None:
    spread = for_update_run.strategy()["arrival_spread_ms"]
    assert spread["count"] > 10
    # Loopback, one gevent loop turn apart; generous for a machine shared with other work.
    assert spread["p50"] < 50, spread


def test_reports_are_where_the_output_says(for_update_run: Run) -> None:
    for name in ("summary.json", "report.html", "junit.xml", "locust.html", "locust.log"):
        assert (for_update_run.dir / name).is_file(), name
        assert name in for_update_run.output
    assert f"reports: {for_update_run.dir}" in for_update_run.output
    cpu = for_update_run.summary["cpu"]
    assert {"locust", "service", "postgres"} <= set(cpu["groups"])


# -- naive, two Locust worker processes ---------------------------------------------------


def test_naive_under_load_exits_1_and_reports_the_double_captures(naive_run: Run) -> None:
    run = naive_run
    assert run.code == 1, run.output
    assert run.summary["verdict"] == "violated"
    result = run.strategy()
    assert result["expected"] == "violated" and result["valid"] is False
    double = result["checks"]["single_capture_write"]
    assert double["valid"] is False and double["count"] > 0
    assert len(double["first"]["txids"]) >= 2  # two transactions wrote captured
    assert result["checks"]["single_invoice_paid"]["count"] > 0
    assert result["first_violation"]["payment"] in double["payments"]
    assert "single_capture_write" in run.output


def test_master_totals_include_both_workers(naive_run: Run) -> None:
    locust = naive_run.summary["locust"]
    workers = locust["workers"]
    assert locust["worker_count"] == 2, workers
    assert len({w["pid"] for w in workers.values()}) == 2
    assert all(w["requests"] > 0 and w["payments"] > 0 for w in workers.values()), workers
    # Each worker's count travels in the same report as its Locust stats, so the master's
    # own total is exactly their sum.
    assert locust["requests"] == sum(w["requests"] for w in workers.values())
    assert naive_run.strategy()["trials"] == sum(w["payments"] for w in workers.values())


def test_no_locust_or_service_process_outlives_the_runs(
    for_update_run: Run, naive_run: Run
) -> None:
    # The embedded PostgreSQL is the session fixture's; everything else was payrace load's,
    # found by the marker in its environment, wherever it was re-parented to.
    left = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.environ().get(MARKER[0]) != MARKER[1]:
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            left.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.Error:
            continue
    assert left == []


# -- payrace load --profile: a running service -------------------------------------------


def _profile(tmp_path: Path, base_url: str, **changes: str) -> Path:
    """The reference service's own profile plus its base URL, some lines changed, as a team
    would write it for its service."""
    text = (Path(profile_module.__file__).parent.parent / "profiles/reference.toml").read_text()
    changes = {'name = "reference"': f'name = "shop"\nbase_url = "{base_url}"', **changes}
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "shop.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _profile_load(
    tmp_path: Path,
    pg: Database,
    gateway_url: str,
    strategy: str,
    *,
    changes: dict[str, str] | None = None,
    **kwargs: Any,
) -> Run:
    """The reference service started by hand (its pool stays open all along), then
    `payrace load --profile` against it, as a team would race its own running service."""
    env = {**service_env(pg, gateway_url, strategy, keys=GatewayKeys()), MARKER[0]: MARKER[1]}
    with ServiceProcess(env, log_path=tmp_path / "service.log") as service:
        run = _load_main(
            tmp_path / "reports",
            profile=_profile(tmp_path, service.url, **(changes or {})),
            target_dsn=pg.url,
            gateway_url=gateway_url,
            strategy=None,
            workers=None,
            dsn=None,
            processes=1,
            locustfile="race_pairs",
            **kwargs,
        )
        assert service.proc is not None and service.proc.poll() is None  # never stopped
    return run


@pytest.fixture(scope="module")
def naive_profile_run(
    pg: Database, gateway_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Run:
    # A violation decides whatever the deadlock reading says: the gate does not wait for it
    # to settle (no --settle-s given: the running target's default would be 15 s).
    return _profile_load(
        tmp_path_factory.mktemp("naive_profile"), pg, gateway_url, "naive", users=4
    )


def test_a_running_naive_service_raced_through_its_profile_exits_1(naive_profile_run: Run) -> None:
    run = naive_profile_run
    assert run.code == 1, run.output
    assert (run.summary["verdict"], run.summary["exit_code"]) == ("violated", 1)
    result = run.summary["strategies"]["shop"]  # named after the profile
    assert result["expected"] == "valid"  # a running target is expected valid unless told
    double = result["checks"]["single_capture_write"]
    assert double["valid"] is False and double["count"] > 0, double
    no_deadlock = result["checks"]["no_deadlock"]
    # Read once, right after the window, while the service's pool holds its backends: not
    # settled, and not waited for (a deadlock counted already would make it False).
    assert no_deadlock["valid"] in ("unknown", False), no_deadlock
    if no_deadlock["valid"] == "unknown":
        assert no_deadlock["note"].startswith("not waited for: the run is violated already")
    assert run.summary["database"]["route"] == "target"
    assert "--profile" in run.summary["command"] and run.summary["setup_errors"] == []
    # Locust's rows are the profile's route templates, and nothing failed as a setup mistake.
    names = {r["Name"] for r in run.stats_rows()}
    assert {"/orders", "/payments/verify"} <= names
    groups = set(run.summary["cpu"]["groups"])
    assert "locust" in groups and not groups & {"service", "postgres"}  # not payrace's


def test_a_running_correct_service_raced_through_its_profile_exits_0(
    pg: Database, gateway_url: str, tmp_path: Path
) -> None:
    """Its pool is never closed: the gate waits out the statistics flush of its idle
    backends once (the default --settle-s for a running target), and no_deadlock decides."""
    run = _profile_load(tmp_path, pg, gateway_url, "for_update", users=4, expect="valid")
    assert run.code == 0, run.output
    assert (run.summary["verdict"], run.summary["exit_code"]) == ("valid", 0)
    result = run.summary["strategies"]["shop"]
    assert result["valid"] is True and result["trials"] > 5
    assert result["checks"]["no_deadlock"]["valid"] is True
    assert result["checks"]["single_capture_write"]["checked"] > 0


def test_a_route_typo_in_the_profile_exits_2_naming_the_key(
    pg: Database, gateway_url: str, tmp_path: Path
) -> None:
    run = _profile_load(
        tmp_path,
        pg,
        gateway_url,
        "for_update",
        users=2,
        settle_s=0,
        changes={'path = "/payments/verify"': 'path = "/payment/verify"'},
    )
    assert run.code == 2, run.output
    assert run.summary["verdict"] == "setup_error"
    (mistake,) = run.summary["setup_errors"]
    assert "POST /payment/verify with HTTP 404" in mistake
    assert "check [callback].path" in mistake and "shop.toml" in mistake
    assert "setup mistake" in run.output and "[callback].path" in run.output


class _Anchors(HTMLParser):
    """The hrefs of a page, and the text of payrace's verdict block in Locust's page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.verdict = ""
        self._depth = 0  # > 0 inside div#payrace-verdict

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "a" and attr.get("href"):
            self.hrefs.append(str(attr["href"]))
        if tag == "div" and (self._depth or attr.get("id") == "payrace-verdict"):
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self._depth:
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._depth:
            self.verdict += data


def _anchors(path: Path) -> _Anchors:
    parser = _Anchors()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.mark.parametrize("which", ["for_update_run", "naive_run"])
def test_payraces_and_locusts_reports_link_each_other_and_agree(
    which: str, request: pytest.FixtureRequest
) -> None:
    run: Run = request.getfixturevalue(which)
    assert "locust.html" in _anchors(run.dir / "report.html").hrefs
    locust = _anchors(run.dir / "locust.html")
    assert "report.html" in locust.hrefs
    verdict, code = run.summary["verdict"], run.summary["exit_code"]
    assert f"payrace oracle: {verdict} (exit code {code})" in " ".join(locust.verdict.split())
    assert run.summary["locust"]["html"] == "locust.html"
