"""payrace/harness/load/worker.py: what every Locust process needs stays light, so a load
machine runs the locustfiles with nothing but Locust and hdrhistogram installed.

Fast: the worker's import closure, measured in a fresh interpreter, holds nothing beyond the
standard library and hdrhistogram (and the measurement sees psycopg in the master's module,
so it can fail). Slow: a virtualenv with only payrace/locustfiles/requirements-worker.txt
installed (built once a day and kept, LIGHT_VENV_CACHE; skipped with the reason when PyPI
cannot be reached) joins a Locust master of the full install as its only worker, payrace's
code on its path as a checkout would put it, and races the reference service on loopback:
for_update is judged valid and naive is caught, from the light worker's payments alone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra import env
from payrace.harness.infra.processes import (
    ServiceProcess,
    free_port,
    service_env,
    spawn_group,
    stop_process,
)
from payrace.harness.infra.provider import Database
from payrace.harness.load.worker import LoadSettings, worker_recipe

ROOT = Path(__file__).resolve().parents[3]
LOCUSTFILES = ROOT / "payrace" / "locustfiles"
REQUIREMENTS = LOCUSTFILES / "requirements-worker.txt"
# What a worker process imports besides Locust: the shared module and what it pulls in.
WORKER_IMPORTS = (
    "payrace.harness.load.worker",
    "payrace.harness.model.verdict",
    "payrace.harness.model.profile",
    "payrace.harness.gateway.signing",
    "payrace.service.instrument.timing",
)
LIGHT = {"hdrh", "pyhdrh"}  # hdrhistogram's modules
HEAVY = ("psycopg", "pgserver", "testcontainers", "fastapi", "sqlalchemy", "asyncpg", "razorpay")


_INSTALLED = """
import importlib, sys, sysconfig
for name in sys.argv[1:]:
    importlib.import_module(name)
site = (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])
print(" ".join(sorted({
    name.split(".")[0] for name, module in list(sys.modules.items())
    if (getattr(module, "__file__", None) or "").startswith(site)
    and not name.startswith("_")  # .pth machinery: the editable finder, distutils' hack
})))
"""


def third_party_imports(*modules: str) -> set[str]:
    """Top-level packages from site-packages (installed, not the standard library, not this
    checkout) that importing `modules` loads in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", _INSTALLED, *modules],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(done.stdout.split())


def test_a_worker_imports_nothing_but_the_standard_library_and_hdrhistogram() -> None:
    assert third_party_imports(*WORKER_IMPORTS) <= LIGHT


def test_the_masters_side_is_seen_pulling_in_psycopg() -> None:
    # The measurement above could pass by seeing nothing: here it must see the heavy import.
    assert "psycopg" in third_party_imports("payrace.harness.load.gate")


def test_worker_requirements_match_the_packages_own_pins() -> None:
    """requirements-worker.txt names Locust and hdrhistogram with pyproject.toml's bounds, so
    a load machine never runs another Locust than the master's install allows."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {
        re.split(r"[<>=\[ ]", d, maxsplit=1)[0]: d for d in pyproject["project"]["dependencies"]
    }
    wanted = [
        line.strip()
        for line in REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert wanted == [pins["locust"], pins["hdrhistogram"]]


# -- settings -----------------------------------------------------------------------------


def test_the_master_reads_the_services_database_from_payrace_target_dsn() -> None:
    settings = LoadSettings.from_env({"PAYRACE_TARGET_DSN": "postgresql://shop@db/shop"})
    assert settings.database_url == "postgresql://shop@db/shop"
    assert settings.to_env()["PAYRACE_TARGET_DSN"] == "postgresql://shop@db/shop"
    assert "PAYRACE_DATABASE_URL" not in settings.to_env()


def test_the_old_name_still_reaches_the_master_with_a_deprecation(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(env, "_told", set())
    settings = LoadSettings.from_env({"PAYRACE_DATABASE_URL": "postgresql://shop@db/shop"})
    assert settings.database_url == "postgresql://shop@db/shop"
    assert "set PAYRACE_TARGET_DSN instead" in capsys.readouterr().err


def test_the_worker_recipe_names_the_profile_and_its_keys(tmp_path: Path) -> None:
    recipe = worker_recipe(
        [LOCUSTFILES / "mixed.py", tmp_path / "ours.py"],
        gateway_url=None,
        profile=Path("/etc/shop/payrace.toml"),
    )
    *_, keys, command = recipe.splitlines()
    assert "every variable its [keys] name with *_env" in keys
    assert command.startswith(
        "PAYRACE_GATEWAY_URL=http://GATEWAY_HOST:9411 PAYRACE_PROFILE=/etc/shop/payrace.toml "
    )
    assert f'-f "$PAYRACE_CHECKOUT/payrace/locustfiles/mixed.py,{tmp_path}/ours.py"' in command


# -- a light worker joins a full master ---------------------------------------------------


# Where the light virtualenv is kept between runs: building it (venv, pip resolving and
# installing Locust's ~30 packages, compiling them) took ~19 s alone and ~57 s under the
# suite's four workers on a 2-core machine, the largest single setup of the suite. Kept per
# requirements file, interpreter and UTC day, so a changed pin or a new Locust release within
# the bounds is installed afresh at the latest the next day; PAYRACE_LIGHT_VENV_FRESH=1
# always builds a new one (as on a CI runner, which starts with no cache).
LIGHT_VENV_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "payrace-tests" / "light"
)
_UNREACHABLE = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Could not find a version",
    "ProxyError",
)


def _light_venv_key() -> str:
    day = datetime.now(UTC).strftime("%Y%m%d")
    said = f"{REQUIREMENTS.read_text()}\0{sys.version}\0{os.path.realpath(sys.executable)}"
    return f"{day}-{hashlib.sha256(said.encode()).hexdigest()[:16]}"


def _distributions(venv: Path) -> list[str]:
    """The venv's installed distributions (their dist-info names, versions included)."""
    return sorted(p.name for p in venv.glob("lib/python*/site-packages/*.dist-info"))


def _build_light_venv(venv: Path) -> None:
    """A fresh virtualenv with only the worker requirements (no payrace, no psycopg)."""
    # No pip of its own: ensurepip installing pip into it, then that pip starting, were half
    # of the build (11.5 -> 5.6 s, pip's cache warm); this install's pip installs into it.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--quiet", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    if pip.returncode != 0:
        said = pip.stdout + pip.stderr
        if any(word in said for word in _UNREACHABLE):
            pytest.skip(f"PyPI is not reachable for the light worker's virtualenv: {said[-300:]}")
        raise AssertionError(f"pip install -r {REQUIREMENTS.name} failed:\n{said}")


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with only the worker requirements, built once a day (LIGHT_VENV_CACHE).
    A kept one is used only if it was completed and still holds exactly the distributions it
    was built with; the tests below check its contents on every run either way."""
    if os.environ.get("PAYRACE_LIGHT_VENV_FRESH") == "1":
        venv = tmp_path_factory.mktemp("light-worker") / "venv"
        _build_light_venv(venv)
        return venv
    LIGHT_VENV_CACHE.mkdir(parents=True, exist_ok=True)
    key = _light_venv_key()
    venv = LIGHT_VENV_CACHE / key
    done = LIGHT_VENV_CACHE / f"{key}.done"
    with (LIGHT_VENV_CACHE / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once build it once
        if done.is_file() and done.read_text() == json.dumps(_distributions(venv)):
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a half-built one
        for old in LIGHT_VENV_CACHE.iterdir():
            # Older days' ones, once no run still going can be using them.
            if old.name == "lock" or time.time() - old.stat().st_mtime < 2 * 86400:
                continue
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        _build_light_venv(venv)
        done.write_text(json.dumps(_distributions(venv)))
    return venv


def _light_env() -> dict[str, str]:
    """A load machine's environment: nothing of this install (no PYTHONPATH, no PAYRACE_*)."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    return {k: os.environ[k] for k in keep if k in os.environ}


@pytest.mark.slow
def test_the_light_virtualenv_has_none_of_the_heavy_stack(light_venv: Path) -> None:
    python = str(light_venv / "bin" / "python")
    for module in (*HEAVY, "payrace"):
        # cwd: not this checkout, which `python -c` would put on the path.
        found = subprocess.run(
            [python, "-c", f"import {module}"], capture_output=True, env={}, cwd=light_venv
        )
        assert found.returncode != 0, f"{module} is importable in the light virtualenv"
    for module in ("locust", "hdrh.histogram"):
        subprocess.run(
            [python, "-c", f"import {module}"], check=True, env={}, cwd=light_venv, timeout=60
        )


@pytest.fixture
def fresh_db(pg: Database) -> Iterator[Database]:
    name = f"payrace_light_worker_{secrets.token_hex(4)}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield replace(pg, url=urlunsplit(urlsplit(pg.url)._replace(path="/" + name)))
    finally:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "verdict", "code"), [("for_update", "valid", 0), ("naive", "violated", 1)]
)
def test_a_light_worker_races_for_a_full_master(
    strategy: str, verdict: str, code: int, light_venv: Path, fresh_db: Database, tmp_path: Path
) -> None:
    keys = GatewayKeys()
    reports = tmp_path / "reports"
    port = str(free_port())
    locustfile = str(LOCUSTFILES / "race_pairs.py")
    with GatewayServer(FakeRazorpay(keys)) as gateway:
        env = service_env(fresh_db, gateway.url, strategy, keys=keys)
        with ServiceProcess(env, log_path=tmp_path / "service.log") as service:
            master_env = {
                **os.environ,
                "PAYRACE_GATEWAY_URL": gateway.url,
                "PAYRACE_TARGET_DSN": fresh_db.url,
                "PAYRACE_REPORT_DIR": str(reports),
                "PAYRACE_SEED": "7",
            }
            master = spawn_group(
                [sys.executable, "-m", "locust", "-f", locustfile, "--master", "--headless",
                 "--expect-workers", "1", "-u", "6", "-r", "6", "-t", "3s",
                 "--host", service.url, "--master-bind-host", "127.0.0.1",
                 "--master-bind-port", port],
                master_env, log_path=tmp_path / "master.log",
            )  # fmt: skip
            # What `payrace load --worker-command` prints, past the install (the fixture's),
            # pointed at this checkout and this master. Not spawn_group: that adds this
            # process's environment, and a load machine's has nothing of the full install.
            recipe = worker_recipe(
                [Path(locustfile)], gateway_url=gateway.url, profile=None,
                master_host=f"127.0.0.1 --master-port {port}",
            ).replace("/path/to/payrace", str(ROOT))  # fmt: skip
            script = "\n".join(recipe.splitlines()[3:])
            light_path = f"{light_venv / 'bin'}{os.pathsep}{os.environ['PATH']}"
            with (tmp_path / "worker.log").open("ab") as log:
                worker = subprocess.Popen(
                    ["bash", "-ec", script], env={**_light_env(), "PATH": light_path},
                    cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            try:
                master_code = master.wait(timeout=180)
                worker_code = worker.wait(timeout=30)
            finally:
                stop_process(worker)
                stop_process(master)
    logs = "\n".join(
        f"--- {name}\n{(tmp_path / name).read_text()[-3000:]}"
        for name in ("master.log", "worker.log")
    )
    assert worker_code == 0, logs
    assert master_code == code, logs
    summary: dict[str, Any] = json.loads((reports / "summary.json").read_text())
    assert summary["verdict"] == verdict and summary["exit_code"] == code, logs
    # Every worker (`--processes -1`: one per core) is the light install's: the master's
    # only workers, they made every payment it judged.
    workers = summary["locust"]["workers"].values()
    assert workers and sum(w["payments"] for w in workers) > 0, workers
