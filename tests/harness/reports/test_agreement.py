"""One verdict everywhere: for `payrace run`, `race`, `explore` and `load`, and for each outcome
the command can reach (valid, violated, gate breached, unknown, as declared, an untrustworthy
run), the exit code, summary.json, junit.xml, the report.html header and the console agree.

Each case runs the real command as a user does (its Typer app with the user's arguments and
environment, in this process to spare a new interpreter's imports: cli_inproc; the session's
PostgreSQL) and reads every signal back; none of them is built by hand. "Unknown" is provoked
as it happens to a team: a running target keeps its connection pool open and `--settle-s 0`
gives the oracle no time to let PostgreSQL's deadlock count settle, so no_deadlock cannot
decide.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_inproc import payrace_cli

from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.processes import ServiceProcess, service_env
from payrace.harness.infra.provider import Database
from payrace.harness.model import profile as profile_module
from payrace.harness.model.verdict import DECLARED, RunOutcome

SCENARIOS = Path(__file__).resolve().parents[3] / "scenarios"


@dataclass
class Signals:
    exit_code: int
    summary: dict[str, Any]
    junit_red: int  # failures + errors
    header: str  # report.html's <h1>, tags stripped
    header_class: str  # pass | fail | unknown
    console: str
    run_dir: Path


def payrace(pg: Database, out: Path, *args: str) -> Signals:
    env = {**os.environ, "PAYRACE_DSN": pg.url, "COLUMNS": "200"}
    done = payrace_cli(*args, "--quiet", "--out", str(out), env=env)
    console = done.stdout + done.stderr
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    root = ET.parse(run_dir / "junit.xml").getroot()
    html = (run_dir / "report.html").read_text()
    h1 = re.search(r"<h1>(.*?)</h1>", html, re.S)
    assert h1 is not None, html[:500]
    css = re.search(r'<span class="(\w+)">', h1.group(1))
    assert css is not None
    return Signals(
        exit_code=done.returncode,
        summary=summary,
        junit_red=int(root.get("failures", "0")) + int(root.get("errors", "0")),
        header=re.sub(r"<[^>]+>", "", h1.group(1)),
        header_class=css.group(1),
        console=console,
        run_dir=run_dir,
    )


def assert_agree(signals: Signals, verdict: str, exit_code: int) -> None:
    said = RunOutcome.of(signals.summary)
    assert (signals.exit_code, said.exit_code, said.verdict) == (exit_code, exit_code, verdict), (
        signals.console[-3000:]
    )
    assert (signals.junit_red > 0) is (exit_code != 0), signals.console[-3000:]
    assert signals.header.endswith(f": {said.line()}"), signals.header
    assert signals.header_class == (
        "pass" if exit_code == 0 else ("unknown" if verdict == "unknown" else "fail")
    )
    assert f"verdict: {said.line()}" in " ".join(signals.console.split())
    # the last line of every command that wrote reports says where they are
    assert signals.console.rstrip().splitlines()[-1] == f"reports: {signals.run_dir}"


# -- payrace run -------------------------------------------------------------------------


@pytest.mark.slow
def test_run_valid(pg: Database, tmp_path: Path) -> None:
    signals = payrace(pg, tmp_path, "run", "--strategy", "for_update", "--trials", "3")
    assert_agree(signals, "valid", 0)


@pytest.mark.slow
def test_run_violated_also_for_a_strategy_declared_unsafe(pg: Database, tmp_path: Path) -> None:
    signals = payrace(pg, tmp_path, "run", "--strategy", "naive", "--trials", "3")
    assert_agree(signals, "violated", 1)
    assert signals.summary["strategies"]["naive"]["expected"] == "violated"
    root = ET.parse(signals.run_dir / "junit.xml").getroot()
    failure = next(c for c in root.iter("testcase") if c.get("name") == "single_capture_write")
    message = failure.find("failure")
    assert message is not None
    assert message.get("message", "").startswith(
        "single_capture_write: 3 of 3 payments captured by more than one transaction; first: "
        "payment "
    )
    assert float(failure.get("time", "0")) > 0


@pytest.mark.slow
def test_run_gate_breached(pg: Database, tmp_path: Path) -> None:
    signals = payrace(
        pg, tmp_path, "run", "--strategy", "for_update", "--trials", "3", "--gate", "lock_max_ms<0"
    )
    assert_agree(signals, "gate_breached", 1)


@pytest.fixture(scope="module")
def pooled_target(pg: Database, gateway_url: str) -> Iterator[str]:
    """The reference service in its own process, its connection pool open: a running target.
    One for the module: both tests that race it only need it running (each run makes its own
    payments), and a start costs ~1.1 s of CPU."""
    env = service_env(pg, gateway_url, "for_update", keys=GatewayKeys(), probes=True)
    with ServiceProcess(env) as proc:
        yield proc.url


@pytest.mark.slow
def test_run_unknown_when_the_oracle_cannot_decide(
    pg: Database, gateway_url: str, pooled_target: str, tmp_path: Path
) -> None:
    signals = payrace(
        pg, tmp_path, "run", "--target", pooled_target,
        "--target-dsn", pg.url, "--gateway-url", gateway_url, "--trials", "2",
        "--settle-s", "0",
    )  # fmt: skip
    assert_agree(signals, "unknown", 1)
    (result,) = signals.summary["strategies"].values()
    check = result["checks"]["no_deadlock"]
    assert check["valid"] == "unknown" and "--settle-s" in check["note"]


# -- payrace race --------------------------------------------------------------------------


@pytest.mark.slow
def test_race_as_declared_is_green_with_naive_caught(pg: Database, tmp_path: Path) -> None:
    # Enough trials per strategy and mode that naive is caught when released together too.
    signals = payrace(pg, tmp_path, "race", "--trials", "6")
    assert_agree(signals, "as_declared", 0)
    naive = signals.summary["strategies"]["naive.forced"]
    assert naive["valid"] is False and naive["as_declared"] is True
    # every declared strategy in both modes, one report
    assert len(signals.summary["strategies"]) == 2 * len(DECLARED)


# -- payrace explore -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "verdict", "exit_code"),
    [
        (["--strategy", "for_update"], "valid", 0),
        (["--strategy", "naive"], "violated", 1),
        (["--scenario", str(SCENARIOS / "seed.toml")], "as_declared", 0),
        # a schedule this service cannot follow: the run cannot be trusted
        (["--strategy", "for_update", "--replay", "for_update.rc.cw.ab2a5"], "error", 2),
    ],
)
def test_explore(
    pg: Database, tmp_path: Path, args: list[str], verdict: str, exit_code: int
) -> None:
    assert_agree(payrace(pg, tmp_path, "explore", *args), verdict, exit_code)


# -- payrace load --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "verdict", "exit_code"),
    [("for_update", "valid", 0), ("naive", "violated", 1)],
)
def test_load(pg: Database, tmp_path: Path, strategy: str, verdict: str, exit_code: int) -> None:
    signals = payrace(
        pg, tmp_path, "load", "--strategy", strategy, "-u", "4", "-r", "4", "-t", "2s",
    )  # fmt: skip
    assert_agree(signals, verdict, exit_code)


@pytest.mark.slow
def test_load_gate_breached(pg: Database, tmp_path: Path) -> None:
    signals = payrace(
        pg, tmp_path, "load", "--strategy", "for_update", "-u", "4", "-r", "4", "-t", "2s",
        "--gate", "lock_max_ms<0",
    )  # fmt: skip
    assert_agree(signals, "gate_breached", 1)


@pytest.mark.slow
def test_load_unknown_when_the_oracle_cannot_decide(
    pg: Database, gateway_url: str, pooled_target: str, tmp_path: Path
) -> None:
    """A running target raced through its profile: its pool stays open and --settle-s 0 gives
    the deadlock count no time to settle. Unknown under load means the gate could not observe
    what it must: exit 2, as `payrace load` documents."""
    reference = Path(profile_module.__file__).parent.parent / "profiles" / "reference.toml"
    text = reference.read_text().replace(
        'name = "reference"', f'name = "shop"\nbase_url = "{pooled_target}"'
    )
    profile = tmp_path / "shop.toml"
    profile.write_text(text, encoding="utf-8")
    out = tmp_path / "reports"
    out.mkdir()
    signals = payrace(
        pg, out, "load", "--profile", str(profile), "--target-dsn", pg.url,
        "--gateway-url", gateway_url, "--settle-s", "0", "-u", "2", "-r", "2", "-t", "2s",
    )  # fmt: skip
    assert_agree(signals, "unknown", 2)
    assert signals.summary["strategies"]["shop"]["checks"]["no_deadlock"]["valid"] == "unknown"
