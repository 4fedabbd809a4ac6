"""What the explorer runs, written down: requests, schedule ids and scenario files.

    KINDS            the request vocabulary of `--requests` and of scenario files
    ├── client           the browser's Checkout callback (POST /payments/verify)
    ├── retry            the same callback sent again (a browser retry)
    ├── webhook          payment.captured with its own X-Razorpay-Event-Id
    ├── duplicate        the previous webhook again, same event id (at-least-once delivery)
    ├── redelivery       the previous webhook's event again under a new event id
    └── payment.authorized | payment.captured | order.paid | payment.failed
    RequestSpec      one request of a schedule: kind, process label, generator.Step
    parse_requests() tokens -> RequestSpec per request, labelled client, webhook-1, ...
    ScheduleRef      strategy, isolation, requests and the choice sequence: everything a
                     replay needs; .id is the short id, parse_schedule_id() reads it back
    APP_ISOLATION, app_name()   how an app's schedule ids say isolation and target
    StepSpec         one entry of an explicit schedule: "client", "webhook-1:payment_read",
                     "client:end"
    ExplicitSchedule a named list of StepSpecs and, optionally, its expected verdict
    Scenario         one TOML file (in the spirit of PostgreSQL's isolation tester specs)
    load_scenario()  read and validate; every error names the file and the key
    ScenarioError    the words are off; the message says what to write instead

Schedule ids look like `naive.rc.cw.a3b2a4b4`: strategy, isolation (rc, rr, sr), one letter
per request (KINDS' codes), then the choices — which request was released at each step,
a = first request, b = second, ... — run-length encoded (`a3` = a, a, a). A step is a
*visible* step of explore.scheduler (local steps are folded into the step before them), so
an id stays valid as long as the capture path keeps its pause points and the step table of
explore.steps (predict()). An app's schedules (`payrace explore --app`) are named after its
profile, with `app` for the isolation level the app keeps to itself: `shop.app.cw.a2b3`
(app_name(), APP_ISOLATION); each of its steps runs from one pause point to the next.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from payrace import postgres
from payrace.harness.model.generator import Step
from payrace.postgres import ISOLATION_CODES
from payrace.service.instrument.probes import POINTS

Expectation = Literal["valid", "violated"]
Mode = Literal["exhaustive", "pct", "schedules"]


class ScenarioError(ValueError):
    """A scenario, request list or schedule id cannot work; the message says what to change."""


@dataclass(frozen=True)
class Kind:
    token: str
    code: str  # one letter in schedule ids
    f: str  # history name: verify | webhook
    event: str | None  # None: inherits the previous webhook's event (duplicate, redelivery)
    same_event_id: bool = False

    @property
    def is_webhook(self) -> bool:
        return self.f == "webhook"


KINDS: dict[str, Kind] = {
    k.token: k
    for k in (
        Kind("client", "c", "verify", None),
        Kind("retry", "r", "verify", None),
        Kind("webhook", "w", "webhook", "payment.captured"),
        Kind("duplicate", "d", "webhook", None, same_event_id=True),
        Kind("redelivery", "e", "webhook", None),
        Kind("payment.authorized", "a", "webhook", "payment.authorized"),
        Kind("order.paid", "o", "webhook", "order.paid"),
        Kind("payment.failed", "f", "webhook", "payment.failed"),
    )
}
_ALIASES = {"payment.captured": "webhook", "verify": "client"}
_BY_CODE = {k.code: k for k in KINDS.values()}


@dataclass(frozen=True)
class RequestSpec:
    kind: Kind
    label: str  # the process: client, client-2, webhook-1, ...
    step: Step  # what payrace.harness.model.client.prepare() turns into a signed request

    @property
    def event(self) -> str | None:
        return self.step.event

    @property
    def captures_at_gateway(self) -> bool:
        """The service calls the gateway's capture for the client callback and for
        payment.authorized; the other events report a capture that already happened."""
        return self.step.kind == "verify" or self.step.event == "payment.authorized"

    @property
    def marks_failed(self) -> bool:
        return self.step.event == "payment.failed"

    def describe(self) -> str:
        if self.step.kind == "verify":
            return "client callback" + (" (retried)" if self.kind.token == "retry" else "")
        extra = {"duplicate": ", same event id", "redelivery": ", new event id"}
        return f"{self.step.event}{extra.get(self.kind.token, '')}"


def parse_requests(tokens: Sequence[str]) -> tuple[RequestSpec, ...]:
    """["client", "webhook", "duplicate"] -> specs labelled client, webhook-1, webhook-2."""
    if len(tokens) < 2:
        raise ScenarioError(
            f"a race needs at least two requests, got {list(tokens)}; "
            "e.g. --requests client,webhook"
        )
    if len(tokens) > 8:
        raise ScenarioError("at most 8 requests per schedule (ids use one letter each)")
    specs: list[RequestSpec] = []
    clients = webhooks = 0
    last_webhook: int | None = None
    for index, raw in enumerate(tokens):
        token = raw.strip().lower()
        token = _ALIASES.get(token, token.removeprefix("webhook:"))
        token = _ALIASES.get(token, token)
        kind = KINDS.get(token)
        if kind is None:
            raise ScenarioError(
                f"unknown request {raw!r}; choose from {', '.join(KINDS)} "
                "(payment.captured is the same as webhook)"
            )
        if kind.is_webhook:
            webhooks += 1
            label = f"webhook-{webhooks}"
            event = kind.event
            same_as = None
            if event is None:  # duplicate / redelivery: of the previous webhook
                if last_webhook is None:
                    raise ScenarioError(
                        f"{token!r} repeats the previous webhook, but no webhook comes "
                        "before it; e.g. --requests client,webhook,duplicate"
                    )
                event = specs[last_webhook].step.event
                same_as = last_webhook if kind.same_event_id else None
            step = Step(label, "webhook", event, same_event_as=same_as)
            last_webhook = index
        else:
            clients += 1
            label = "client" if clients == 1 else f"client-{clients}"
            step = Step(label, "verify")
        specs.append(RequestSpec(kind, label, step))
    return tuple(specs)


def normalise_isolation(value: str) -> str:
    try:
        return postgres.normalise_isolation(value)
    except ValueError as exc:
        raise ScenarioError(str(exc)) from None


# -- schedule ids -------------------------------------------------------------------------

_ID = re.compile(
    # a strategy's name, or the package.module:Name it was loaded by (service.strategies)
    r"^(?P<strategy>[a-z][a-z0-9_]*|[A-Za-z_][\w.]*:[A-Za-z_]\w*)"
    r"\.(?P<iso>rc|rr|sr|app)\.(?P<reqs>[a-z]{2,8})\."
    r"(?P<ch>[a-z0-9]+)$"
)
# The isolation word of an app's schedules: the app keeps its own level, payrace sets none.
APP_ISOLATION = "app"


def app_name(name: str) -> str:
    """A profile's name as the first word of a schedule id: "Shop-v2" -> "shop_v2"."""
    word = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
    return word if word[:1].isalpha() else f"app_{word}"


@dataclass(frozen=True)
class ScheduleRef:
    strategy: str
    isolation: str
    requests: tuple[str, ...]  # KINDS tokens
    choices: tuple[int, ...]  # request index released at each visible step

    @property
    def id(self) -> str:
        codes = "".join(KINDS[t].code for t in self.requests)
        iso = ISOLATION_CODES.get(self.isolation, APP_ISOLATION)
        return f"{self.strategy}.{iso}.{codes}.{encode_choices(self.choices)}"


def encode_choices(choices: Sequence[int]) -> str:
    out: list[str] = []
    i = 0
    while i < len(choices):
        j = i
        while j < len(choices) and choices[j] == choices[i]:
            j += 1
        out.append(chr(ord("a") + choices[i]) + (str(j - i) if j - i > 1 else ""))
        i = j
    return "".join(out)


def decode_choices(text: str) -> tuple[int, ...]:
    choices: list[int] = []
    for letter, count in re.findall(r"([a-z])(\d*)", text):
        n = int(count) if count else 1
        if n < 1:
            raise ScenarioError(f"schedule choices {text!r}: a count must be at least 1")
        choices.extend([ord(letter) - ord("a")] * n)
    if encode_choices(choices) != text:
        raise ScenarioError(
            f"schedule choices {text!r} are not in the form the explorer writes "
            "(a letter per request, a = first, then an optional count, e.g. a3b2a)"
        )
    return tuple(choices)


def parse_schedule_id(text: str) -> ScheduleRef:
    m = _ID.match(text.strip())
    if m is None:
        raise ScenarioError(
            f"{text!r} is not a schedule id; ids look like naive.rc.cw.a3b2a4b4 "
            "(strategy.isolation.requests.choices), as printed by `payrace explore`"
        )
    requests = []
    for code in m["reqs"]:
        if code not in _BY_CODE:
            raise ScenarioError(f"schedule id {text!r}: unknown request code {code!r}")
        requests.append(_BY_CODE[code].token)
    isolation = {v: k for k, v in ISOLATION_CODES.items()}.get(m["iso"], APP_ISOLATION)
    choices = decode_choices(m["ch"])
    if any(c >= len(requests) for c in choices):
        raise ScenarioError(
            f"schedule id {text!r} releases request {max(choices) + 1} of {len(requests)}"
        )
    return ScheduleRef(m["strategy"], isolation, tuple(requests), choices)


# -- explicit schedules -------------------------------------------------------------------


@dataclass(frozen=True)
class StepSpec:
    """`label` releases one visible step; `label:point` releases until the request is
    paused at `point` again (or waits for a lock on the way); `label:end` until it answered."""

    label: str
    until: str | None = None  # a pause point, "end", or None for exactly one step

    def __str__(self) -> str:
        return self.label if self.until is None else f"{self.label}:{self.until}"


@dataclass(frozen=True)
class ExplicitSchedule:
    name: str
    steps: tuple[StepSpec, ...] = ()
    id: str | None = None  # or an exact schedule id (as printed by a run)
    expect: Expectation | None = None


def parse_step(text: str, labels: Sequence[str], where: str) -> StepSpec:
    label, _, until = text.strip().partition(":")
    if label not in labels:
        raise ScenarioError(f"{where}: {text!r} names no request; the labels are {list(labels)}")
    if until and until != "end" and until not in POINTS:
        raise ScenarioError(
            f"{where}: {text!r}: unknown pause point {until!r}; use one of "
            f"{', '.join(POINTS)} or end"
        )
    return StepSpec(label, until or None)


# -- scenario files -----------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    strategy: str
    isolation: str
    requests: tuple[str, ...]
    mode: Mode
    description: str = ""
    expect: Expectation | None = None
    # Exactly these checkers must be violated (when given): a change shows as a mismatch.
    expect_checks: tuple[str, ...] | None = None
    schedules: tuple[ExplicitSchedule, ...] = ()
    pct_runs: int = 0
    depth: int = 2
    seed: int = 1
    confidence: float = 0.95
    bound_s: float = 5.0
    reduce: bool = True
    max_schedules: int = 5000
    path: Path | None = None
    specs: tuple[RequestSpec, ...] = field(default=(), compare=False)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(s.label for s in self.specs)


_KEYS = {
    "name", "description", "strategy", "isolation", "requests", "mode", "expect",
    "expect_checks", "schedule", "pct", "bound_s", "reduce", "max_schedules",
}  # fmt: skip
_PCT_KEYS = {"runs", "depth", "seed", "confidence"}
_SCHEDULE_KEYS = {"name", "steps", "id", "expect"}


def load_scenario(path: Path, *, strategies: Sequence[str] = ()) -> Scenario:
    """Read one scenario file; `strategies` (if given) are the names the target knows."""
    where = str(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path} is not valid TOML: {exc}") from exc
    return scenario_from_mapping(doc, where, path=path, strategies=strategies)


def scenario_from_mapping(
    doc: Mapping[str, Any],
    where: str,
    *,
    path: Path | None = None,
    strategies: Sequence[str] = (),
) -> Scenario:
    _no_unknown(doc, _KEYS, where)
    strategy = _str(doc, "strategy", where)
    if strategies and strategy not in strategies:
        raise ScenarioError(
            f"{where}: strategy {strategy!r} is unknown; choose from {', '.join(strategies)}"
        )
    isolation = normalise_isolation(_str(doc, "isolation", where, "READ COMMITTED"))
    raw_requests = doc.get("requests", ["client", "webhook"])
    if not isinstance(raw_requests, list) or not all(isinstance(r, str) for r in raw_requests):
        raise ScenarioError(
            f'{where}: requests must be a list of strings, e.g. ["client", "webhook"]'
        )
    specs = parse_requests(raw_requests)
    labels = [s.label for s in specs]

    schedules = []
    for n, entry in enumerate(doc.get("schedule", []), start=1):
        at = f"{where}: [[schedule]] #{n}"
        if not isinstance(entry, dict):
            raise ScenarioError(f"{at} must be a table")
        _no_unknown(entry, _SCHEDULE_KEYS, at)
        steps_raw = entry.get("steps", [])
        if not isinstance(steps_raw, list) or not all(isinstance(s, str) for s in steps_raw):
            raise ScenarioError(f'{at}: steps must be a list of strings like "client:payment_read"')
        sid = entry.get("id")
        if (sid is None) == (not steps_raw):
            raise ScenarioError(f'{at}: give either steps = [...] or id = "..." (one of them)')
        if sid is not None:
            ref = parse_schedule_id(str(sid))
            if (ref.strategy, ref.isolation, ref.requests) != (
                strategy,
                isolation,
                tuple(s.kind.token for s in specs),
            ):
                raise ScenarioError(
                    f"{at}: id {sid!r} is for {ref.strategy} at {ref.isolation} with requests "
                    f"{list(ref.requests)}, not this scenario's"
                )
        schedules.append(
            ExplicitSchedule(
                name=str(entry.get("name", f"schedule {n}")),
                steps=tuple(parse_step(s, labels, at) for s in steps_raw),
                id=None if sid is None else str(sid),
                expect=_expectation(entry, at),
            )
        )

    default_mode: Mode = "schedules" if schedules else ("exhaustive" if len(specs) == 2 else "pct")
    mode = _str(doc, "mode", where, default_mode)
    if mode not in ("exhaustive", "pct", "schedules"):
        raise ScenarioError(f"{where}: mode must be exhaustive, pct or schedules, got {mode!r}")
    if mode == "schedules" and not schedules:
        raise ScenarioError(f'{where}: mode = "schedules" needs at least one [[schedule]]')

    pct = doc.get("pct", {})
    if not isinstance(pct, dict):
        raise ScenarioError(f"{where}: [pct] must be a table")
    _no_unknown(pct, _PCT_KEYS, f"{where}: [pct]")
    runs = _int(pct, "runs", f"{where}: [pct]", 0, 0, 1_000_000)
    depth = _int(pct, "depth", f"{where}: [pct]", 2, 1, 10)
    confidence = pct.get("confidence", 0.95)
    if not isinstance(confidence, float | int) or not 0 < confidence < 1:
        raise ScenarioError(f"{where}: [pct] confidence must be between 0 and 1, e.g. 0.95")
    checks = doc.get("expect_checks")
    if checks is not None and (
        not isinstance(checks, list) or not all(isinstance(c, str) for c in checks)
    ):
        raise ScenarioError(f"{where}: expect_checks must be a list of checker names")
    bound = doc.get("bound_s", 5.0)
    if not isinstance(bound, float | int) or not 0.05 <= bound <= 600:
        raise ScenarioError(f"{where}: bound_s must be a number of seconds in [0.05, 600]")
    reduce = doc.get("reduce", True)
    if not isinstance(reduce, bool):
        raise ScenarioError(f"{where}: reduce must be true or false")
    return Scenario(
        name=_str(doc, "name", where, path.stem if path else "scenario"),
        description=_str(doc, "description", where, ""),
        strategy=strategy,
        isolation=isolation,
        requests=tuple(s.kind.token for s in specs),
        mode=mode,  # type: ignore[arg-type]  # checked above
        expect=_expectation(doc, where),
        expect_checks=None if checks is None else tuple(sorted(checks)),
        schedules=tuple(schedules),
        pct_runs=runs,
        depth=depth,
        seed=_int(pct, "seed", f"{where}: [pct]", 1, 0, 2**63 - 1),
        confidence=float(confidence),
        bound_s=float(bound),
        reduce=reduce,
        max_schedules=_int(doc, "max_schedules", where, 5000, 1, 1_000_000),
        path=path,
        specs=specs,
    )


def _no_unknown(doc: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")


def _str(doc: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = doc.get(key, default)
    if value is None:
        raise ScenarioError(f"{where}: missing key {key!r}")
    if not isinstance(value, str):
        raise ScenarioError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _int(doc: Mapping[str, Any], key: str, where: str, default: int, lo: int, hi: int) -> int:
    value = doc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ScenarioError(f"{where}: {key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _expectation(doc: Mapping[str, Any], where: str) -> Expectation | None:
    value = doc.get("expect")
    if value is None:
        return None
    if value not in ("valid", "violated"):
        raise ScenarioError(f'{where}: expect must be "valid" or "violated", got {value!r}')
    return value  # type: ignore[no-any-return]
