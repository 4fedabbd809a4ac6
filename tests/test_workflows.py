"""The GitHub Actions workflows: every file parses and keeps least privilege, a timeout, its
reports and its JUnit; the consumer template (examples/ci/payrace.yml) runs act-free.

Act-free means: the template's `run:` steps are executed with bash, as the runner would
(`bash --noprofile --norc -eo pipefail`, the job's env, `if: always()` honoured after a
failure), in a temporary directory standing in for the team's checkout, against a database
on the embedded PostgreSQL and the example Flask shop. What only GitHub provides is put in the
environment instead: the postgres service container becomes a fresh database, the fixed
ports become free ones. Not executed: the `uses:` steps (checkout, setup-python, the JUnit
reporter, the artifact upload: GitHub's own actions) and the install step, whose pip install
of payrace from a git URL would replace this checkout's editable install (payrace and the shop
are already installed here, which is what that step achieves).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import yaml
from psycopg import sql

from payrace.harness.errors import UsageError
from payrace.harness.infra.processes import free_port
from payrace.harness.infra.provider import Database
from payrace.harness.runner.config import Gate

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "ci" / "payrace.yml"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml")) + sorted(
    (ROOT / "examples" / "ci").glob("*.y*ml")
)
# GitHub's own shell for `run:` on Linux runners.
BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]
# The relative gate forms agreed for payrace (README, `--gate`): a number, a multiple of
# another metric of the same strategy, or of the same metric in a --baseline summary.
RELATIVE_GATE = re.compile(
    r"^(?:[a-z_]+:)?[a-z0-9_]+(?:<=|>=|==|<|>)"
    r"(?:-?\d+(?:\.\d+)?|\d+(?:\.\d+)?\*(?:[a-z0-9_]+|baseline))$"
)
_MAX_TIMEOUT_MIN = 60


def load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path}: not a mapping"
    # YAML 1.1 reads the key `on` as True; GitHub reads it as "on".
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def workflow_problems(doc: dict[str, Any]) -> list[str]:
    """What a merge gate workflow must have, as a list of what is missing."""
    problems = []
    if not doc.get("on"):
        problems.append("no `on:` trigger")
    permissions = doc.get("permissions")
    if not isinstance(permissions, dict):
        problems.append("no top-level `permissions:` mapping (the token would get defaults)")
    else:
        if permissions.get("contents") != "read":
            problems.append("permissions: contents must be read")
        extra = {k: v for k, v in permissions.items() if v == "write" and k != "checks"}
        if extra:
            problems.append(f"permissions: write beyond checks: {sorted(extra)}")
    jobs = doc.get("jobs") or {}
    if not jobs:
        problems.append("no jobs")
    for name, job in jobs.items():
        timeout = job.get("timeout-minutes")
        if not isinstance(timeout, int) or not 0 < timeout <= _MAX_TIMEOUT_MIN:
            problems.append(f"job {name}: timeout-minutes must be 1..{_MAX_TIMEOUT_MIN}")
        steps = job.get("steps") or []
        for step in steps:
            if ("run" in step) == ("uses" in step):
                problems.append(f"job {name}: a step needs exactly one of run/uses: {step}")
        uses = {str(s.get("uses", "")).split("@")[0]: s for s in steps}
        python = uses.get("actions/setup-python")
        if python is None or (python.get("with") or {}).get("cache") != "pip":
            problems.append(f"job {name}: actions/setup-python without `cache: pip`")
        for action in ("actions/upload-artifact", "mikepenz/action-junit-report"):
            step = uses.get(action)
            if step is None:
                problems.append(f"job {name}: no {action} step")
            elif step.get("if") != "always()":
                problems.append(f"job {name}: {action} must run `if: always()`")
    return problems


def gates_in(doc: dict[str, Any]) -> list[str]:
    runs = [s["run"] for job in doc["jobs"].values() for s in job["steps"] if "run" in s]
    return [g for run in runs for g in re.findall(r"--gate '([^']+)'", run)]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: str(p.relative_to(ROOT)))
def test_workflow_parses_with_permissions_timeout_reports_and_junit(path: Path) -> None:
    doc = load(path)
    assert workflow_problems(doc) == []


def test_workflow_problems_names_what_a_bare_workflow_lacks() -> None:
    bare = yaml.safe_load(
        "on: push\njobs:\n  t:\n    runs-on: ubuntu-latest\n"
        "    steps:\n      - uses: actions/setup-python@v5\n      - run: make test\n"
    )
    bare["on"] = bare.pop(True)
    problems = workflow_problems(bare)
    assert any("permissions" in p for p in problems)
    assert any("timeout-minutes" in p for p in problems)
    assert any("cache: pip" in p for p in problems)
    assert any("upload-artifact" in p for p in problems)
    assert any("action-junit-report" in p for p in problems)
    bare["permissions"] = "write-all"
    assert any("permissions" in p for p in workflow_problems(bare))


def test_the_workflow_set_includes_the_gate_and_the_template() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in WORKFLOWS}
    assert {".github/workflows/race.yml", "examples/ci/payrace.yml"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: str(p.relative_to(ROOT)))
def test_workflow_gates_are_valid_gate_expressions(path: Path) -> None:
    gates = gates_in(load(path))
    assert gates, f"{path.name} races without a --gate"
    for expr in gates:
        try:
            Gate.parse(expr)
        except UsageError:
            # Relative gates land with the gates work; until this checkout's Gate.parse takes
            # them, their syntax is checked against the agreed grammar instead.
            assert RELATIVE_GATE.match(expr.replace(" ", "")) and "*" in expr, expr


def test_the_gate_workflow_uses_a_relative_latency_gate() -> None:
    gates = gates_in(load(ROOT / ".github" / "workflows" / "race.yml"))
    latency = [g for g in gates if re.match(r"(?:\w+:)?(lock|hold|request)_", g)]
    assert latency and all("*" in g for g in latency), gates


# -- the consumer template, act-free --------------------------------------------------------


@contextlib.contextmanager
def team_db(pg: Database) -> Iterator[str]:
    """A fresh database on the embedded PostgreSQL: the template's postgres service container."""
    name = f"payrace_ci_template_{secrets.token_hex(4)}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(pg.url)._replace(path="/" + name))
    finally:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _unused_port(taken: set[int]) -> int:
    """A free port none of the other jobs got: free_port() closes what it found, so two calls
    can name the same one."""
    while (port := free_port()) in taken:
        pass
    taken.add(port)
    return port


def _job_env(
    doc: dict[str, Any], workspace: Path, db_url: str, variant: str, taken: set[int]
) -> dict[str, str]:
    (job,) = doc["jobs"].values()
    service_port, gateway_port = _unused_port(taken), _unused_port(taken)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYRACE_")}
    env.update({k: str(v) for k, v in job["env"].items()})
    # What GitHub provides or the template fixes, put where this machine has it.
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
            "PYTHONPATH": str(ROOT),  # the stand-in service, examples.flask_shop
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "GITHUB_WORKSPACE": str(workspace),
            "RUNNER_TEMP": str(workspace / ".runner-temp"),
            "SHOP_DATABASE_URL": db_url,
            "SERVICE_PORT": str(service_port),
            "GATEWAY_PORT": str(gateway_port),
            "TARGET_URL": f"http://127.0.0.1:{service_port}/shop/api/v1",
            "SHOP_RAZORPAY_BASE_URL": f"http://127.0.0.1:{gateway_port}",
            "SHOP_VARIANT": variant,
            "PAYRACE_TRIALS": "30",
        }
    )
    return env


def run_act_free(workflow: Path, workspace: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Each step as the runner would take it: its name, whether it ran and its exit code."""
    (job,) = load(workflow)["jobs"].values()
    (workspace / ".runner-temp").mkdir(exist_ok=True)
    results: list[dict[str, Any]] = []
    groups: list[int] = []
    failed = False
    try:
        for i, step in enumerate(job["steps"]):
            name = step.get("name") or step.get("uses") or f"step {i}"
            condition = step.get("if")
            assert condition in (None, "always()"), f"{name}: cannot evaluate `if: {condition}`"
            if "uses" in step or step.get("id") == "install":
                results.append({"name": name, "ran": False, "why": "GitHub's action or install"})
                continue
            if failed and condition != "always()":
                results.append({"name": name, "ran": False, "why": "an earlier step failed"})
                continue
            script = step["run"]
            assert "${{" not in script, f"{name}: a GitHub expression bash cannot evaluate"
            path = workspace / ".runner-temp" / f"step{i}.sh"
            path.write_text(script)
            step_env = {**env, **{k: str(v) for k, v in (step.get("env") or {}).items()}}
            proc = subprocess.Popen(
                [*BASH, str(path)], cwd=workspace, env=step_env, start_new_session=True,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            groups.append(proc.pid)
            started = time.monotonic()
            output, _ = proc.communicate(timeout=300)
            took = round(time.monotonic() - started, 1)
            results.append(
                {"name": name, "ran": True, "rc": proc.returncode, "out": output, "s": took}
            )
            failed = failed or proc.returncode != 0
    finally:
        # What a step left running in the background (the runner's orphan clean-up).
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
    return results


def _summaries(workspace: Path) -> dict[str, dict[str, Any]]:
    return {
        json.loads(p.read_text())["mode"]: json.loads(p.read_text())
        for p in sorted((workspace / "reports").glob("*/summary.json"))
    }


VARIANTS = ("fixed", "buggy")


@pytest.fixture(scope="module")
def act_free_jobs(
    pg: Database, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[Path, list[dict[str, Any]]]]]:
    """The template's job for the fixed and the buggy shop, side by side (as two CI jobs on
    two runners): each on a database, a checkout and ports of its own; most of a job's time is
    the oracle waiting for a running target's deadlock count to settle, not CPU."""
    with contextlib.ExitStack() as stack:
        jobs = {}
        taken: set[int] = set()
        for variant in VARIANTS:
            workspace = tmp_path_factory.mktemp(variant) / "team-repo"
            workspace.mkdir()
            # The team's checkout: its profile at the root (the template's `payrace.toml`).
            profile = (ROOT / "examples/flask_shop/payrace.toml").read_text()
            (workspace / "payrace.toml").write_text(profile)
            db_url = stack.enter_context(team_db(pg))
            jobs[variant] = workspace, _job_env(load(TEMPLATE), workspace, db_url, variant, taken)
        ports = [env[k] for _, env in jobs.values() for k in ("SERVICE_PORT", "GATEWAY_PORT")]
        assert len(set(ports)) == len(ports), ports
        with ThreadPoolExecutor(len(jobs)) as pool:
            running = {
                v: pool.submit(run_act_free, TEMPLATE, workspace, env)
                for v, (workspace, env) in jobs.items()
            }
            yield {v: (jobs[v][0], job.result()) for v, job in running.items()}


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_consumer_template_runs_act_free(
    variant: str, act_free_jobs: dict[str, tuple[Path, list[dict[str, Any]]]]
) -> None:
    workspace, results = act_free_jobs[variant]
    by_name = {r["name"]: r for r in results}
    shown = "\n".join(
        f"--- {r['name']}: rc {r.get('rc')} in {r.get('s')} s\n{r.get('out', '')}" for r in results
    )

    skipped = {r["name"] for r in results if not r["ran"] and r["why"] != "an earlier step failed"}
    assert skipped == {
        "actions/checkout@v4",
        "actions/setup-python@v5",
        "install payrace and the service",
        "publish JUnit",
        "actions/upload-artifact@v4",
    }, shown
    for started in ("start the fake Razorpay", "start the service"):
        assert by_name[started]["rc"] == 0, shown
    assert by_name["stop the service and the fake Razorpay"]["rc"] == 0, shown
    forced = by_name["race: exactly once under forced races"]
    aligned = by_name["race: released together, gated"]
    summaries = _summaries(workspace)
    for summary in summaries.values():
        assert (workspace / "reports" / summary["run_id"] / "junit.xml").is_file()
    if variant == "fixed":
        assert forced["rc"] == 0 and aligned["rc"] == 0, shown
        assert {m: s["verdict"] for m, s in summaries.items()} == {
            "forced": "valid",
            "aligned": "valid",
        }
        gates = summaries["aligned"]["gates"]
        assert [(g["expr"], g["passed"]) for g in gates] == [("violations<=0", True)], gates
    else:
        assert forced["rc"] == 1, shown
        assert not aligned["ran"], shown  # a failed step ends the job's ordinary steps
        assert {m: s["verdict"] for m, s in summaries.items()} == {"forced": "violated"}
