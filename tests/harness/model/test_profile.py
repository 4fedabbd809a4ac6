"""payrace/harness/model/profile.py: reading a target profile, every mistake named by its key,
and rendering the requests it describes."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from payrace.harness.errors import UsageError
from payrace.harness.gateway.signing import GatewayKeys, hmac_hex
from payrace.harness.model.profile import Outgoing, Profile, foreign_order, render
from payrace.harness.model.watched import OracleConfig

MINIMAL = """
[create_order]
path = "/orders"
body = { amount = "{amount}", currency = "{currency}" }

[callback]
path = "/verify"
body = { id = "{payment_id}", sig = "{razorpay_signature}" }

[webhook]
path = "/hooks"

[oracle.payments]
table = "payments"
done_value = "captured"

[oracle.invoices]
table = "invoices"
done_value = "paid"
payment_column = "payment_id"

[oracle.orders]
table = "orders"
done_value = "paid"
"""


def write(tmp_path: Path, text: str, name: str = "shop.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Profile:
    return Profile.load(write(tmp_path, text))


def test_the_reference_profile_describes_the_reference_service() -> None:
    profile = Profile.reference()
    assert profile.oracle == OracleConfig.reference()
    assert profile.keys == GatewayKeys()
    assert (profile.create_order.path, profile.callback.path, profile.webhook.path) == (
        "/orders",
        "/payments/verify",
        "/webhooks/razorpay",
    )
    assert profile.force == "pause"


def test_a_minimal_profile_takes_the_documented_defaults(tmp_path: Path) -> None:
    profile = load(tmp_path, MINIMAL)
    assert profile.name == "shop"  # the file's stem
    assert profile.base_url is None and profile.expect is None and profile.force == "locks"
    assert profile.create_order.by == "service" and profile.create_order.status == (200, 201)
    assert profile.create_order.payment_id == "payment_id"
    assert profile.callback.method == "POST" and profile.callback.encoding == "json"
    assert profile.describe_key("key_secret") == "payrace's default test keys"


def test_a_lone_placeholder_keeps_its_type_and_text_is_filled_in() -> None:
    values = {"payment_id": 42, "amount": 500}
    assert render("{payment_id}", values) == 42
    assert render("charge-{payment_id}", values) == "charge-42"
    assert render({"a": ["{amount}", {"b": "{{x}}"}]}, values) == {"a": [500, {"b": "{x}"}]}


def test_json_and_form_bodies_are_rendered_from_one_template(tmp_path: Path) -> None:
    form = MINIMAL.replace('path = "/verify"', 'path = "/verify/{payment_id}"\nencoding = "form"')
    profile = load(tmp_path, form)
    values = {"payment_id": 7, "razorpay_signature": "abc", "amount": 1, "currency": "INR"}
    out = profile.callback.outgoing(values)
    assert out.path == "/verify/7"
    assert out.headers["content-type"] == "application/x-www-form-urlencoded"
    assert parse_qs(out.body.decode()) == {"id": ["7"], "sig": ["abc"]}
    out = load(tmp_path, MINIMAL).callback.outgoing(values)
    assert json.loads(out.body) == {"id": 7, "sig": "abc"}
    assert out.headers["content-type"] == "application/json"


def test_ids_are_read_from_a_nested_reply(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'path = "/orders"',
        'path = "/orders"\npayment_id = "charge.id"\ngateway_order_id = "purchase.rzp"',
    )
    spec = load(tmp_path, text).create_order
    reply = {"charge": {"id": "12"}, "purchase": {"rzp": "order_abc"}}
    assert spec.ids(reply, 201) == (12, "order_abc")
    with pytest.raises(UsageError, match=r"\[create_order\].payment_id = 'charge.id'.*no such"):
        spec.ids({"purchase": {"rzp": "order_abc"}}, 201)
    with pytest.raises(UsageError, match="integer payment id"):
        spec.ids({"charge": {"id": "uuid-1"}, "purchase": {"rzp": "o"}}, 201)
    with pytest.raises(UsageError, match=r"gateway_order_id = 'purchase.rzp'.*by = \"payrace\""):
        spec.ids({"charge": {"id": 1}}, 201)


def test_keys_come_from_the_environment_and_their_source_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_SECRET", "s3cret")
    text = '[keys]\nkey_id = "rzp_test_shop"\nkey_secret_env = "SHOP_SECRET"\n' + MINIMAL
    profile = load(tmp_path, text)
    assert profile.keys.key_id == "rzp_test_shop" and profile.keys.key_secret == "s3cret"
    assert profile.describe_key("key_secret") == "environment variable SHOP_SECRET"
    assert "s3cret" not in profile.describe_key("key_secret")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t + '\n[extra]\nx = 1\n', r"unknown key\(s\) extra"),
        (lambda t: t.replace("[webhook]\n", "[webhook]\nbody = { a = 1 }\n"),
         r"\[webhook\]: unknown key\(s\) body"),
        (lambda t: t.replace('path = "/hooks"', ""), r"\[webhook\].path is required"),
        (lambda t: t.replace('"{razorpay_signature}"', '"{signatur}"'),
         r"\[callback\].body: unknown placeholder \{signatur\}"),
        (lambda t: t.replace('"{amount}"', '"{payment_id}"'),
         r"\[create_order\].body: unknown placeholder \{payment_id\}"),
        (lambda t: t.replace('"{amount}"', '"{gateway_order_id}"'), r'set by = "payrace"'),
        (lambda t: t.replace('path = "/hooks"', 'path = "/hooks/{"'), r"a lone '\{'"),
        (lambda t: t.replace('path = "/hooks"', 'path = "/hooks"\nmethod = "GET"'),
         r"\[webhook\].method must be one of POST"),
        (lambda t: t.replace('path = "/verify"', 'path = "/verify"\nencoding = "xml"'),
         r"\[callback\].encoding must be json or form"),
        (lambda t: '[target]\nbase_url = "127.0.0.1:8000"\n' + t, r"\[target\].base_url must be"),
        (lambda t: '[target]\nexpect = "green"\n' + t, r"\[target\].expect must be valid or"),
        (lambda t: '[target]\nforce = "magic"\n' + t, r"\[target\].force must be locks or pause"),
        (lambda t: '[target]\nhook = "no colon"\n' + t, r"\[target\].hook must be module:function"),
        (lambda t: '[keys]\nkey_secret = "a"\nkey_secret_env = "B"\n' + t, "gives both"),
        (lambda t: '[keys]\nwebhook_secret_env = "PAYRACE_TEST_UNSET_VAR"\n' + t,
         "PAYRACE_TEST_UNSET_VAR is not set"),
        (lambda t: t.replace('path = "/orders"', 'path = "/orders"\nstatus = [500]'),
         r"\[create_order\].status must be a 2xx"),
        (lambda t: t.replace("[oracle.orders]", "[oracle.order]"), r"\[oracle\]: unknown key"),
        (lambda t: t.replace('payment_column = "payment_id"', ""), "payment_column"),
        (lambda t: t.replace("[callback]", "[callbak]"), r"unknown key\(s\) callbak"),
    ],
)  # fmt: skip
def test_every_mistake_is_a_usage_error_naming_its_key(
    tmp_path: Path, change: Any, message: str
) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        load(tmp_path, change(MINIMAL))
    assert "shop.toml" in str(caught.value)


def test_an_unreadable_or_broken_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read the profile"):
        Profile.load(tmp_path / "missing.toml")
    with pytest.raises(UsageError, match="cannot read the profile"):
        (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
        Profile.load(tmp_path / "binary.toml")
    with pytest.raises(UsageError, match="is not valid TOML"):
        load(tmp_path, "[create_order\n")


def test_env_placeholders_are_filled_when_sent_and_a_missing_one_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = MINIMAL.replace(
        'path = "/hooks"', 'path = "/hooks"\nheaders = { X-Token = "{env:SHOP_T}" }'
    )
    profile = load(tmp_path, text)
    monkeypatch.setenv("SHOP_T", "tok")
    assert profile.webhook.outgoing({}).headers["x-token"] == "tok"
    monkeypatch.delenv("SHOP_T")
    with pytest.raises(
        UsageError, match=r"\[webhook\]\.headers\.X-Token: environment variable SHOP_T"
    ):
        profile.webhook.outgoing({})


def test_a_hook_is_imported_and_a_missing_one_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shop_race_hooks.py").write_text(
        "def before_send(action, request):\n    request.headers['x-csrf'] = action\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    profile = load(tmp_path, '[target]\nhook = "shop_race_hooks:before_send"\n' + MINIMAL)
    hook = profile.before_send()
    assert hook is not None
    out = Outgoing("callback", "POST", "/verify", {}, b"")
    hook("callback", out)
    assert out.headers == {"x-csrf": "callback"}
    missing = load(tmp_path, '[target]\nhook = "shop_race_hooks:after_send"\n' + MINIMAL)
    with pytest.raises(UsageError, match=r"hook = 'shop_race_hooks:after_send' cannot be imported"):
        missing.before_send()
    sys.modules.pop("shop_race_hooks", None)


def test_overrides_replace_the_url_and_the_oracle(tmp_path: Path) -> None:
    profile = load(tmp_path, MINIMAL).with_overrides(
        base_url="https://127.0.0.1:8443/shop", oracle=OracleConfig.reference()
    )
    assert profile.base_url == "https://127.0.0.1:8443/shop"
    with pytest.raises(UsageError, match="--target must be a URL"):
        profile.with_overrides(base_url="ftp://x")


def test_a_file_named_for_the_tool_takes_its_folders_name(tmp_path: Path) -> None:
    (tmp_path / "shop").mkdir()
    assert Profile.load(write(tmp_path / "shop", MINIMAL, "payrace.toml")).name == "shop"
    named = '[target]\nname = "checkout"\n' + MINIMAL
    assert Profile.load(write(tmp_path / "shop", named, "payrace.toml")).name == "checkout"


# -- the requests a race sends, and what their answers say ----------------------------------

PAYMENT = {
    "id": "pay_00000000000001",
    "entity": "payment",
    "amount": 500,
    "currency": "INR",
    "status": "authorized",
    "order_id": "order_0000000000001",
    "captured": False,
}
VALUES = {"amount": 500, "currency": "INR", "gateway_order_id": "order_0000000000001"}


def test_the_callback_is_signed_with_the_profiles_key_secret(tmp_path: Path) -> None:
    profile = load(tmp_path, '[keys]\nkey_secret = "shop_secret"\n' + MINIMAL)
    out = profile.signed_callback({**VALUES, "payment_id": 9}, PAYMENT["order_id"], PAYMENT["id"])
    body = json.loads(out.body)
    expected = hmac_hex(f"{PAYMENT['order_id']}|{PAYMENT['id']}".encode(), "shop_secret")
    assert body == {"id": 9, "sig": expected} and out.path == "/verify"


def test_a_webhook_is_razorpays_envelope_signed_as_sent(tmp_path: Path) -> None:
    profile = load(tmp_path, '[keys]\nwebhook_secret = "shop_hook"\n' + MINIMAL)
    out = profile.signed_webhook({**VALUES, "payment_id": 9}, "order.paid", PAYMENT, "evt_1")
    assert out.path == "/hooks" and out.headers["x-razorpay-event-id"] == "evt_1"
    assert out.headers["x-razorpay-signature"] == hmac_hex(out.body, "shop_hook")
    envelope = json.loads(out.body)
    assert (
        envelope["event"] == "order.paid"
        and envelope["payload"]["order"]["entity"]["amount"] == 500
    )
    again = profile.signed_webhook(VALUES | {"payment_id": 9}, "order.paid", PAYMENT, "evt_1")
    assert again.headers["x-razorpay-event-id"] == "evt_1"  # a redelivery: the same event id


def test_a_hook_that_reshapes_a_signed_webhook_is_a_usage_error(tmp_path: Path) -> None:
    profile = load(tmp_path, MINIMAL)

    def reshape(action: str, request: Outgoing) -> None:
        request.body += b" "

    with pytest.raises(UsageError, match="changed a webhook's body"):
        profile.signed_webhook(
            VALUES | {"payment_id": 1}, "payment.captured", PAYMENT, None, reshape
        )


@pytest.mark.parametrize(
    ("action", "status", "body", "says"),
    [
        (
            "callback",
            404,
            {"error": {"code": "not_found"}},
            r"POST /v with HTTP 404 .*\[callback\]\.path and \.method in .*shop\.toml",
        ),
        ("webhook", 405, "Method Not Allowed", r"HTTP 405 .*check \[webhook\]\.path"),
        (
            "callback",
            400,
            {"error": {"code": "bad_signature"}},
            r"signature on a verify .*key_secret from payrace's default test keys",
        ),
        ("webhook", 401, "invalid signature", r"the webhook secret .*webhook_secret from"),
    ],
)
def test_an_answer_that_shows_a_setup_mistake_names_the_fix(
    tmp_path: Path, action: str, status: int, body: object, says: str
) -> None:
    mistake = load(tmp_path, MINIMAL).setup_mistake(action, "POST", "/v", status, body)
    assert mistake is not None and re.search(says, mistake), mistake


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, {"status": "captured"}),
        (409, {"error": {"code": "conflict"}}),
        (503, "busy"),
        (400, {"error": "amount"}),
    ],
)
def test_the_targets_own_answers_are_no_setup_mistake(
    tmp_path: Path, status: int, body: object
) -> None:
    assert load(tmp_path, MINIMAL).setup_mistake("callback", "POST", "/v", status, body) is None


def test_the_create_order_reply_gives_the_ids_or_names_the_fix(tmp_path: Path) -> None:
    profile = load(tmp_path, MINIMAL)
    reply = json.dumps({"payment_id": 3, "gateway_order_id": "order_x"})
    assert profile.order_answer("POST /orders", 201, reply) == (3, "order_x")
    with pytest.raises(UsageError, match=r"POST /orders with HTTP 404 .*check \[create_order\]"):
        profile.order_answer("POST /orders", 404, "Not Found")
    with pytest.raises(UsageError, match="but no JSON"):
        profile.order_answer("POST /orders", 201, "<html>")
    with pytest.raises(RuntimeError, match="HTTP 503"):  # the target's trouble, not the setup
        profile.order_answer("POST /orders", 503, '{"error": {"code": "database_unavailable"}}')


def test_an_order_the_gateway_never_saw_points_at_the_gateway_url() -> None:
    said = foreign_order("order_x", "HTTP 400: no such order")
    assert "'order_x' (HTTP 400: no such order)" in said and "--gateway-url" in said
