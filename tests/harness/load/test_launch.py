"""payrace/harness/load/launch.py: arguments, the plan, usage errors, and that no process outlives
`payrace load` (Ctrl-C in the middle of a run, and a run whose Locust fails)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from html.parser import HTMLParser
from pathlib import Path
from typing import cast

import psutil
import pytest
from rich.console import Console

from payrace.harness.errors import UsageError
from payrace.harness.infra.processes import free_port
from payrace.harness.infra.provider import Database
from payrace.harness.load.gate import LoadSettings
from payrace.harness.load.launch import (
    LOCUSTFILES,
    LoadArgs,
    LoadPlan,
    load_main,
    locust_processes,
    mark_locust_report,
    parse_run_time,
    resolve_locustfile,
)
from payrace.harness.load.worker import RUNNING_TARGET_SETTLE_S

ROOT = Path(__file__).resolve().parents[3]
MARKER = "PAYRACE_TEST_LOAD_MARKER"
# The smallest run; each test names what it changes.
SMALL: dict[str, object] = {
    "strategy": "for_update",
    "users": 1,
    "spawn_rate": 1.0,
    "run_time": "30s",
    "processes": 1,
    "workers": 1,
    "dsn": None,
    "locustfile": "race_pairs",
}


# -- arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("45s", 45), ("1m30s", 90), ("2h", 7200), ("1h1m1s", 3661)]
)
def test_run_time_reads_locusts_syntax(text: str, seconds: float) -> None:
    assert parse_run_time(text) == seconds


@pytest.mark.parametrize("text", ["", "1.5m", "ten", "30 s", "s"])
def test_run_time_rejects_what_locust_would(text: str) -> None:
    with pytest.raises(UsageError, match="run time"):
        parse_run_time(text)


def test_locustfile_resolves_a_scenario_name_a_path_and_a_list() -> None:
    race = str(LOCUSTFILES / "race_pairs.py")
    assert resolve_locustfile("race_pairs") == race
    assert resolve_locustfile(race) == race
    assert resolve_locustfile("race_pairs, mixed").split(",") == [
        race,
        str(LOCUSTFILES / "mixed.py"),
    ]


def test_unknown_locustfile_names_the_scenarios_there_are() -> None:
    with pytest.raises(UsageError, match="race_pairs, webhook_storm"):
        resolve_locustfile("nope")
    with pytest.raises(UsageError, match="not found"):
        resolve_locustfile("_payrace")  # the helper module is not a scenario


def test_processes_one_means_one_local_locust() -> None:
    assert locust_processes(0) == locust_processes(1) == []
    assert locust_processes(4) == ["--processes", "4"]
    assert locust_processes(-1) == ["--processes", "-1"]
    with pytest.raises(UsageError):
        locust_processes(-2)


def test_plan_builds_the_locust_command_with_reports_in_the_run_dir(tmp_path: Path) -> None:
    plan = LoadPlan.build(
        strategy="naive",
        users=50,
        spawn_rate=12.5,
        run_time="1m",
        processes=2,
        workers=3,
        dsn=None,
        locustfile="webhook_storm",
        out_dir=tmp_path,
        extra_args=["--stop-timeout", "2"],
    )
    assert plan.run_dir.parent == tmp_path and plan.run_dir.name.endswith("-naive-webhook_storm")
    cmd = plan.locust_cmd("http://127.0.0.1:1", master_port=6123)
    assert cmd[1:3] == ["-m", "locust"] and "--headless" in cmd
    flags = [("-u", "50"), ("-r", "12.5"), ("-t", "1m"), ("--processes", "2")]
    # Not Locust's default 5557: two runs on one machine must not collide.
    flags += [("--master-bind-host", "127.0.0.1"), ("--master-bind-port", "6123")]
    for flag, value in [*flags, ("--master-port", "6123")]:
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[cmd.index("--html") + 1] == str(plan.run_dir / "locust.html")
    assert cmd[cmd.index("--csv") + 1] == str(plan.run_dir / "locust")
    assert cmd[-2:] == ["--stop-timeout", "2"]
    # 3 workers x (pool + overflow) stays under a default max_connections of 100.
    pool = plan.service_pool()
    assert 3 * (int(pool["DB_POOL_SIZE"]) + int(pool["DB_MAX_OVERFLOW"])) <= 90


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "fastest"}, "--strategy"),
        ({"users": 0}, "--users"),
        ({"spawn_rate": 0.0}, "--spawn-rate"),
        ({"run_time": "soon"}, "run time"),
        ({"run_time": "0s"}, "longer than zero"),
        ({"workers": 0}, "--workers"),
        ({"locustfile": "missing_scenario"}, "not found"),
        ({"processes": -5}, "--processes"),
        ({"gates": ["for_updte:lock_p99_ms<=5"]}, "did you mean 'for_update:lock_p99_ms<=5'"),
        ({"gates": ["naive:lock_p99_ms<=5"]}, "add --strategy naive"),
        ({"gates": ["lock_p99<=5"]}, "did you mean 'lock_p99_ms'"),
        ({"gates": ["lock_p99_ms<=1.5*baseline"]}, "give --baseline FILE"),
        (
            {"gates": ["lock_p99_ms<=1.5*baseline"], "baseline": Path("/nonexistent/b.json")},
            "no such file",
        ),
    ],
)
def test_usage_errors_exit_2_before_anything_starts(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    args = cast(LoadArgs, {**SMALL, "out_dir": tmp_path, "extra_args": [], **changes})
    out = io.StringIO()
    code = load_main(console=Console(file=out, width=200), **args)
    assert code == 2
    assert message in out.getvalue()
    assert list(tmp_path.iterdir()) == []  # no run directory, no database, no process


def test_the_plan_hands_its_gates_and_baseline_to_locust(tmp_path: Path) -> None:
    base = tmp_path / "baseline.json"
    stats = {"count": 9, "p99": 4.0}
    strategies = {"for_update": {"latency_ms": {"request": {"all": stats}}}}
    base.write_text(json.dumps({"run_id": "b", "mode": "load", "strategies": strategies}))
    gates = ["lock_p99_ms<=3*hold_p99_ms", "request_p99_ms<=2*baseline"]
    args = {**SMALL, "out_dir": tmp_path, "extra_args": [], "gates": gates, "baseline": base}
    plan = LoadPlan.build(**cast(LoadArgs, args))
    assert [g.expr for g in plan.gates] == gates and plan.baseline is not None
    settings = LoadSettings.from_env(plan.settings("http://127.0.0.1:1", "postgresql://x").to_env())
    assert settings.gates == tuple(gates) and settings.baseline == base.resolve()
    # The service payrace load starts is stopped before the deadlock counter's deciding
    # reading, so the gate inside Locust does not wait for it to settle; --settle-s still does.
    assert settings.settle_timeout_s() == 0.0
    waiting = LoadPlan.build(**cast(LoadArgs, {**args, "settle_s": 3.0}))
    assert waiting.settings("http://gw", "postgresql://db").settle_timeout_s() == 3.0
    assert "--gate 'lock_p99_ms<=3*hold_p99_ms'" in plan.command  # the reports say what was asked
    locust = plan.locust_cmd("http://127.0.0.1:1")
    assert "--gate" not in locust and "--baseline" not in locust  # Locust never sees them
    # A baseline taken by `payrace run` (forced mode) is no measure of a load run.
    base.write_text(json.dumps({"run_id": "b", "mode": "forced", "strategies": strategies}))
    with pytest.raises(UsageError, match="measured in forced mode and this run is load"):
        LoadPlan.build(**cast(LoadArgs, args))


# -- a running target described by a profile ---------------------------------------------


def _shop(tmp_path: Path, base_url: str | None = "http://127.0.0.1:1", **changes: str) -> Path:
    """The reference service's profile as a team would write it for its running service."""
    text = (ROOT / "payrace/harness/profiles/reference.toml").read_text()
    target = 'name = "shop"' + (f'\nbase_url = "{base_url}"' if base_url else "")
    for old, new in {'name = "reference"': target, **changes}.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "shop.toml"
    path.write_text(text, encoding="utf-8")
    return path


# The smallest profile run; the reference service's own options are left unset.
PROFILE_RUN: dict[str, object] = {
    **SMALL,
    "strategy": None,
    "workers": None,
    "target_dsn": "postgresql://shop@127.0.0.1:1/shop",
    "gateway_url": "http://127.0.0.1:1",
}


def _load_profile(tmp_path: Path, **changes: object) -> tuple[int, str]:
    args = {**PROFILE_RUN, "out_dir": tmp_path / "out", "extra_args": [], **changes}
    if "profile" not in changes:
        args["profile"] = _shop(tmp_path)
    out = io.StringIO()
    code = load_main(console=Console(file=out, width=300), **cast(LoadArgs, args))
    return code, out.getvalue()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "naive"}, "--strategy picks a flow of the reference service"),
        ({"workers": 2}, "--workers sets the reference service's uvicorn workers"),
        ({"dsn": "postgresql://127.0.0.1/x"}, "--dsn picks the PostgreSQL server payrace"),
        ({"durable": True}, "--durable sets the throwaway cluster"),
        ({"target_dsn": None}, "--profile needs --target-dsn"),
        ({"gateway_url": None}, "--profile needs --target-dsn"),
        ({"gateway_url": "127.0.0.1:9411"}, "--gateway-url must be a URL"),
        ({"target": "ftp://shop"}, "--target must be a URL"),
        ({"expect": "fine"}, "--expect must be valid or violated"),
        ({"settle_s": -1.0}, "--settle-s"),
        ({"gates": ["for_update:violations<=0"]}, "named after its profile, 'shop'"),
        ({"gates": ["shpo:violations<=0"]}, "did you mean 'shop:violations<=0'"),
    ],
)
def test_a_profile_run_refuses_what_a_running_target_cannot_honour(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    code, said = _load_profile(tmp_path, **changes)
    assert code == 2
    assert message in said
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_a_profile_without_a_base_url_asks_for_one_or_target(tmp_path: Path) -> None:
    code, said = _load_profile(tmp_path, profile=_shop(tmp_path, base_url=None))
    assert code == 2 and "has no [target].base_url: add it, or give --target URL" in said


def test_running_target_options_without_a_profile_ask_for_it(tmp_path: Path) -> None:
    args = cast(LoadArgs, {**SMALL, "out_dir": tmp_path, "extra_args": [], "target_dsn": "x"})
    out = io.StringIO()
    assert load_main(console=Console(file=out, width=300), **args) == 2
    assert "give its --profile too" in out.getvalue()


def test_the_plan_of_a_profile_run_is_named_after_it_and_hides_the_password(
    tmp_path: Path,
) -> None:
    plan = LoadPlan.build(
        **cast(
            LoadArgs,
            {
                **PROFILE_RUN,
                "profile": _shop(tmp_path),
                "target": "http://127.0.0.1:8001/shop",
                "target_dsn": "postgresql://shop:s3cret@127.0.0.1:5432/shop",
                "out_dir": tmp_path,
                "extra_args": [],
            },
        )
    )
    assert plan.run_id.endswith("-load-shop-race_pairs") and plan.strategy == "shop"
    assert plan.profile is not None and plan.profile.base_url == "http://127.0.0.1:8001/shop"
    assert "s3cret" not in plan.command and "shop:***@127.0.0.1" in plan.command
    assert plan.settings("http://gw", "postgresql://db").to_env()["PAYRACE_PROFILE"] == str(
        (tmp_path / "shop.toml").resolve()
    )
    # A running target is never stopped by payrace: the gate's reading is the last one.
    assert (
        plan.settings("http://gw", "postgresql://db").settle_timeout_s() == RUNNING_TARGET_SETTLE_S
    )


def test_a_target_that_is_down_exits_2_before_locust_starts(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    code, said = _load_profile(tmp_path, target=down)
    assert code == 2
    assert f"nothing answers at --target {down}" in said and "start your service first" in said
    assert list((tmp_path / "out").glob("*/locust.log")) == []


def test_a_gateway_that_is_down_exits_2_before_locust_starts(
    tmp_path: Path, gateway_url: str
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    code, said = _load_profile(tmp_path, target=gateway_url, gateway_url=down)
    assert code == 2 and "nothing answers at --gateway-url" in said and "payrace gateway" in said


def test_an_oracle_table_the_target_lacks_exits_2_naming_the_key(
    tmp_path: Path, gateway_url: str, pg: Database
) -> None:
    # Any HTTP answer means the target is up: the fake gateway stands in for it here.
    profile = _shop(tmp_path, **{'table = "payments"': 'table = "charges"'})
    code, said = _load_profile(
        tmp_path, profile=profile, target=gateway_url, gateway_url=gateway_url, target_dsn=pg.url
    )
    assert code == 2 and "cannot install the oracle's audit triggers" in said
    assert "payments.table = 'charges': no such table" in said


# -- no process outlives payrace load -----------------------------------------------------


def _marked(marker: str) -> list[psutil.Process]:
    """Every process whose environment carries the marker: payrace, the service and its
    workers, Locust and its workers, the postmaster (its children rewrite their environ
    area for the process title, but die with it)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            out.append(f"{p.pid} (gone)")
    return out


def _spawn_load(tmp_path: Path, marker: str, **changes: object) -> subprocess.Popen[bytes]:
    """`payrace load` with SMALL and `changes`, in a process of its own marked with `marker`."""
    args = {**SMALL, **changes}
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from rich.console import Console
        from payrace.harness.load.launch import load_main
        args = {args!r}
        sys.exit(load_main(console=Console(width=200), out_dir=Path({str(tmp_path)!r}),
                           extra_args=[], **args))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PAYRACE_DSN", "PAYRACE_DATABASE_URL")}
    env[MARKER] = marker
    log = (tmp_path / "payrace.log").open("wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    finally:
        log.close()


@pytest.mark.slow
def test_ctrl_c_in_the_middle_of_a_run_stops_everything(tmp_path: Path) -> None:
    """The embedded PostgreSQL route, so the postmaster is payrace's to stop too."""
    marker = uuid.uuid4().hex
    proc = _spawn_load(
        tmp_path, marker, users=2, spawn_rate=4.0, run_time="60s", processes=2, workers=2
    )
    try:
        deadline = time.monotonic() + 60
        seen: list[str] = []
        while time.monotonic() < deadline and proc.poll() is None:
            seen = _describe(_marked(marker))
            if sum(" locust " in s for s in seen) >= 3:  # master + 2 workers
                break
            time.sleep(0.2)
        assert sum(" locust " in s for s in seen) >= 3, (tmp_path / "payrace.log").read_text()
        assert any("postgres" in s for s in seen) and any("uvicorn" in s for s in seen)
        time.sleep(1.0)  # users spawned (4 a second) and racing
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "payrace.log").read_text()
    assert code == 130, log
    assert "interrupted" in log
    assert _describe(_marked(marker)) == []


@pytest.mark.slow
def test_a_failing_locust_run_exits_2_and_leaves_nothing_behind(
    tmp_path: Path, pg: Database
) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import locust\nraise RuntimeError('a locustfile that cannot load')\n")
    marker = uuid.uuid4().hex
    proc = _spawn_load(tmp_path, marker, dsn=pg.url, locustfile=str(broken))
    try:
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "payrace.log").read_text()
    assert code == 2, log
    assert "before its gate wrote summary.json" in log
    assert "a locustfile that cannot load" in next(tmp_path.glob("*/locust.log")).read_text()
    assert _describe(_marked(marker)) == []


class _Page(HTMLParser):
    """What a browser would show of the block payrace adds, and where it sits."""

    def __init__(self) -> None:
        super().__init__()
        self.body_children: list[str] = []  # ids of <body>'s direct children, in order
        self.links: list[str] = []
        self.verdict_text = ""
        self._depth = 0
        self._in_verdict = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "body":
            self._depth = 1
            return
        if self._depth == 1 and tag == "div":
            self.body_children.append(attr.get("id") or "")
            self._in_verdict = attr.get("id") == "payrace-verdict"
        if self._in_verdict and tag == "a":
            self.links.append(attr.get("href") or "")
        if self._depth and tag == "div":
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if self._depth > 1 and tag == "div":
            self._depth -= 1
            if self._depth == 1:
                self._in_verdict = False

    def handle_data(self, data: str) -> None:
        if self._in_verdict:
            self.verdict_text += data


def locust_template() -> str:
    """Locust's own report template, read from the installed package without importing it
    (importing Locust would let gevent patch this process)."""
    spec = importlib.util.find_spec("locust")
    assert spec is not None and spec.origin is not None
    return (Path(spec.origin).parent / "webui" / "dist" / "report.html").read_text()


def test_locusts_report_gets_the_oracles_verdict_and_a_link_to_payraces(tmp_path: Path) -> None:
    page = tmp_path / "locust.html"
    page.write_text(locust_template())
    summary = {
        "verdict": "violated",
        "exit_code": 1,
        "strategies": {"naive": {"expected": "valid", "valid": False}},
    }
    assert mark_locust_report(page, summary)
    parsed = _Page()
    parsed.feed(page.read_text())
    # Beside Locust's React root, not inside it: React replaces what is in #root.
    assert parsed.body_children[:2] == ["payrace-verdict", "root"]
    assert "payrace oracle: violated" in parsed.verdict_text
    assert "(exit code 1)" in parsed.verdict_text and "naive: VIOLATED" in parsed.verdict_text
    assert parsed.links == ["report.html"]

    # Marked again with the final verdict: one block, the new word.
    assert mark_locust_report(page, {**summary, "verdict": "valid", "exit_code": 0})
    again = _Page()
    again.feed(page.read_text())
    assert again.body_children.count("payrace-verdict") == 1
    assert "payrace oracle: valid" in again.verdict_text
    assert "{{ template_args|tojson }}" in page.read_text()  # Locust's part left as it was


def test_a_page_without_a_body_is_left_alone(tmp_path: Path) -> None:
    page = tmp_path / "locust.html"
    page.write_text("not html")
    assert not mark_locust_report(page, {"verdict": "valid", "exit_code": 0})
    assert page.read_text() == "not html"


def test_the_verdict_block_escapes_what_it_shows(tmp_path: Path) -> None:
    page = tmp_path / "locust.html"
    page.write_text("<html><body><div id='root'></div></body></html>")
    mark_locust_report(page, {"verdict": "<script>x</script>", "exit_code": 1})
    assert "<script>" not in page.read_text()
