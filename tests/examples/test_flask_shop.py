"""The example service examples/flask_shop, over real HTTP, on the session's PostgreSQL, with
payrace's fake Razorpay holding the shop's own keys.

Both variants capture, settle and answer repeats alike one request at a time; raced (the
client callback and a payment.authorized webhook at once), the buggy one settles a bill twice
and the fixed one never does. The count is the test's own: a trigger on shop.bills recording
every UPDATE, not payrace's oracle.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from psycopg import sql
from shop_process import PREFIX, ROOT, SHOP_KEYS, ShopProcess, shop_env, shop_env_keys

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import (
    client_callback,
    hmac_hex,
    signed_webhook,
    webhook_event,
)
from payrace.harness.infra.processes import group_members
from payrace.harness.infra.provider import Database

# Every test here talks to a shop subprocess.
pytestmark = pytest.mark.slow

ROUNDS = 30
# A real gateway takes hundreds of milliseconds to capture; a little of that keeps the
# buggy flow's window (its read to its commit) open long enough to be raced every time.
CAPTURE_LATENCY_S = 0.02

BILL_UPDATES = """
CREATE TABLE IF NOT EXISTS flask_shop_bill_updates (
    bill_id bigint NOT NULL, txid bigint NOT NULL DEFAULT txid_current());
CREATE OR REPLACE FUNCTION flask_shop_count_bill_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO flask_shop_bill_updates (bill_id) VALUES (NEW.id);
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS flask_shop_bill_updates ON shop.bills;
CREATE TRIGGER flask_shop_bill_updates AFTER UPDATE ON shop.bills
    FOR EACH ROW EXECUTE FUNCTION flask_shop_count_bill_update();
"""
DROP_BILL_UPDATES = """
DROP TRIGGER IF EXISTS flask_shop_bill_updates ON shop.bills;
DROP FUNCTION IF EXISTS flask_shop_count_bill_update();
DROP TABLE IF EXISTS flask_shop_bill_updates;
"""


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[FakeRazorpay, str]]:
    fake = FakeRazorpay(SHOP_KEYS)
    with GatewayServer(fake) as server:
        yield fake, server.url


def _start(
    pg: Database, gateway: tuple[FakeRazorpay, str], variant: str, logs: Path
) -> ShopProcess:
    return ShopProcess(shop_env(pg, gateway[1], variant), log_path=logs / f"{variant}.log")


@pytest.fixture(scope="module")
def shops(
    pg: Database, gateway: tuple[FakeRazorpay, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ShopProcess]]:
    logs = tmp_path_factory.mktemp("flask_shop")
    with _start(pg, gateway, "buggy", logs) as buggy, _start(pg, gateway, "fixed", logs) as fixed:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(BILL_UPDATES)  # the shops have created shop.bills by now
        try:
            yield {"buggy": buggy, "fixed": fixed}
        finally:
            with psycopg.connect(pg.url, autocommit=True) as conn:
                conn.execute(DROP_BILL_UPDATES)


@dataclass
class Shop:
    """One running variant and what the tests do to it."""

    url: str
    fake: FakeRazorpay
    db: psycopg.Connection[Any]

    def purchase(self, amount: int = 50_000) -> dict[str, Any]:
        reply = httpx.post(f"{self.url}/purchases", json={"amount": amount, "currency": "INR"})
        assert reply.status_code == 201, reply.text
        body: dict[str, Any] = reply.json()
        return body

    def authorized(self, amount: int = 50_000) -> tuple[dict[str, Any], str]:
        """A purchase and the payment the customer authorized for it at the gateway."""
        created = self.purchase(amount)
        payment = self.fake.authorize_payment(created["purchase"]["razorpay_order_id"])
        return created, payment["id"]

    def callback(self, created: dict[str, Any], payment_id: str, **override: str) -> httpx.Response:
        order_id = created["purchase"]["razorpay_order_id"]
        form = client_callback(order_id, payment_id, SHOP_KEYS.key_secret)
        form |= {"charge_id": str(created["charge"]["id"]), **override}
        return httpx.post(f"{self.url}/checkout/callback", data=form)

    def webhook(
        self, event: str, payment_id: str, secret: str = SHOP_KEYS.webhook_secret
    ) -> httpx.Response:
        payment = self.fake.payment(payment_id)
        assert payment is not None
        envelope = webhook_event(event, payment, account_id=SHOP_KEYS.account_id)
        body, headers = signed_webhook(envelope, secret)
        return httpx.post(f"{self.url}/hooks/razorpay", content=body, headers=headers)

    def states(self, created: dict[str, Any]) -> tuple[str, str, str, str | None]:
        """(charge, bill, purchase, razorpay_payment_id) as committed."""
        row = self.db.execute(
            "SELECT c.state, b.state, p.state, c.razorpay_payment_id FROM shop.charges c"
            " JOIN shop.purchases p ON p.id = c.purchase_id"
            " JOIN shop.bills b ON b.purchase_id = p.id WHERE c.id = %s",
            (created["charge"]["id"],),
        ).fetchone()
        assert row is not None
        return row[0], row[1], row[2], row[3]

    def bill_updates(self, created: dict[str, Any]) -> int:
        """How many transactions updated this purchase's bill."""
        row = self.db.execute(
            "SELECT count(DISTINCT u.txid) FROM flask_shop_bill_updates u"
            " JOIN shop.bills b ON b.id = u.bill_id WHERE b.purchase_id = %s",
            (created["purchase"]["id"],),
        ).fetchone()
        assert row is not None
        return int(row[0])


def _shop(
    variant: str, shops: dict[str, ShopProcess], fake: FakeRazorpay, pg: Database
) -> Iterator[Shop]:
    with psycopg.connect(pg.url, autocommit=True) as db:
        yield Shop(shops[variant].url, fake, db)


@pytest.fixture(params=["buggy", "fixed"])
def shop(
    request: pytest.FixtureRequest,
    shops: dict[str, ShopProcess],
    gateway: tuple[FakeRazorpay, str],
    pg: Database,
) -> Iterator[Shop]:
    yield from _shop(request.param, shops, gateway[0], pg)


@pytest.fixture
def fixed(
    shops: dict[str, ShopProcess], gateway: tuple[FakeRazorpay, str], pg: Database
) -> Iterator[Shop]:
    yield from _shop("fixed", shops, gateway[0], pg)


@pytest.fixture
def buggy(
    shops: dict[str, ShopProcess], gateway: tuple[FakeRazorpay, str], pg: Database
) -> Iterator[Shop]:
    yield from _shop("buggy", shops, gateway[0], pg)


# -- one request at a time: both variants -------------------------------------------------


def test_a_purchase_answers_nested_ids_and_creates_the_order_at_the_gateway(shop: Shop) -> None:
    created = shop.purchase(12_300)
    order_id = created["purchase"]["razorpay_order_id"]
    assert order_id.startswith("order_")
    assert created["purchase"]["state"] == "open"
    assert created["charge"]["state"] == "created"
    assert isinstance(created["charge"]["id"], int)
    order = shop.fake.order(order_id)
    assert order is not None and order["amount"] == 12_300
    assert shop.states(created) == ("created", "due", "open", None)


def test_the_callback_captures_at_the_gateway_and_settles_bill_and_purchase(shop: Shop) -> None:
    created, payment_id = shop.authorized()
    reply = shop.callback(created, payment_id)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {
        "charge": {"id": created["charge"]["id"], "state": "captured"},
        "repeat": False,
    }
    assert shop.states(created) == ("captured", "settled", "paid", payment_id)
    assert shop.fake.capture_calls(payment_id) == 1
    assert shop.bill_updates(created) == 1


def test_payment_authorized_webhook_captures_at_the_gateway_and_settles(shop: Shop) -> None:
    created, payment_id = shop.authorized()
    reply = shop.webhook("payment.authorized", payment_id)
    assert reply.status_code == 200, reply.text
    assert reply.json()["repeat"] is False
    assert shop.states(created) == ("captured", "settled", "paid", payment_id)
    assert shop.fake.capture_calls(payment_id) == 1


@pytest.mark.parametrize("event", ["payment.captured", "order.paid"])
def test_a_captured_event_settles_without_calling_the_gateway(shop: Shop, event: str) -> None:
    created, payment_id = shop.authorized()
    reply = shop.webhook(event, payment_id)
    assert reply.status_code == 200, reply.text
    assert reply.json()["event"] == event
    assert shop.states(created) == ("captured", "settled", "paid", payment_id)
    assert shop.fake.capture_calls(payment_id) == 0


def test_repeats_are_answered_as_repeats_and_write_nothing(shop: Shop) -> None:
    created, payment_id = shop.authorized()
    assert shop.callback(created, payment_id).json()["repeat"] is False
    again = shop.callback(created, payment_id)
    assert again.status_code == 200 and again.json()["repeat"] is True
    for event in ("payment.authorized", "payment.captured", "order.paid"):
        late = shop.webhook(event, payment_id)
        assert late.status_code == 200 and late.json()["repeat"] is True, late.text
    assert shop.bill_updates(created) == 1
    assert shop.fake.capture_calls(payment_id) == 1


def test_other_events_are_acknowledged_and_change_nothing(shop: Shop) -> None:
    created, payment_id = shop.authorized()
    reply = shop.webhook("payment.failed", payment_id)
    assert reply.status_code == 200 and reply.json() == {"event": "payment.failed", "ignored": True}
    assert shop.states(created) == ("created", "due", "open", None)


# -- bad input: a 4xx with a JSON error, nothing written ----------------------------------


def _error(reply: httpx.Response, status: int) -> str:
    assert reply.status_code == status, reply.text
    code: str = reply.json()["error"]["code"]
    return code


@pytest.mark.parametrize(
    "override",
    [
        {"razorpay_signature": "0" * 64},
        {"razorpay_signature": "ü" * 64},  # the SDK's TypeError, not its own error
        {"razorpay_payment_id": "pay_AnotherPayment"},  # signed for another payment
    ],
)
def test_a_callback_with_a_bad_signature_is_400_and_writes_nothing(
    shop: Shop, override: dict[str, str]
) -> None:
    created, payment_id = shop.authorized()
    assert _error(shop.callback(created, payment_id, **override), 400) == "bad_signature"
    assert shop.states(created) == ("created", "due", "open", None)
    assert shop.bill_updates(created) == 0
    assert shop.fake.capture_calls(payment_id) == 0


def test_a_webhook_with_a_bad_or_missing_signature_is_400_and_writes_nothing(shop: Shop) -> None:
    created, payment_id = shop.authorized()
    assert (
        _error(shop.webhook("payment.authorized", payment_id, "wrong_secret"), 400)
        == "bad_signature"
    )
    unsigned = httpx.post(f"{shop.url}/hooks/razorpay", json={"event": "payment.captured"})
    assert _error(unsigned, 400) == "bad_signature"
    assert shop.states(created) == ("created", "due", "open", None)
    assert shop.fake.capture_calls(payment_id) == 0


def test_an_unknown_charge_is_404(shop: Shop) -> None:
    created, payment_id = shop.authorized()
    # Signed correctly, but for a charge the shop never made.
    reply = shop.callback(created, payment_id, charge_id=str(2**62))
    assert _error(reply, 404) == "unknown_charge"
    assert shop.fake.capture_calls(payment_id) == 0


def test_a_webhook_for_an_unknown_order_is_404(shop: Shop) -> None:
    other = FakeRazorpay(SHOP_KEYS)  # an order the shop's gateway never saw
    order = other.create_order({"amount": 50_000, "currency": "INR"})
    payment = other.authorize_payment(order["id"])
    body, headers = signed_webhook(
        webhook_event("payment.captured", payment), SHOP_KEYS.webhook_secret
    )
    reply = httpx.post(f"{shop.url}/hooks/razorpay", content=body, headers=headers)
    assert _error(reply, 404) == "unknown_order"


def test_a_callback_for_another_purchases_order_is_400(shop: Shop) -> None:
    created = shop.purchase()
    other, other_payment = shop.authorized()
    # A valid signature for the other purchase's order, posted with this charge's id.
    reply = shop.callback(other, other_payment, charge_id=str(created["charge"]["id"]))
    assert _error(reply, 400) == "order_mismatch"
    assert shop.states(created) == ("created", "due", "open", None)


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    [
        ("/purchases", {"json": {"amount": "500", "currency": "INR"}}, 400, "bad_amount"),
        ("/purchases", {"json": {"amount": True}}, 400, "bad_amount"),
        ("/purchases", {"json": {"amount": 500, "currency": "rupees"}}, 400, "bad_currency"),
        ("/purchases", {"content": b"{not json"}, 400, "bad_request"),
        ("/checkout/callback", {"data": {"charge_id": "1"}}, 400, "missing_field"),
        ("/checkout/callback", {"json": {"charge_id": 1}}, 400, "missing_field"),
        ("/nowhere", {}, 404, "not_found"),
    ],
)
def test_bad_input_is_a_json_4xx_never_a_500(
    fixed: Shop, path: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    assert _error(httpx.post(f"{fixed.url}{path}", **kwargs), status) == code


@pytest.mark.parametrize("charge_id", ["abc", "-1", "0", "²", str(2**63)])
def test_a_charge_id_that_is_no_id_is_400(fixed: Shop, charge_id: str) -> None:
    created, payment_id = fixed.authorized()
    assert _error(fixed.callback(created, payment_id, charge_id=charge_id), 400) == "bad_charge_id"


@pytest.mark.parametrize("body", [b"[]", b"not json", b'{"event": "payment.captured"}'])
def test_a_signed_webhook_that_is_no_payment_event_is_400(fixed: Shop, body: bytes) -> None:
    headers = {"X-Razorpay-Signature": hmac_hex(body, SHOP_KEYS.webhook_secret)}
    reply = httpx.post(f"{fixed.url}/hooks/razorpay", content=body, headers=headers)
    assert _error(reply, 400) == "bad_event"


def test_the_shop_refuses_to_start_without_its_settings(pg: Database) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOP_")}
    done = subprocess.run(
        [sys.executable, "-m", "examples.flask_shop", "--port", "0"],
        cwd=ROOT, env={**env, "SHOP_DATABASE_URL": pg.url}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "SHOP_RAZORPAY_KEY_ID" in done.stderr and "Traceback" not in done.stderr


def test_the_shop_stops_cleanly_and_a_failed_start_is_stopped_too(
    pg: Database, gateway: tuple[FakeRazorpay, str], tmp_path: Path
) -> None:
    with ShopProcess(shop_env(pg, gateway[1], "fixed"), log_path=tmp_path / "ok.log") as shop:
        assert httpx.get(f"{shop.url}/health").json() == {"ok": True, "variant": "fixed"}
    assert shop.proc is not None and shop.proc.returncode == 0  # SIGTERM unwinds the pool
    assert "listening on http://" in (tmp_path / "ok.log").read_text()

    broken = ShopProcess({**shop_env(pg, gateway[1], "fixed"), "SHOP_VARIANT": "maybe"})
    with pytest.raises(RuntimeError, match="exited with code 2"):
        broken.__enter__()
    assert broken.proc is not None and broken.proc.returncode == 2
    assert group_members(broken.proc.pid) == []


# -- the payrace profile describes this shop ----------------------------------------------
# Checked here by hand, until payrace loads profiles itself: its routes answer, its reply paths
# resolve, its keys are the shop's variables, its tables, columns and done values are real.


def _dotted(body: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        body = body[key]
    return body


def _filled(template: dict[str, str], values: dict[str, Any]) -> dict[str, Any]:
    # Every value in the shop's profile is exactly one placeholder.
    return {field: values[placeholder.strip("{}")] for field, placeholder in template.items()}


def test_the_payrace_profile_describes_the_running_shop(fixed: Shop) -> None:
    profile = tomllib.loads((ROOT / "examples" / "flask_shop" / "payrace.toml").read_text())
    base = urlsplit(profile["target"]["base_url"])
    assert base.path == PREFIX
    assert set(profile["keys"].values()) == {
        "SHOP_RAZORPAY_KEY_ID", "SHOP_RAZORPAY_KEY_SECRET", "SHOP_RAZORPAY_WEBHOOK_SECRET",
    }  # fmt: skip

    create = profile["create_order"]
    reply = httpx.post(
        f"{fixed.url}{create['path']}",
        json=_filled(create["body"], {"amount": 50_000, "currency": "INR"}),
    )
    assert reply.status_code in create["status"], reply.text
    created = reply.json()
    charge_id = _dotted(created, create["payment_id"])
    order_id = _dotted(created, create["gateway_order_id"])
    payment_id = fixed.fake.authorize_payment(order_id)["id"]

    callback = profile["callback"]
    assert callback["encoding"] == "form"
    values = {
        **client_callback(order_id, payment_id, SHOP_KEYS.key_secret),
        "payment_id": charge_id,
    }
    sent = httpx.post(f"{fixed.url}{callback['path']}", data=_filled(callback["body"], values))
    assert sent.status_code == 200, sent.text
    late = fixed.webhook("payment.captured", payment_id)
    assert late.request.url.path == f"{PREFIX}{profile['webhook']['path']}"
    assert late.status_code == 200, late.text

    oracle = profile["oracle"]
    for role in ("payments", "invoices", "orders"):
        watched = oracle[role]
        schema, table = watched["table"].split(".")
        columns = {watched.get("id_column", "id"), watched["status_column"]}
        columns |= {watched[k] for k in ("order_column", "payment_column") if k in watched}
        if role == "payments":
            columns |= {oracle["payment_order_column"], oracle["gateway_payment_column"]}
        found = {
            row[0]
            for row in fixed.db.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = %s AND table_name = %s",
                (schema, table),
            )
        }
        assert columns <= found, f"[oracle.{role}] names columns {sorted(columns - found)}"
        link = "id" if role == "orders" else "purchase_id"
        query = sql.SQL("SELECT {} FROM {} WHERE {} = %s").format(
            sql.Identifier(watched["status_column"]),
            sql.Identifier(schema, table),
            sql.Identifier(link),
        )
        status = fixed.db.execute(query, (created["purchase"]["id"],)).fetchone()
        assert status == (watched["done_value"],), role


# -- raced: the callback and a payment.authorized webhook at once ------------------------


def _race(shop: Shop) -> tuple[dict[str, Any], str, list[int]]:
    """Fire the callback and the webhook for one payment together; their statuses."""
    created, payment_id = shop.authorized()
    start = threading.Barrier(2, timeout=10)

    def send(which: str) -> int:
        start.wait()
        if which == "callback":
            return shop.callback(created, payment_id).status_code
        return shop.webhook("payment.authorized", payment_id).status_code

    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(send, ("callback", "webhook")))
    return created, payment_id, statuses


@pytest.fixture
def slow_capture(gateway: tuple[FakeRazorpay, str]) -> Iterator[None]:
    fake = gateway[0]
    before = fake.knobs()
    fake.set_knobs(capture_latency_s=CAPTURE_LATENCY_S)
    try:
        yield
    finally:
        fake.set_knobs(**before)


def _settled_twice(shop: Shop) -> tuple[int, int]:
    """(rounds whose bill was updated by two transactions, rounds with two capture calls)."""
    doubled = captured_twice = 0
    for _ in range(ROUNDS):
        created, payment_id, statuses = _race(shop)
        assert statuses == [200, 200]
        assert shop.states(created) == ("captured", "settled", "paid", payment_id)
        doubled += shop.bill_updates(created) > 1
        captured_twice += shop.fake.capture_calls(payment_id) > 1
    return doubled, captured_twice


@pytest.mark.usefixtures("slow_capture")
def test_raced_the_buggy_variant_settles_a_bill_twice(buggy: Shop) -> None:
    doubled, captured_twice = _settled_twice(buggy)
    assert doubled >= 1, f"no bill settled twice in {ROUNDS} races"
    assert captured_twice >= 1  # the seed's double capture, seen at the gateway too


@pytest.mark.usefixtures("slow_capture")
def test_raced_the_fixed_variant_settles_every_bill_once(fixed: Shop) -> None:
    assert _settled_twice(fixed) == (0, 0)


# -- raced by payrace, through the shop's own profile (examples/flask_shop/payrace.toml) ----


@pytest.fixture
def shop_keys_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The profile names the shop's keys by environment variable, as a team's CI would."""
    for name, value in shop_env_keys().items():
        monkeypatch.setenv(name, value)


async def _payrace(
    shops: dict[str, ShopProcess],
    gateway: tuple[FakeRazorpay, str],
    pg: Database,
    tmp_path: Path,
    variant: str,
    **fields: Any,
) -> dict[str, Any]:
    from payrace.harness.runner.config import RunConfig
    from payrace.harness.runner.run import run

    config = RunConfig(
        profile=ROOT / "examples/flask_shop/payrace.toml",
        target=shops[variant].url,  # the shop runs on a free port, not the profile's 8000
        target_dsn=pg.url,
        gateway_url=gateway[1],
        out_dir=tmp_path,
        **fields,
    )
    return await run(config, announce=lambda line: None)


@pytest.mark.usefixtures("shop_keys_in_env")
async def test_payrace_catches_the_buggy_shop_through_its_profile(
    shops: dict[str, ShopProcess], gateway: tuple[FakeRazorpay, str], pg: Database, tmp_path: Path
) -> None:
    summary = await _payrace(
        shops, gateway, pg, tmp_path, "buggy", mode="aligned", trials=20, expect="violated",
        settle_s=0,  # a violation needs no settled deadlock count
    )  # fmt: skip
    result = summary["strategies"]["flask_shop"]
    assert result["valid"] is False and result["violating_trials"] >= 1
    assert result["checks"]["single_invoice_paid"]["valid"] is False  # bills, via purchases
    assert (summary["verdict"], summary["exit_code"]) == ("violated", 1)


@pytest.mark.usefixtures("shop_keys_in_env")
async def test_payrace_passes_the_fixed_shop_with_its_pool_open(
    shops: dict[str, ShopProcess], gateway: tuple[FakeRazorpay, str], pg: Database, tmp_path: Path
) -> None:
    """No "unknown": the oracle decides no_deadlock though the shop's pool stays open."""
    summary = await _payrace(shops, gateway, pg, tmp_path, "fixed", mode="aligned", trials=30)
    result = summary["strategies"]["flask_shop"]
    assert result["expected"] == "valid" and result["valid"] is True
    assert all(check["valid"] is True for check in result["checks"].values())
    assert (summary["verdict"], summary["exit_code"]) == ("valid", 0)
