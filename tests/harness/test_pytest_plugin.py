"""payrace/harness/pytest_plugin.py as a team would use it: the `race` fixture in a plain test,
`arace` in an async one, race(profile=...) of running services in a team's own pytest run,
and a pytest-asyncio suite outside the repository racing with `arace` and capture_race."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from report_summaries import DEADLOCK_STATEMENTS, deadlocked_summary

from payrace import testing
from payrace.harness.cli import run_command
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.processes import ServiceProcess, service_env
from payrace.harness.infra.provider import Database
from payrace.harness.model import profile as profile_module
from payrace.harness.pytest_plugin import RaceResult


def test_capture_is_exactly_once(race: Callable[..., RaceResult]) -> None:
    race(strategy="for_update", trials=10, mode="forced").assert_exactly_once()


def test_the_plugin_fails_a_test_when_capture_is_doubled(race: Callable[..., RaceResult]) -> None:
    result = race(strategy="naive", trials=5, mode="forced")
    assert result.violating_trials == 5
    with pytest.raises(pytest.fail.Exception, match="read payment"):
        result.assert_exactly_once()


def test_the_one_assertion_fails_on_a_breached_gate_and_names_it_and_the_report(
    race: Callable[..., RaceResult],
) -> None:
    result = race(strategy="for_update", trials=3, gate="lock_max_ms<0")
    assert result.valid is True  # every invariant held ...
    assert (result.verdict, result.summary["exit_code"]) == ("gate_breached", 1)
    with pytest.raises(pytest.fail.Exception) as failed:
        result.assert_exactly_once()  # ... and still the test fails, as the CLI exits 1
    said = str(failed.value)
    assert "a gate was breached" in said
    assert "gate lock_max_ms<0 breached: for_update measured" in said
    assert result.report is not None and result.report.name == "report.html"
    assert f"report: {result.report}" in said and result.report.is_file()


def test_a_gate_that_holds_passes(race: Callable[..., RaceResult]) -> None:
    result = race(strategy="for_update", trials=3, gates=["violations<=0", "lock_max_ms>=0"])
    assert [g["passed"] for g in result.summary["gates"]] == [True, True]
    result.assert_exactly_once()


def test_race_keywords_are_the_flags_of_payrace_run() -> None:
    # quiet: no progress bar here; ctx: typer's context, not a flag
    flags = set(inspect.signature(run_command).parameters) - {"quiet", "ctx"}
    keywords = set(inspect.signature(testing.race).parameters)
    assert flags <= keywords, f"race() lacks {sorted(flags - keywords)}"
    assert keywords - flags == {"gates", "first_event"}  # gate's plural; the old --event name


def test_event_is_the_flag_name_and_first_event_still_works_with_a_warning(
    race: Callable[..., RaceResult],
) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"--event must be payment\.captured"):
        race(strategy="for_update", trials=1, event="payment.refunded")
    with pytest.warns(DeprecationWarning, match=r"race\(event=...\)"):
        result = race(strategy="for_update", trials=1, first_event="order.paid")
    result.assert_exactly_once()


def test_a_mistake_in_the_keywords_fails_with_payrace_s_message(
    race: Callable[..., RaceResult],
) -> None:
    with pytest.raises(pytest.fail.Exception, match="payrace: unknown strategy nope"):
        race(strategy="nope", trials=1)


async def test_race_in_an_async_test_points_to_arace(race: Callable[..., RaceResult]) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"`result = await arace\(...\)`"):
        race(strategy="for_update", trials=1)


async def test_arace_is_awaited_in_an_async_test(
    arace: Callable[..., Awaitable[RaceResult]],
) -> None:
    caught = await arace(strategy="naive", trials=3, mode="forced")
    assert (caught.verdict, caught.violating_trials) == ("violated", 3)
    with pytest.raises(pytest.fail.Exception, match="capture was not exactly once"):
        caught.assert_exactly_once()
    (await arace(strategy="for_update", trials=3)).assert_exactly_once()


def test_loading_the_plugin_and_payrace_testing_imports_no_heavy_package() -> None:
    # pytest loads the plugin in every session of every project payrace is installed into.
    probe = (
        "import sys, payrace.harness.pytest_plugin, payrace.testing\n"
        "heavy = ('fastapi', 'sqlalchemy', 'asyncpg', 'locust', 'psycopg', 'razorpay', 'httpx')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_a_deadlocked_trial_fails_with_its_statements() -> None:
    result = RaceResult(deadlocked_summary())
    with pytest.raises(pytest.fail.Exception) as failed:
        result.assert_exactly_once()
    said = str(failed.value)
    assert "first violating trial 3:" in said
    assert all(statement in said for statement in DEADLOCK_STATEMENTS)
    assert "2 could not be tied to a trial" in said


# -- race(profile=...): a running service, in a team's own suite ----------------------------

# A team's test file: its running services are described by profiles, its keywords are
# `payrace run`'s flags. Run by pytest in a process of its own, as a team's CI would.
_TEAM_TESTS = """
import os

def race_shop(race, profile, **flags):
    return race(
        profile=profile,
        target_dsn=os.environ["SHOP_DSN"],
        gateway_url=os.environ["SHOP_GATEWAY_URL"],
        trials=4,
        **flags,
    )

def test_the_naive_shop_captures_exactly_once(race):
    # A violation decides whatever the deadlock count says: no waiting for it to settle.
    result = race_shop(race, os.environ["NAIVE_PROFILE"], settle_s=0)
    assert result.violating_trials == 4
    result.assert_exactly_once()

def test_the_fixed_shop_captures_exactly_once(race):
    race_shop(race, os.environ["FIXED_PROFILE"]).assert_exactly_once()

def test_a_profile_naming_a_missing_route(race):
    race_shop(race, os.environ["TYPO_PROFILE"])
"""


def _shop_profile(path: Path, base_url: str, **changes: str) -> Path:
    """The reference service's own profile plus its base URL, as a team would write it."""
    text = (Path(profile_module.__file__).parent.parent / "profiles/reference.toml").read_text()
    changes = {'name = "reference"': f'name = "shop"\nbase_url = "{base_url}"', **changes}
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.slow
def test_race_with_a_profile_catches_a_naive_running_service_and_passes_a_fixed_one(
    pg: Database, gateway_url: str, tmp_path: Path
) -> None:
    keys = GatewayKeys()
    # Forced mode through the reference profile's pause handshake: the services answer it.
    naive_env = service_env(pg, gateway_url, "naive", keys=keys, probes=True)
    fixed_env = service_env(pg, gateway_url, "for_update", keys=keys, probes=True)
    with ServiceProcess(naive_env) as naive, ServiceProcess(fixed_env) as fixed:
        typo = {'path = "/payments/verify"': 'path = "/payment/verify"'}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYRACE", "PYTEST"))}
        env |= {
            "SHOP_DSN": pg.url,
            "SHOP_GATEWAY_URL": gateway_url,
            "NAIVE_PROFILE": str(_shop_profile(tmp_path / "naive.toml", naive.url)),
            "FIXED_PROFILE": str(_shop_profile(tmp_path / "fixed.toml", fixed.url)),
            "TYPO_PROFILE": str(_shop_profile(tmp_path / "typo.toml", fixed.url, **typo)),
        }
        (tmp_path / "test_shop.py").write_text(_TEAM_TESTS, encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_shop.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "2 failed, 1 passed" in out, out
    # The naive shop's failure shows its first violating trial, two transactions capturing.
    assert "FAILED test_shop.py::test_the_naive_shop_captures_exactly_once" in out
    assert "capture was not exactly once" in out and "violating trials 4/4" in out
    assert "UPDATE payments captured -> captured" in out
    # A setup mistake is payrace's message naming the key to fix, not a traceback.
    assert "payrace: the target answered POST /payment/verify with HTTP 404" in out, out
    assert "check [callback].path" in out
    assert "Traceback" not in out and "During handling" not in out
    # Nothing was provisioned: a running target's database is its own.
    # (The naive shop's undecided no_deadlock says "deadlock(s) PostgreSQL counted".)
    said = out.replace("PostgreSQL server", "").replace("PostgreSQL counted", "")
    assert "PostgreSQL" not in said, out


# -- a team's pytest-asyncio suite, outside the repository ----------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_pytest_block(name: str) -> str:
    """The README's ```python block marked `<!-- readme-pytest: NAME -->`."""
    text = README.read_text(encoding="utf-8")
    marker = f"<!-- readme-pytest: {name} -->"
    assert text.count(marker) == 1, f"README.md: expected one {marker}"
    after = text.split(marker, 1)[1].lstrip("\n")
    assert after.startswith("```python\n"), f"{marker} must precede a ```python block"
    return after.removeprefix("```python\n").split("\n```", 1)[0] + "\n"


@pytest.mark.slow
def test_a_pytest_asyncio_suite_catches_naive_and_passes_for_update(tmp_path: Path) -> None:
    # The README's two async examples as a team copies them, and each again with the unfixed
    # flow; pytest-asyncio in its default (strict) mode, nothing configured for payrace.
    for name in ("seed", "arace"):
        fixed = readme_pytest_block(name)
        assert 'strategy="for_update"' in fixed
        naive = fixed.replace('strategy="for_update"', 'strategy="naive"')
        naive = naive.replace("async def test_", "async def test_naive_")
        (tmp_path / f"test_{name}.py").write_text(fixed + "\n\n" + naive, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYRACE", "PYTEST"))}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "asyncio"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "2 failed, 2 passed" in out, out
    assert "FAILED test_seed.py::test_naive_callback_and_webhook_capture_the_payment_once" in out
    assert "FAILED test_arace.py::test_naive_capture_is_exactly_once_over_many_trials" in out
    assert "cannot be called from a running event loop" not in out
    # Once per failing test in its failure section; the short summary repeats the message
    # untruncated where pytest sees a CI environment (CI=true), so it is not counted.
    sections = out.split("short test summary info", 1)[0]
    assert sections.count("capture was not exactly once") == 2, out
    # the seed's one payment
    assert "single_capture_write: 1 of 1 payments captured by more than one" in out
    reports = re.findall(r"^report: (\S+report\.html)$", sections, flags=re.MULTILINE)
    assert len(reports) == 2 and all(Path(r).is_file() for r in reports), out
    # Nothing but the embedded server payrace started itself, stopped at the session's end.
    assert "Traceback" not in out, out
