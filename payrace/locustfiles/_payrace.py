"""What payrace's locustfiles share: a user that races payments, and the gate at the end.

    PayraceUser    abstract FastHttpUser
        new_payment()    the profile's create-order request, then the customer pays at the
                         fake gateway's Checkout
        race()           fire deliveries for one payment, released together (gevent Event)
        read_payment()   GET /payments/{id} (the reference service only: no profile names it)
    verify()       a Delivery: the browser's client callback ([callback] of the profile)
    webhook()      a Delivery: one webhook event; .again() redelivers it with the same event id
    listeners      init: settings; master/local: oracle baseline
                   request: per-process counts         report_to_master: tally -> master
                   worker_report: merge on the master   quitting: the gate (harness.load.gate)

Every request is shaped by the target profile (model.profile, docs/profile.md): the reference
service's own, or a running service's from PAYRACE_PROFILE, with its routes, bodies, keys and
hook, exactly as `payrace run` sends them. A setup mistake one of them reveals (a route the
target does not serve, a signature it refuses, an order the fake gateway never saw) ends the
run with exit 2 and the fix, as in `payrace run`: it is not the target's bug.

Lock wait and lock hold, read from each capture response's Server-Timing header, are logged
straight into Locust's stats entries of type LOCK and HOLD: they show up in the console, the
CSV and the HTML report, but bypass the request event, so they neither count as requests nor
inflate the Aggregated row's request rate. The same samples go into HDR histograms that the
workers ship to the master in their regular reports (Locust's own percentiles are rounded to
two significant digits, and sub-millisecond lock waits round to 0 there).

Settings come from the environment (payrace.harness.load.worker.LoadSettings): PAYRACE_GATEWAY_URL
(needed: payments are authorized there), PAYRACE_TARGET_DSN (the gate: the service's own
database; on the master only), PAYRACE_REPORT_DIR,
PAYRACE_PROFILE (a running target's profile), PAYRACE_EXPECT, PAYRACE_SETTLE_S.
"""

from __future__ import annotations

# Locust first: importing it lets gevent patch sockets, threads and time before anything else.
from locust import FastHttpUser, events
from locust.runners import MasterRunner, WorkerRunner

# isort: split
import json
import logging
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import gevent
from gevent.event import Event
from gevent.pool import Group
from locust.exception import StopUser

from payrace.harness.errors import UsageError
from payrace.harness.gateway.signing import new_event_id
from payrace.harness.load.worker import SPREAD, LoadSettings, LoadTally
from payrace.harness.model.profile import Hook, Outgoing, Profile, foreign_order
from payrace.harness.model.verdict import EXIT_ERROR
from payrace.service.instrument.timing import parse_server_timing

if TYPE_CHECKING:  # the master's side (PostgreSQL, checkers, reports): imported in _on_init
    from payrace.harness.load.gate import LoadRun

log = logging.getLogger("payrace")
# The gate's few httpx calls would otherwise log a line each into Locust's output.
logging.getLogger("httpx").setLevel(logging.WARNING)

SETTINGS = LoadSettings.from_env()
TALLY = LoadTally()  # this process's samples since its last report
RUN: LoadRun | None = None  # master or local runner only
ENVIRONMENT: Any = None  # Locust's Environment, once init has run


def _target() -> tuple[Profile, Hook | None, str | None]:
    """The profile, its hook, and the problem reading them (reported by the init listener;
    the reference profile stands in meanwhile, and no user starts)."""
    try:
        profile = SETTINGS.target_profile()
        return profile, profile.before_send(), None
    except UsageError as exc:
        return Profile.reference(), None, str(exc)


PROFILE, HOOK, PROFILE_PROBLEM = _target()
CAPTURED = PROFILE.oracle.payments.done_value  # what the target calls a captured payment

CAPTURE_EVENTS = ("payment.captured", "payment.authorized", "order.paid")
# The Locust row a capture response's LOCK / HOLD samples are logged under, per path: the
# profile's route templates, so one row stands for every payment.
TIMING_ROWS = {"client": PROFILE.callback.path, "webhook": PROFILE.webhook.path}
_TIMINGS = {"lock": "LOCK", "hold": "HOLD"}
_GATEWAY_SAYS_CAPTURED = ("payment.captured", "order.paid")


@dataclass(frozen=True)
class Delivery:
    kind: str  # "verify" | "webhook"
    event: str | None = None
    event_id: str | None = None  # a redelivery carries the same X-Razorpay-Event-Id
    delay_ms: float = 0.0  # after the common release; lets one event overtake another

    def again(self, delay_ms: float = 0.0) -> Delivery:
        """Razorpay's at-least-once delivery: the same event, the same id, once more."""
        return replace(self, delay_ms=delay_ms)


def verify(delay_ms: float = 0.0) -> Delivery:
    return Delivery("verify", delay_ms=delay_ms)


def webhook(event: str, delay_ms: float = 0.0) -> Delivery:
    return Delivery("webhook", event, new_event_id(), delay_ms)


@dataclass(frozen=True)
class Payment:
    payment_id: int
    gateway_order_id: str
    gateway_payment: dict[str, Any] | None  # None: the customer never paid
    amount: int = 0

    def values(self) -> dict[str, Any]:
        """What the profile's templates may refer to (docs/profile.md, "Placeholders")."""
        return {
            "amount": self.amount,
            "currency": CURRENCY,
            "gateway_order_id": self.gateway_order_id,
            "payment_id": self.payment_id,
        }


CURRENCY = "INR"


@dataclass(frozen=True)
class _Prepared:
    delivery: Delivery
    payment_id: int
    out: Outgoing
    name: str  # Locust's row

    @property
    def action(self) -> str:  # the profile's table: "callback" | "webhook"
        return "callback" if self.delivery.kind == "verify" else "webhook"

    @property
    def route(self) -> str:  # HDR path, as in summary.json: "client" | "webhook"
        return "client" if self.delivery.kind == "verify" else "webhook"

    def accepts(self, status: object) -> bool:
        # A target that answers without the payment's state leaves the judging to the oracle.
        if status is None:
            return True
        # Razorpay documents payment.failed followed by payment.captured as normal, so a
        # failure webhook may find the payment already captured.
        if self.delivery.event == "payment.failed":
            return status in ("failed", CAPTURED)
        return status == CAPTURED


def _json(response: Any) -> Any:
    try:
        return json.loads(response.text or "null")
    except ValueError:
        return None


def _code(body: Any) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _failure(response: Any, body: Any) -> str:
    """One failure row per class (status + error code), not per payment."""
    if not response.status_code:
        return f"no answer: {type(response.error).__name__ if response.error else 'unknown'}"
    return f"{response.status_code} {_code(body) or 'no error code'}"


def _answered(f: str, response: Any, body: Any, payment_id: int | None) -> None:
    """Tell the gate the target answered (a 5xx decides its no_5xx); no answer is Locust's."""
    if response.status_code:
        TALLY.answer(f, int(response.status_code), _code(body), payment_id)


_QUIT_SCHEDULED = False


def setup_mistake(environment: Any, message: str) -> None:
    """Tell the gate (through this process's tally) and end the run: nothing raced from here
    on could be judged, and the fix is in the message. A worker's master ends it when the
    mistake arrives in the worker's report."""
    if message not in TALLY.setup_errors:
        log.error("payrace: setup mistake: %s", message)
    TALLY.setup(message)
    if not _is_worker(environment):
        _quit_soon(environment)


def _quit_soon(environment: Any) -> None:
    global _QUIT_SCHEDULED
    if not _QUIT_SCHEDULED:
        _QUIT_SCHEDULED = True
        environment.process_exit_code = EXIT_ERROR
        # Not from this greenlet: quitting kills the users, and this may be one of them.
        gevent.spawn_later(0.1, environment.runner.quit)


class PayraceUser(FastHttpUser):
    """A customer (and the gateway's webhooks about their payments)."""

    abstract = True
    host = PROFILE.base_url  # --host (payrace load gives it) wins
    # Locust's FastHttpUser skips certificate checks unless told; the profile says.
    insecure = not PROFILE.verify_tls
    network_timeout = 30.0
    connection_timeout = 10.0
    concurrency = 16  # one race fires up to ~8 requests of this user at once

    def on_start(self) -> None:
        if PROFILE_PROBLEM is not None:
            raise StopUser()  # the init listener reported it and ends the run
        seed = None if SETTINGS.seed is None else f"{SETTINGS.seed}-{id(self)}"
        self.rng = random.Random(seed)
        self.recent: list[int] = []  # payment ids to read back (mixed.py)

    # -- the customer ---------------------------------------------------------------------

    def new_payment(self, *, pay: bool = True) -> Payment | None:
        amount = self.rng.randrange(100, 1_000_000)  # paise; the gateway's minimum is 100
        spec = PROFILE.create_order
        values: dict[str, Any] = {"amount": amount, "currency": CURRENCY}
        if spec.by == "payrace":
            values["gateway_order_id"] = self._gateway_order(amount)
            if values["gateway_order_id"] is None:
                return None
        out = spec.outgoing(values)
        if HOOK is not None:
            HOOK("create_order", out)
        with self.client.request(
            out.method,
            out.path,
            data=out.body,
            headers=out.headers,
            name=spec.path,
            catch_response=True,
        ) as resp:
            body = _json(resp)
            _answered("create_order", resp, body, None)
            if not resp.status_code:
                resp.failure(_failure(resp, body))
                return None
            route = f"{out.method} {urlsplit(self.host or '').path.rstrip('/')}{out.path}"
            try:
                payment_id, order_id = PROFILE.order_answer(
                    route, int(resp.status_code), resp.text or ""
                )
            except UsageError as exc:
                resp.failure(_failure(resp, body))
                setup_mistake(self.environment, str(exc))
                return None
            except RuntimeError:
                resp.failure(_failure(resp, body))
                return None
            resp.success()
        gateway_order_id = order_id or str(values["gateway_order_id"])
        order = Payment(payment_id, gateway_order_id, None, amount)
        self.recent = [*self.recent[-19:], order.payment_id]
        if not pay:
            TALLY.payment(order.payment_id, None)
            return order
        with self.client.post(
            f"{SETTINGS.gateway_url}/_fake/payments",
            json={"order_id": order.gateway_order_id},
            name="fake gateway: authorize (Checkout)",
            catch_response=True,
        ) as resp:
            paid = _json(resp)
            if resp.status_code != 200 or not isinstance(paid, dict) or "id" not in paid:
                resp.failure(_failure(resp, paid))
                TALLY.payment(order.payment_id, None)
                if resp.status_code and 400 <= resp.status_code < 500:
                    said = f"HTTP {resp.status_code}: {(resp.text or '')[:200]}"
                    setup_mistake(self.environment, foreign_order(order.gateway_order_id, said))
                return None
            resp.success()
        TALLY.payment(order.payment_id, str(paid["id"]))
        return replace(order, gateway_payment=paid)

    def _gateway_order(self, amount: int) -> str | None:
        """`by = "payrace"`: the order is created at the fake gateway, then handed to the
        target's create-order route as {gateway_order_id}."""
        with self.client.post(
            f"{SETTINGS.gateway_url}/_fake/orders",
            json={"amount": amount, "currency": CURRENCY},
            name="fake gateway: create order",
            catch_response=True,
        ) as resp:
            order = _json(resp)
            if resp.status_code != 200 or not isinstance(order, dict) or "id" not in order:
                resp.failure(_failure(resp, order))
                return None
            resp.success()
        return str(order["id"])

    def read_payment(self, payment_id: int) -> None:
        if SETTINGS.profile is not None:
            return  # a profile describes no read route: the reference service's own
        with self.client.get(
            f"/payments/{payment_id}", name="/payments/[id]", catch_response=True
        ) as resp:
            body = _json(resp)
            _answered("read", resp, body, payment_id)
            if resp.status_code == 200 and isinstance(body, dict) and "status" in body:
                resp.success()
            else:
                resp.failure(_failure(resp, body))

    # -- the race -------------------------------------------------------------------------

    def race(self, payment: Payment | None, *deliveries: Delivery) -> None:
        """Send every delivery for `payment` at the same moment (plus its own delay).

        Everything is signed and encoded first; each request then waits in its own greenlet
        on one Event, so setting it releases them all within one turn of the gevent loop."""
        if payment is None or payment.gateway_payment is None:
            return
        if any(d.event in _GATEWAY_SAYS_CAPTURED for d in deliveries):
            # Razorpay sends these only for a payment it captured: capture it there first.
            gateway_id = quote(str(payment.gateway_payment["id"]))
            with self.client.post(
                f"{SETTINGS.gateway_url}/_fake/payments/{gateway_id}/auto_capture",
                name="fake gateway: automatic capture",
                catch_response=True,
            ) as resp:
                if resp.status_code != 200:
                    resp.failure(_failure(resp, _json(resp)))
                    return
                resp.success()
        prepared = [self._prepare(payment, d) for d in deliveries]
        go = Event()
        group = Group()
        greenlets = [group.spawn(self._deliver, go, p) for p in prepared]
        try:
            gevent.sleep(0)  # every greenlet runs up to go.wait() and parks there
            go.set()
            group.join()
        finally:
            # A user stopped mid-race must not leave requests running on without it.
            group.kill(block=False)
        # How far apart the service received what was released together: the evidence
        # that the race was run, not just requested.
        received = [
            g.value
            for g, p in zip(greenlets, prepared, strict=True)
            if g.value is not None and not p.delivery.delay_ms
        ]
        if len(received) > 1:
            TALLY.timing(SPREAD, "race", (max(received) - min(received)) / 1e6)

    def _prepare(self, payment: Payment, delivery: Delivery) -> _Prepared:
        """Signed and shaped by the profile, exactly as `payrace run` sends it."""
        assert payment.gateway_payment is not None
        gateway_payment_id = str(payment.gateway_payment["id"])
        if delivery.kind == "verify":
            out = PROFILE.signed_callback(
                payment.values(), payment.gateway_order_id, gateway_payment_id, HOOK
            )
            return _Prepared(delivery, payment.payment_id, out, PROFILE.callback.path)
        assert delivery.event is not None
        out = PROFILE.signed_webhook(
            payment.values(), delivery.event, payment.gateway_payment, delivery.event_id, HOOK
        )
        name = f"{PROFILE.webhook.path} [{delivery.event}]"
        return _Prepared(delivery, payment.payment_id, out, name)

    def _deliver(self, go: Event, p: _Prepared) -> int | None:
        """Send one delivery once released; the service's receive time (ns) if it answered."""
        go.wait()
        if p.delivery.delay_ms:
            gevent.sleep(p.delivery.delay_ms / 1000.0)
        out = p.out
        with self.client.request(
            out.method,
            out.path,
            data=out.body,
            headers=out.headers,
            name=p.name,
            catch_response=True,
        ) as resp:
            self._record_timings(resp, p)
            body = _json(resp)
            _answered(p.delivery.kind, resp, body, p.payment_id)
            if not resp.status_code:
                return None  # no answer: Locust records the connection error itself
            said = body if body is not None else resp.text
            mistake = PROFILE.setup_mistake(
                p.action, out.method, out.path, int(resp.status_code), said
            )
            if mistake is not None:
                setup_mistake(self.environment, mistake)
            status = body.get("status") if isinstance(body, dict) else None
            answered = 200 <= resp.status_code < 300
            # What no_lost_capture holds the target to: it said "captured", or it accepted
            # the gateway's own word that the payment is captured.
            if answered and (status == CAPTURED or p.delivery.event in _GATEWAY_SAYS_CAPTURED):
                TALLY.confirm(p.payment_id, p.delivery.kind, p.delivery.event)
            if answered and p.accepts(status):
                resp.success()
            elif answered:
                resp.failure(f"{resp.status_code} but the payment is {status!r}")
            else:
                resp.failure(_failure(resp, body))
        received = resp.headers.get("x-payrace-received-at") if resp.headers is not None else None
        return int(received) if isinstance(received, str) and received.isdigit() else None

    def _record_timings(self, resp: Any, p: _Prepared) -> None:
        elapsed = resp.request_meta.get("response_time")
        if isinstance(elapsed, int | float):
            TALLY.timing("request", p.route, float(elapsed))
        header = resp.headers.get("server-timing") if resp.headers is not None else None
        if not header:
            return
        if isinstance(header, list):
            header = ", ".join(header)
        timings = parse_server_timing(header)
        TALLY.aborted(timings)
        row = TIMING_ROWS[p.route]
        for kind, request_type in _TIMINGS.items():
            ms = timings.get(kind)
            if ms is None:
                continue
            TALLY.timing(kind, p.route, ms)
            # Straight into the entry, not through events.request: see the module docstring.
            self.environment.stats.get(row, request_type).log(ms, 0)


# -- listeners ----------------------------------------------------------------------------


def _is_worker(environment: Any) -> bool:
    return isinstance(environment.runner, WorkerRunner)


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    global RUN, ENVIRONMENT
    ENVIRONMENT = environment
    problems = []
    if PROFILE_PROBLEM is not None:
        problems.append(PROFILE_PROBLEM)
    if SETTINGS.gateway_url is None:
        problems.append(
            "PAYRACE_GATEWAY_URL is not set: payments are authorized at payrace's fake "
            "Razorpay (`payrace gateway`), so the locustfiles need its URL"
        )
    if not _is_worker(environment):
        # Here, not at the top: a worker never judges, so a load machine needs neither
        # psycopg nor the reports (locustfiles/README.md, "Light workers").
        from payrace.harness.load.gate import LoadRun

        RUN = LoadRun(SETTINGS)
        try:
            RUN.prepare()
        except Exception as exc:  # reported in the summary; the run cannot be judged
            problems.append(f"the oracle could not be prepared: {type(exc).__name__}: {exc}")
        RUN.problems.extend(problems)
    if problems:
        for problem in problems:
            log.error("payrace: %s", problem)
        environment.process_exit_code = EXIT_ERROR
        gevent.spawn_later(0.1, environment.runner.quit)


@events.request.add_listener
def _on_request(exception: BaseException | None = None, **_: Any) -> None:
    TALLY.request(exception is not None)


@events.report_to_master.add_listener
def _on_report_to_master(client_id: str, data: dict[str, Any], **_: Any) -> None:
    data["payrace"] = TALLY.drain()


@events.worker_report.add_listener
def _on_worker_report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    if RUN is not None and "payrace" in data:
        RUN.absorb(client_id, data["payrace"])
        if RUN.setup_errors and ENVIRONMENT is not None:
            _quit_soon(ENVIRONMENT)


@events.quitting.add_listener
def _on_quitting(environment: Any, **_: Any) -> None:
    if _is_worker(environment) or RUN is None:
        return
    if not isinstance(environment.runner, MasterRunner):
        RUN.absorb("local", TALLY.drain())
    stats = environment.stats
    total = stats.total
    last = total.last_request_timestamp or total.start_time
    errors = sorted(stats.errors.values(), key=lambda e: -e.occurrences)[:10]
    options = environment.parsed_options
    locust = {
        "users": getattr(options, "num_users", None),
        "requests": total.num_requests,
        "failures": total.num_failures,
        "errors": [
            {"method": e.method, "name": e.name, "error": str(e.error), "count": e.occurrences}
            for e in errors
        ],
    }
    try:
        summary = RUN.finish(
            host=environment.host or "", locust=locust, window_s=max(0.0, last - total.start_time)
        )
    except Exception:
        log.exception("payrace: the gate failed; the run is not judged")
        environment.process_exit_code = EXIT_ERROR
        return
    environment.process_exit_code = summary["exit_code"]
    log.info(
        "payrace: verdict %s (exit code %s); reports in %s",
        summary["verdict"],
        summary["exit_code"],
        SETTINGS.report_dir,
    )
