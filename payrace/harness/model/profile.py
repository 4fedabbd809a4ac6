"""A target profile: how payrace talks to a payment service and what it watches (docs/profile.md).

    Profile        where the target listens, its Razorpay test keys, its three actions, the
                   oracle's view of its schema; load() checks every key before anything starts,
                   reference() is the reference service's own profile
    Action         one HTTP request: method, path, encoding, body and header templates
    CreateOrder    Action + who creates the order at the gateway and where the ids come back
    Outgoing       a rendered request (what a hook may still change)
    render()       a template with {placeholders} -> its value (a lone placeholder keeps its type)
    Profile.order_answer()   the ids in the target's create-order reply, or the setup mistake
                   it shows
    Profile.signed_callback() / signed_webhook()   the client callback and a webhook, signed
                   with the profile's keys, shaped by its routes and its hook (the runner and
                   the Locust workers send exactly these)
    Profile.setup_mistake()   what an answer to a callback or webhook says about the setup (a
                   route the target does not serve, a signature it refuses), with the fix
    foreign_order()  the fix when the fake gateway does not know the target's order

Light on purpose (tomllib, json, urllib; psycopg's sql through model.watched): the Locust
workers import it, and they must not import the web stack.

Every target is raced through a profile, the reference service too, so there is one path.
Templates are TOML values rather than a string of JSON: a body's numbers stay numbers, and
the same template serves a JSON and a form-encoded route.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

from payrace.harness.errors import UsageError
from payrace.harness.gateway.signing import (
    GatewayKeys,
    client_callback,
    new_event_id,
    signed_webhook,
    webhook_event,
)
from payrace.harness.model.watched import OracleConfig, OracleError

Encoding = Literal["json", "form"]
Force = Literal["locks", "pause"]

# What each action may refer to (docs/profile.md, "Placeholders").
_COMMON = frozenset({"amount", "currency"})
_AVAILABLE: dict[str, frozenset[str]] = {
    "create_order": _COMMON | {"gateway_order_id"},
    "callback": _COMMON
    | {
        "gateway_order_id",
        "payment_id",
        "razorpay_order_id",
        "razorpay_payment_id",
        "razorpay_signature",
    },
    "webhook": _COMMON | {"gateway_order_id", "payment_id"},
}
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(env:[A-Za-z_][A-Za-z0-9_]*|[a-z_]+)\}|[{}]")
_METHODS = ("POST", "PUT", "PATCH")
_SECRET_KEYS = ("key_secret", "webhook_secret")
# Which secret a refused signature points at, by the action that carried it.
_SIGNED_WITH = {
    "callback": (
        "key_secret",
        "the key secret (the client callback is signed with RAZORPAY_KEY_SECRET)",
    ),
    "webhook": (
        "webhook_secret",
        "the webhook secret (webhooks are signed with RAZORPAY_WEBHOOK_SECRET)",
    ),
}


@dataclass
class Outgoing:
    """A rendered request; a profile's hook may change any of it before it is sent."""

    action: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def render(template: Any, values: Mapping[str, Any], where: str = "") -> Any:
    """Fill a template's placeholders. A string that is exactly one placeholder becomes that
    value with its own type ("{payment_id}" -> 42); tables and arrays are filled inside."""
    if isinstance(template, dict):
        return {k: render(v, values, f"{where}.{k}") for k, v in template.items()}
    if isinstance(template, list):
        return [render(v, values, where) for v in template]
    if not isinstance(template, str):
        return template
    whole = _PLACEHOLDER.fullmatch(template)
    if whole and whole[1]:
        return _value(whole[1], values, where)

    def one(m: re.Match[str]) -> str:
        if m[0] in ("{{", "}}"):
            return m[0][0]
        return str(_value(m[1], values, where))

    return _PLACEHOLDER.sub(one, template)


def _value(name: str, values: Mapping[str, Any], where: str) -> Any:
    if name.startswith("env:"):
        var = name[4:]
        if var not in os.environ:
            raise UsageError(f"{where}: environment variable {var} is not set")
        return os.environ[var]
    return values[name]


def _placeholders(template: Any) -> set[str]:
    if isinstance(template, dict):
        return {p for v in template.values() for p in _placeholders(v)}
    if isinstance(template, list):
        return {p for v in template for p in _placeholders(v)}
    if not isinstance(template, str):
        return set()
    found = set()
    for m in _PLACEHOLDER.finditer(template):
        if m[0] in ("{", "}"):
            found.add(m[0])  # a lone brace: reported as an error by the caller
        elif m[1]:
            found.add(m[1])
    return found


@dataclass(frozen=True)
class Action:
    name: str
    path: str
    method: str = "POST"
    encoding: Encoding = "json"
    body: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)

    def outgoing(self, values: Mapping[str, Any]) -> Outgoing:
        where = f"[{self.name}]"
        body = render(dict(self.body), values, f"{where}.body")
        rendered = render(dict(self.headers), values, f"{where}.headers")
        headers = {k.lower(): str(v) for k, v in rendered.items()}
        if self.encoding == "form":
            raw = urlencode({k: _form_value(v) for k, v in body.items()}).encode()
            headers.setdefault("content-type", "application/x-www-form-urlencoded")
        else:
            raw = json.dumps(body, separators=(",", ":")).encode()
            headers.setdefault("content-type", "application/json")
        return Outgoing(self.name, self.method, render(self.path, values, where), headers, raw)


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


@dataclass(frozen=True)
class CreateOrder(Action):
    by: Literal["service", "payrace"] = "service"
    status: tuple[int, ...] = (200, 201)
    payment_id: str = "payment_id"
    gateway_order_id: str = "gateway_order_id"

    def ids(self, reply: Any, status: int) -> tuple[int, str | None]:
        """The target's payment id and (by = service) Razorpay's order id from its reply."""
        payment_id = _dig(reply, self.payment_id)
        if isinstance(payment_id, str) and payment_id.isdigit():
            payment_id = int(payment_id)
        if payment_id is None or isinstance(payment_id, bool) or not isinstance(payment_id, int):
            raise UsageError(
                f"[create_order].payment_id = {self.payment_id!r}: the target's HTTP {status} "
                f"reply has {'no such field' if payment_id is None else repr(payment_id)} "
                f"there ({json.dumps(reply)[:200]}); name the field holding the target's "
                "integer payment id (a dotted path such as 'charge.id')"
            )
        if self.by == "payrace":
            return payment_id, None
        order_id = _dig(reply, self.gateway_order_id)
        if not isinstance(order_id, str) or not order_id:
            raise UsageError(
                f"[create_order].gateway_order_id = {self.gateway_order_id!r}: the target's "
                f"HTTP {status} reply has no Razorpay order id there ({json.dumps(reply)[:200]}); "
                'name the field, or set by = "payrace" to let payrace create the order'
            )
        return payment_id, order_id


def _dig(doc: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return None
    return doc


Hook = Callable[[str, Outgoing], None]


@dataclass(frozen=True)
class Profile:
    source: str  # the file, or "reference"
    name: str
    create_order: CreateOrder
    callback: Action
    webhook: Action
    oracle: OracleConfig
    keys: GatewayKeys = field(default_factory=GatewayKeys)
    base_url: str | None = None
    expect: str | None = None
    verify_tls: bool = True
    force: Force = "locks"
    hook: str | None = None
    # Where each key came from ("env SHOP_KEY_SECRET" / "profile" / "default"), for messages
    # that must name a secret's source without printing it.
    key_sources: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def reference(cls) -> Profile:
        """The reference service's profile (payrace/harness/profiles/reference.toml)."""
        text = resources.files("payrace.harness").joinpath("profiles/reference.toml").read_text()
        return _parse(tomllib.loads(text), "reference profile", "reference")

    @classmethod
    def load(cls, path: Path) -> Profile:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the profile {path}: {exc}") from None
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path} is not valid TOML: {exc}") from None
        # A file named for the tool (payrace.toml) says nothing: the project's folder does.
        stem = path.resolve().parent.name if path.stem in ("payrace", "pyproject") else path.stem
        return _parse(doc, str(path), stem)

    def with_overrides(
        self, *, base_url: str | None = None, oracle: OracleConfig | None = None
    ) -> Profile:
        changes: dict[str, Any] = {}
        if base_url is not None:
            _check_url(base_url, "--target")
            changes["base_url"] = base_url
        if oracle is not None:
            changes["oracle"] = oracle
        return replace(self, **changes)

    def describe_key(self, key: str) -> str:
        return self.key_sources.get(key, "default")

    def before_send(self) -> Hook | None:
        """The profile's hook, imported; a missing module or name is a usage error."""
        if self.hook is None:
            return None
        module_name, _, attr = self.hook.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(
                f"{self.source}: [target].hook = {self.hook!r} cannot be imported "
                f"({type(exc).__name__}: {exc}); it must name module:function on sys.path"
            ) from None
        if not callable(fn):
            raise UsageError(f"{self.source}: [target].hook = {self.hook!r} is not callable")
        hook: Hook = fn
        return hook

    # -- the requests a race sends, and what their answers say -----------------------------

    def order_answer(self, route: str, status: int, text: str) -> tuple[int, str | None]:
        """The ids in the target's answer to [create_order] (sent as `route`, "POST /orders").

        A 4xx or a reply without the ids is a UsageError: the order is setup, not the race
        under test, so a refusal means the target does not speak the profile's contract, which
        no trial can fix. Any other status outside `status` is a RuntimeError (a 503 under
        the nemesis is retried by the runner; Locust counts it as a failure)."""
        if 400 <= status < 500:
            raise UsageError(
                f"the target answered {route} with HTTP {status} ({text[:200]}): check "
                f"[create_order] in {self.source} (path, method, encoding, body; "
                "docs/profile.md)"
            )
        if status not in self.create_order.status:
            raise RuntimeError(f"target refused {route}: HTTP {status} {text[:300]}")
        try:
            doc = json.loads(text)
        except ValueError:
            raise UsageError(
                f"the target answered {route} with HTTP {status} but no JSON ({text[:200]}): "
                "payrace reads the payment id from a JSON reply"
            ) from None
        return self.create_order.ids(doc, status)

    def signed_callback(
        self,
        values: Mapping[str, Any],
        gateway_order_id: str,
        gateway_payment_id: str,
        hook: Hook | None = None,
    ) -> Outgoing:
        """The browser's client callback: Razorpay Checkout's fields, signed with the key
        secret, placed by [callback]; `values` are the other placeholders (PaymentContext)."""
        fields = client_callback(gateway_order_id, gateway_payment_id, self.keys.key_secret)
        out = self.callback.outgoing({**values, **fields})
        if hook is not None:
            hook("callback", out)
        return out

    def signed_webhook(
        self,
        values: Mapping[str, Any],
        event: str,
        gateway_payment: dict[str, Any],
        event_id: str | None = None,
        hook: Hook | None = None,
    ) -> Outgoing:
        """Razorpay's envelope for `event`, byte for byte as signed with the webhook secret;
        [webhook] places it (route, headers). The same event id makes a redelivery."""
        envelope = webhook_event(event, gateway_payment, account_id=self.keys.account_id)
        raw, signed = signed_webhook(
            envelope, self.keys.webhook_secret, event_id=event_id or new_event_id()
        )
        out = self.webhook.outgoing(values)
        out.body = raw
        out.headers.update({k.lower(): v for k, v in signed.items()})
        if hook is not None:
            hook("webhook", out)
            if out.body != raw:
                raise UsageError(
                    f"{self.source}: the hook {self.hook} changed a webhook's body, which "
                    "Razorpay signs as sent; change headers or the path only"
                )
        return out

    def setup_mistake(
        self, action: str, method: str, path: str, status: int | None, body: Any
    ) -> str | None:
        """What an answer to a callback or webhook of a payment the target created says about
        the setup, with the fix; None when it is the target's own business to judge.

        The payment exists, so a 404 or 405 means the profile names a route the target does
        not serve; payrace signs correctly, so a refused signature means the target holds
        other test keys than the profile. No trial can fix either."""
        said = str(body)[:200]
        if status in (404, 405):
            return (
                f"the target answered {method} {path} with HTTP {status} ({said}): check "
                f"[{action}].path and .method in {self.source} (docs/profile.md)"
            )
        refused = status in (400, 401, 403) and "signature" in str(body).lower()
        if refused and action in _SIGNED_WITH:
            secret, what = _SIGNED_WITH[action]
            kind = "verify" if action == "callback" else action
            return (
                f"the target refused payrace's signature on a {kind} (HTTP {status}: {said}): "
                f"it checks {what} against another value than payrace signs with ({secret} "
                f"from {self.describe_key(secret)}); give the target and [keys] of the profile "
                "the same test keys (docs/profile.md)"
            )
        return None


# -- reading and checking -------------------------------------------------------------------

_TOP = ("target", "keys", "create_order", "callback", "webhook", "oracle")
_TARGET = ("base_url", "name", "expect", "verify_tls", "force", "hook")
_ACTION = ("method", "path", "encoding", "body", "headers")
_CREATE = (*_ACTION, "by", "status", "payment_id", "gateway_order_id")
_KEYS = tuple(f"{k}{s}" for k in ("key_id", *_SECRET_KEYS) for s in ("", "_env"))


def _parse(doc: Mapping[str, Any], where: str, stem: str) -> Profile:
    _known(doc, _TOP, where)
    for required in ("create_order", "callback", "webhook", "oracle"):
        if required not in doc:
            raise UsageError(f"{where}: missing table [{required}] (docs/profile.md)")
    target = _table(doc, "target", where) if "target" in doc else {}
    _known(target, _TARGET, f"{where}: [target]")
    base_url = _opt_str(target, "base_url", where, "[target]")
    if base_url is not None:
        _check_url(base_url, f"{where}: [target].base_url")
    expect = _opt_str(target, "expect", where, "[target]")
    if expect not in (None, "valid", "violated"):
        raise UsageError(f"{where}: [target].expect must be valid or violated, got {expect!r}")
    force = _opt_str(target, "force", where, "[target]") or "locks"
    if force not in ("locks", "pause"):
        raise UsageError(f"{where}: [target].force must be locks or pause, got {force!r}")
    verify_tls = target.get("verify_tls", True)
    if not isinstance(verify_tls, bool):
        raise UsageError(f"{where}: [target].verify_tls must be true or false")
    hook = _opt_str(target, "hook", where, "[target]")
    if hook is not None and not re.fullmatch(r"[\w.]+:\w+", hook):
        raise UsageError(
            f"{where}: [target].hook must be module:function (e.g. 'shop_race.hooks:sign'), "
            f"got {hook!r}"
        )
    keys, sources = _keys(_table(doc, "keys", where) if "keys" in doc else {}, where)
    try:
        oracle = OracleConfig._from_mapping(_table(doc, "oracle", where), f"{where}: [oracle]")
    except OracleError as exc:
        said = str(exc)
        raise UsageError(said if said.startswith(where) else f"{where}: [oracle]: {said}") from None
    return Profile(
        source=where,
        name=_opt_str(target, "name", where, "[target]") or stem,
        create_order=_create_order(_table(doc, "create_order", where), where),
        callback=_action("callback", _table(doc, "callback", where), where),
        webhook=_action("webhook", _table(doc, "webhook", where), where, body=False),
        oracle=oracle,
        keys=keys,
        base_url=base_url,
        expect=expect,
        verify_tls=verify_tls,
        force=force,  # type: ignore[arg-type]  # checked above
        hook=hook,
        key_sources=sources,
    )


def _check_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"{where} must be a URL like http://127.0.0.1:8000 or https://host/prefix, got {url!r}"
        )


def _keys(doc: Mapping[str, Any], where: str) -> tuple[GatewayKeys, dict[str, str]]:
    _known(doc, _KEYS, f"{where}: [keys]")
    default = GatewayKeys()
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for key in ("key_id", *_SECRET_KEYS):
        if key in doc and f"{key}_env" in doc:
            raise UsageError(f"{where}: [keys] gives both {key} and {key}_env; keep one")
        if f"{key}_env" in doc:
            var = _opt_str(doc, f"{key}_env", where, "[keys]")
            assert var is not None
            if not os.environ.get(var):
                raise UsageError(
                    f"{where}: [keys].{key}_env = {var!r}, but the environment variable {var} "
                    "is not set (export it with the target's Razorpay test value)"
                )
            values[key], sources[key] = os.environ[var], f"environment variable {var}"
        elif key in doc:
            value = _opt_str(doc, key, where, "[keys]")
            assert value is not None
            values[key], sources[key] = value, f"{where}: [keys].{key}"
        else:
            values[key], sources[key] = getattr(default, key), "payrace's default test keys"
    return GatewayKeys(**values), sources


def _action(name: str, doc: Mapping[str, Any], where: str, *, body: bool = True) -> Action:
    fields_ = _ACTION if body else ("method", "path", "headers")
    _known(doc, fields_, f"{where}: [{name}]")
    return Action(name, **_action_fields(name, doc, where))


def _action_fields(name: str, doc: Mapping[str, Any], where: str) -> dict[str, Any]:
    at = f"{where}: [{name}]"
    path = _opt_str(doc, "path", where, f"[{name}]")
    if path is None or not path.startswith("/"):
        raise UsageError(f"{at}.path is required and must start with '/', got {path!r}")
    method = (_opt_str(doc, "method", where, f"[{name}]") or "POST").upper()
    if method not in _METHODS:
        raise UsageError(f"{at}.method must be one of {', '.join(_METHODS)}, got {method!r}")
    encoding = _opt_str(doc, "encoding", where, f"[{name}]") or "json"
    if encoding not in ("json", "form"):
        raise UsageError(f"{at}.encoding must be json or form, got {encoding!r}")
    body = doc.get("body", {})
    headers = doc.get("headers", {})
    for key, value in (("body", body), ("headers", headers)):
        if not isinstance(value, dict):
            raise UsageError(f"{at}.{key} must be a table, got {type(value).__name__}")
    if not all(isinstance(v, str) for v in headers.values()):
        raise UsageError(f"{at}.headers values must be strings")
    available = _AVAILABLE[name]
    for key, template in (("path", path), ("body", body), ("headers", headers)):
        for p in _placeholders(template):
            if p in ("{", "}"):
                raise UsageError(f"{at}.{key}: a lone '{p}'; write '{p}{p}' for a literal brace")
            if not p.startswith("env:") and p not in available:
                raise UsageError(
                    f"{at}.{key}: unknown placeholder {{{p}}}; [{name}] may use "
                    f"{', '.join('{' + a + '}' for a in sorted(available))} or {{env:NAME}}"
                )
    return {"path": path, "method": method, "encoding": encoding, "body": body, "headers": headers}


def _create_order(doc: Mapping[str, Any], where: str) -> CreateOrder:
    at = f"{where}: [create_order]"
    _known(doc, _CREATE, at)
    by = _opt_str(doc, "by", where, "[create_order]") or "service"
    if by not in ("service", "payrace"):
        raise UsageError(f"{at}.by must be service or payrace, got {by!r}")
    status = doc.get("status", [200, 201])
    if isinstance(status, int):
        status = [status]
    if not (
        isinstance(status, list)
        and status
        and all(isinstance(s, int) and 200 <= s < 300 for s in status)
    ):
        raise UsageError(f"{at}.status must be a 2xx status or a list of them, got {status!r}")
    fields_ = _action_fields("create_order", doc, where)
    if by == "service" and "gateway_order_id" in _placeholders(
        [fields_["path"], fields_["body"], fields_["headers"]]
    ):
        raise UsageError(
            f"{at}: {{gateway_order_id}} is known only when payrace creates the order; "
            'set by = "payrace" or drop the placeholder'
        )
    return CreateOrder(
        "create_order",
        path=fields_["path"],
        method=fields_["method"],
        encoding=fields_["encoding"],
        body=fields_["body"],
        headers=fields_["headers"],
        by=by,  # type: ignore[arg-type]  # checked above
        status=tuple(status),
        payment_id=_opt_str(doc, "payment_id", where, "[create_order]") or "payment_id",
        gateway_order_id=_opt_str(doc, "gateway_order_id", where, "[create_order]")
        or "gateway_order_id",
    )


def _known(doc: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise UsageError(
            f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(known)}"
        )


def _table(doc: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = doc[key]
    if not isinstance(value, dict):
        raise UsageError(f"{where}: '{key}' must be a table, got {type(value).__name__}")
    return value


def _opt_str(doc: Mapping[str, Any], key: str, where: str, table: str) -> str | None:
    if key not in doc:
        return None
    value = doc[key]
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: {table}.{key} must be a non-empty string, got {value!r}")
    return value


def foreign_order(gateway_order_id: str, said: str) -> str:
    """The fix when the fake gateway cannot authorize a payment for the target's order: the
    customer pays at the gateway payrace drives, so an order it never saw was created at
    another gateway, and no payment of the run can be raced."""
    return (
        f"the fake gateway cannot authorize a payment for the target's order "
        f"{gateway_order_id!r} ({said}): the target must create its orders at the gateway "
        "payrace drives (its Razorpay base URL set to the --gateway-url, e.g. one started "
        "with `payrace gateway`)"
    )
