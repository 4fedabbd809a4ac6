"""explore.app: loading `--app module:factory`, its lifespan, the environment it is given.

Every way an --app can be wrong is a UsageError naming the fix (exit 2 through the command);
the example service raced end to end is tests/examples/test_starlette_shop.py.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from rich.console import Console

from payrace.harness.errors import UsageError
from payrace.harness.explore.app import ENVIRONMENT, AppTarget, Lifespan, exported, load_app
from payrace.harness.explore.findings import EXIT_ERROR
from payrace.harness.explore.plan import explore_main
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.provider import Database, provide_postgres
from payrace.harness.model.profile import Profile

ROOT = Path(__file__).resolve().parents[3]
PROFILE = ROOT / "examples" / "starlette_shop" / "payrace.toml"

APPS = """
import os

async def raw(scope, receive, send):
    assert scope["type"] == "http"

class Asgi:
    def __init__(self):
        self.events = []
    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                self.events.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return

class Wsgi:
    def __call__(self, environ, start_response):
        return []

class Failing:
    async def __call__(self, scope, receive, send):
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "Traceback ...\\nOSError: no db"})

app = Asgi()
NAME = "not a factory"

def factory():
    return Asgi()

def wsgi_factory():
    return Wsgi()

def broken_factory():
    raise KeyError("SHOP_DATABASE_URL")

def failing_factory():
    return Failing()

def elsewhere_factory():
    # A misconfigured app: its database or gateway is not the one payrace gave it.
    for name in ("PAYRACE_GATEWAY_URL", "PAYRACE_TARGET_DSN"):
        os.environ[name] = os.environ.get("TEST_OTHER_" + name, os.environ[name])
    from examples.starlette_shop.buggy import create_app
    return create_app()

def env_factory():
    app = Asgi()
    app.dsn = os.environ["PAYRACE_TARGET_DSN"]
    return app
"""


@pytest.fixture
def apps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of test apps on the path, under a name of its own."""
    name = f"payrace_test_apps_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(APPS)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / f"{name}_deps.py").write_text("import payrace_no_such_dependency\n")
    return name


def _usage(call: Callable[[], Any]) -> str:
    with pytest.raises(UsageError) as caught:
        call()
    return " ".join(str(caught.value).split())


# -- loading ----------------------------------------------------------------------------------


def test_a_factory_is_called_and_an_app_is_used_as_it_is(apps: str) -> None:
    assert type(load_app(f"{apps}:factory")).__name__ == "Asgi"
    assert load_app(f"{apps}:app") is load_app(f"{apps}:app")  # not called: it is the app
    assert load_app(f"{apps}:raw").__name__ == "raw"  # a plain ASGI function too


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("{apps}", "expected module:factory, e.g. --app myshop.main:create_app"),
        (":create_app", "expected module:factory"),
        ("payrace_no_such_module.main:create_app", "no module named 'payrace_no_such_module'"),
        ("{apps}_deps:create_app", "importing {apps}_deps failed"),
        ("{apps}:create_app", "has no attribute 'create_app'; name the function"),
        ("{apps}:NAME", "NAME is a str, not a factory"),
        ("{apps}:broken_factory", "calling broken_factory() raised KeyError: 'SHOP_DATABASE_URL'"),
        ("{apps}:wsgi_factory", "returned Wsgi, not an ASGI application"),
    ],
)
def test_a_bad_app_is_a_usage_error_naming_the_fix(apps: str, spec: str, says: str) -> None:
    message = _usage(lambda: load_app(spec.format(apps=apps)))
    assert says.format(apps=apps) in message
    if "broken" in spec:
        assert "reads its settings from the environment" in message
        assert all(name in message for name in ENVIRONMENT)
    if "wsgi" in spec:
        assert "payrace run --profile" in message
    if "no_such_module" in spec:
        assert "run payrace from the directory that holds your package" in message
    if spec.endswith(":create_app") and "{apps}:" in spec:
        assert "callables there: Asgi, Failing, Wsgi, app, broken_factory" in message


# -- lifespan and environment ----------------------------------------------------------------


async def test_lifespan_runs_startup_and_shutdown(apps: str) -> None:
    app = load_app(f"{apps}:factory")
    lifespan = Lifespan(app, "x:y")
    await lifespan.startup()
    assert lifespan.supported and app.events == ["lifespan.startup"]
    await lifespan.shutdown()
    assert app.events == ["lifespan.startup", "lifespan.shutdown"]


async def test_an_app_without_lifespan_runs_without(apps: str) -> None:
    lifespan = Lifespan(load_app(f"{apps}:raw"), "x:raw")
    await lifespan.startup()  # raw() asserts an http scope: no lifespan support
    assert not lifespan.supported
    await lifespan.shutdown()


async def test_a_failed_startup_is_a_usage_error_with_the_apps_own_words(apps: str) -> None:
    lifespan = Lifespan(load_app(f"{apps}:failing_factory"), "x:failing_factory")
    with pytest.raises(UsageError, match="the app's startup failed: OSError: no db"):
        await lifespan.startup()
    await lifespan.shutdown()


def test_exported_variables_are_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYRACE_GATEWAY_URL", "before")
    monkeypatch.delenv("PAYRACE_TARGET_DSN", raising=False)
    with exported({"PAYRACE_GATEWAY_URL": "during", "PAYRACE_TARGET_DSN": "dsn"}):
        assert os.environ["PAYRACE_GATEWAY_URL"] == "during"
    assert os.environ["PAYRACE_GATEWAY_URL"] == "before"
    assert "PAYRACE_TARGET_DSN" not in os.environ


async def test_the_factory_sees_the_database_gateway_and_keys(apps: str) -> None:
    profile = Profile.load(PROFILE)
    target = AppTarget(f"{apps}:env_factory", profile)
    env = target.environment("postgresql+asyncpg://u@127.0.0.1/db", "http://127.0.0.1:9")
    assert env == {
        "PAYRACE_TARGET_DSN": "postgresql://u@127.0.0.1/db",
        "PAYRACE_GATEWAY_URL": "http://127.0.0.1:9",
        "PAYRACE_RAZORPAY_KEY_ID": profile.keys.key_id,
        "PAYRACE_RAZORPAY_KEY_SECRET": profile.keys.key_secret,
        "PAYRACE_RAZORPAY_WEBHOOK_SECRET": profile.keys.webhook_secret,
    }
    assert "PAYRACE_TARGET_DSN" not in os.environ
    events: Any = None  # an app reports no engine events
    app = await target.start("postgresql://u@127.0.0.1/db", "http://127.0.0.1:9", events)
    assert app.dsn == "postgresql://u@127.0.0.1/db" and app.events == ["lifespan.startup"]
    await target.stop()
    assert app.events[-1] == "lifespan.shutdown" and "PAYRACE_TARGET_DSN" not in os.environ
    assert (target.name, target.isolation) == ("starlette_shop", "app")


# -- through the command ------------------------------------------------------------------------


def _main(pg: Database, out: Path, **kw: object) -> tuple[int, str]:
    console = Console(record=True, width=200, force_terminal=False)
    args: dict[str, object] = {
        "strategy": None,
        "requests": ["client", "webhook"],
        "isolation": None,
        "pct_runs": None,
        "depth": 2,
        "seed": 1,
        "replay": None,
        "scenario": None,
        "dsn": pg.url,
        "out_dir": out,
        "console": console,
        "profile": PROFILE,
    }
    args.update(kw)
    code = explore_main(**args)  # type: ignore[arg-type]
    return code, " ".join(console.export_text().split())


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"app": "{apps}:broken_factory"}, "calling broken_factory() raised KeyError"),
        ({"app": "{apps}:wsgi_factory"}, "not an ASGI application"),
        ({"app": "{apps}:failing_factory"}, "the app's startup failed: OSError: no db"),
        ({"app": "{apps}:factory", "profile": None}, "--app and --profile go together"),
        ({"app": None}, "--app and --profile go together"),
        ({"app": "{apps}:factory", "strategy": "naive"}, "leave --strategy out with --app"),
        ({"app": "{apps}:factory", "isolation": "rr"}, "leave --isolation out with --app"),
        ({"app": "{apps}:factory", "scenario": Path("s.toml")}, "with --app give --requests"),
        (
            {"app": "{apps}:factory", "replay": "naive.rc.cw.a5b4"},
            "was not found against this app (its ids start starlette_shop.app.)",
        ),
        ({"replay": "starlette_shop.app.cw.a2b", "profile": None}, "is the id of an app's"),
        ({"target_dsn": "postgresql://x@127.0.0.1/x", "profile": None}, "--target-dsn is the"),
        ({"app": "{apps}:factory", "target_dsn": "mysql://x"}, "not a PostgreSQL URL"),
        ({"app": "{apps}:factory", "profile": Path("/nonexistent.toml")}, "cannot read the"),
    ],
)
def test_explore_with_a_bad_app_exits_two_and_says_what_to_do(
    pg: Database, tmp_path: Path, apps: str, kw: dict[str, Any], says: str
) -> None:
    if isinstance(kw.get("app"), str):
        kw["app"] = kw["app"].format(apps=apps)
    code, text = _main(pg, tmp_path, **kw)
    assert code == EXIT_ERROR, text
    assert says in text
    assert "Traceback" not in text


def test_an_app_without_pause_points_cannot_pass(
    pg: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The buggy example with its pauses taken out: every schedule runs the requests one
    after the other, so "valid" would mean nothing; the run says where the pauses go."""
    monkeypatch.syspath_prepend(str(ROOT))
    import examples.starlette_shop.app as shop

    monkeypatch.setattr(shop, "pause", lambda *args, **kw: asyncio.sleep(0))
    code, text = _main(pg, tmp_path, app="examples.starlette_shop.buggy:create_app")
    assert code == EXIT_ERROR
    assert "pause points reached: none" in text
    assert "no request reached a pause point" in text and "await payrace.pause" in text


@pytest.mark.parametrize("other", ["PAYRACE_GATEWAY_URL", "PAYRACE_TARGET_DSN"])
def test_an_app_using_another_database_or_gateway_is_a_setup_mistake(
    pg: Database, tmp_path: Path, apps: str, monkeypatch: pytest.MonkeyPatch, other: str
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    with (
        provide_postgres(pg.url, announce=lambda line: None) as elsewhere,
        GatewayServer(FakeRazorpay(GatewayKeys())) as another,
    ):
        value = another.url if other == "PAYRACE_GATEWAY_URL" else elsewhere.url
        monkeypatch.setenv(f"TEST_OTHER_{other}", value)
        code, text = _main(pg, tmp_path, app=f"{apps}:elsewhere_factory")
    assert code == EXIT_ERROR, text
    if other == "PAYRACE_GATEWAY_URL":
        assert "the fake gateway never saw order" in text and f"point it at {other}" in text
    else:  # its tables are not where payrace looks: said when the oracle is installed
        assert "cannot install the oracle's audit triggers" in text and other in text
    assert "infrastructure error" not in text


async def test_an_app_writing_to_another_database_with_the_same_tables_is_found_out(
    pg: Database, tmp_path: Path, apps: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tables exist where payrace looks (--target-dsn), but the app writes elsewhere: the
    first orders are missing there, said before any schedule."""
    monkeypatch.syspath_prepend(str(ROOT))
    from examples.starlette_shop.app import SCHEMA

    with (
        provide_postgres(pg.url, announce=lambda line: None) as ours,
        provide_postgres(pg.url, announce=lambda line: None) as elsewhere,
    ):
        conn = await asyncpg.connect(ours.url)
        try:
            await conn.execute(SCHEMA)
        finally:
            await conn.close()
        monkeypatch.setenv("TEST_OTHER_PAYRACE_TARGET_DSN", elsewhere.url)
        code, text = await asyncio.to_thread(
            _main, pg, tmp_path, app=f"{apps}:elsewhere_factory", target_dsn=ours.url, dsn=None
        )
    assert code == EXIT_ERROR, text
    assert "that store.charges in payrace's database does not hold" in text
    assert "make it use PAYRACE_TARGET_DSN" in text
