"""examples/starlette_shop: raced in-process by `payrace explore --app`, buggy and fixed.

The buggy build must be caught (exit 1) with a violating schedule whose id replays it; the
fixed build must pass every schedule of a client callback and a webhook (exit 0). Without the
explorer the same app serves requests as usual: its pauses do nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from payrace.harness.explore.app import Lifespan, exported, load_app
from payrace.harness.explore.findings import EXIT_OK, EXIT_VIOLATED
from payrace.harness.explore.plan import explore_main
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys, client_callback
from payrace.harness.infra.provider import Database, provide_postgres

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "examples" / "starlette_shop" / "payrace.toml"
BUGGY = "examples.starlette_shop.buggy:create_app"
FIXED = "examples.starlette_shop.fixed:create_app"


@pytest.fixture(autouse=True)
def _on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # `examples` is found as from the checkout's root


def _explore(pg: Database, out: Path, app: str, **kw: object) -> tuple[int, str]:
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
        "app": app,
        "profile": PROFILE,
    }
    args.update(kw)
    code = explore_main(**args)  # type: ignore[arg-type]
    return code, console.export_text()


def _summary(out: Path) -> dict[str, object]:
    [run_dir] = out.iterdir()
    summary: dict[str, object] = json.loads((run_dir / "summary.json").read_text())
    return summary


def test_the_buggy_shop_double_captures_and_the_id_replays_it(pg: Database, tmp_path: Path) -> None:
    code, text = _explore(pg, tmp_path / "all", BUGGY)
    assert code == EXIT_VIOLATED
    assert "pause points reached: charge_read, charge_written" in text
    assert "shortest violating schedule: starlette_shop.app.cw." in text
    assert text.count("charge_read (pending)") == 2  # both read it pending: the incident
    for checker in ("single_capture_write", "single_invoice_paid", "single_order_paid"):
        assert f"{checker}: 12 schedule(s)" in text
    assert f"replay it: payrace explore --app {BUGGY} --profile {PROFILE} --replay" in text
    summary = _summary(tmp_path / "all")
    assert summary["target"] == f"app {BUGGY}"
    result = summary["strategies"]["starlette_shop"]  # type: ignore[index]
    assert result["valid"] is False and result["explore"]["complete"] is True
    assert result["explore"]["points"] == ["charge_read", "charge_written"]
    shortest = result["first_violation"]["schedule_id"]

    code, replayed = _explore(pg, tmp_path / "replay", BUGGY, replay=shortest)
    assert code == EXIT_VIOLATED
    assert f"shortest violating schedule: {shortest}" in replayed
    assert "mode replay: 1 schedules" in replayed


def test_the_fixed_shop_passes_every_schedule(pg: Database, tmp_path: Path) -> None:
    code, text = _explore(pg, tmp_path, FIXED)
    assert code == EXIT_OK, text
    assert "mode exhaustive: 6 schedules (every schedule;" in text
    assert "with a lock wait: 4" in text and "violating: 0" in text
    assert "lock store.charges <waiting>" in text  # what PostgreSQL showed it waiting in
    assert "<completed> charge_read (captured)" in text and "(idempotent)" in text
    result = _summary(tmp_path)["strategies"]["starlette_shop"]  # type: ignore[index]
    assert result["valid"] is True and result["expected"] == "valid"
    assert result["explore"]["complete"] is True and result["explore"]["schedules"] == 6


def test_the_shop_raced_in_the_database_it_already_uses(pg: Database, tmp_path: Path) -> None:
    """--target-dsn: payrace creates and drops nothing there; the app gets that URL."""
    with provide_postgres(pg.url, announce=lambda line: None) as own:
        code, text = _explore(pg, tmp_path, BUGGY, dsn=None, target_dsn=own.url)
        assert code == EXIT_VIOLATED, text
        assert "using" not in text.split("scenario")[0]  # no database was provisioned
        database = _summary(tmp_path)["database"]
        assert database["route"] == "target"  # type: ignore[index]


def test_three_requests_of_the_fixed_shop_under_pct(pg: Database, tmp_path: Path) -> None:
    code, text = _explore(pg, tmp_path, FIXED, requests=["client", "webhook", "duplicate"],
                          pct_runs=12)  # fmt: skip
    assert code == EXIT_OK, text
    assert "violating: 0" in text and "stuck: 0" in text


async def test_without_the_explorer_the_shop_serves_as_usual(pg: Database) -> None:
    """No controller: the pauses cost nothing and change nothing; a capture and a repeat."""
    keys = GatewayKeys()
    fake = FakeRazorpay(keys)
    with (
        provide_postgres(pg.url, announce=lambda line: None) as db,
        GatewayServer(fake) as server,
    ):
        env = {
            "PAYRACE_TARGET_DSN": db.url,
            "PAYRACE_GATEWAY_URL": server.url,
            "PAYRACE_RAZORPAY_KEY_ID": keys.key_id,
            "PAYRACE_RAZORPAY_KEY_SECRET": keys.key_secret,
            "PAYRACE_RAZORPAY_WEBHOOK_SECRET": keys.webhook_secret,
        }
        with exported(env):
            app = load_app(FIXED)
            lifespan = Lifespan(app, FIXED)
            await lifespan.startup()
            try:
                async with httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://shop"
                ) as http:
                    sale = (await http.post("/sales", json={"amount": 50_000})).json()
                    payment = fake.authorize_payment(sale["razorpay_order_id"])
                    fields = client_callback(
                        sale["razorpay_order_id"], payment["id"], keys.key_secret
                    )
                    body = {**fields, "charge_id": sale["charge_id"]}
                    first = await http.post("/checkout/verify", json=body)
                    again = await http.post("/checkout/verify", json=body)
                    forged = await http.post(
                        "/checkout/verify", json={**body, "razorpay_signature": "0" * 64}
                    )
            finally:
                await lifespan.shutdown()
    assert first.status_code == 200 and first.json()["idempotent"] is False
    assert again.status_code == 200 and again.json()["idempotent"] is True
    assert forged.status_code == 400
    assert fake.counters()["captures"] == {payment["id"]: 1}  # the repeat did not capture


@pytest.mark.slow
def test_the_command_line_races_the_buggy_shop(pg: Database, tmp_path: Path) -> None:
    """As the README writes it: the installed `payrace` command, run from the checkout."""
    payrace = Path(sys.executable).parent / "payrace"
    env = {**os.environ, "PAYRACE_DSN": pg.url}
    done = subprocess.run(
        [str(payrace), "explore", "--app", BUGGY, "--profile", str(PROFILE.relative_to(ROOT)),
         "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_VIOLATED, done.stdout[-3000:] + done.stderr[-2000:]
    assert "shortest violating schedule: starlette_shop.app.cw." in done.stdout
