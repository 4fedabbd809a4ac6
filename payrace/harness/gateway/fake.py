"""The fake Razorpay's state: orders, payments, capture counters and fault knobs, behind one lock.

    FakeRazorpay     create_order / authorize_payment / capture, the way Razorpay answers them;
                     auto_capture: Razorpay capturing on its own (the account's automatic
                     capture), which is what precedes its payment.captured / order.paid
                     webhooks; not a capture call, so not in `captures`;
                     order() / payment() / capture_calls() / counters() to read; reset()
                     knobs() / set_knobs(**changes)   latency and failure injection at run time;
                     delay_s() the latency one call gets
                     arm_holds / hold_capture / release_holds / disarm_holds / holds()
                     the capture barrier: calls for an armed payment wait until released
                     add_after_capture / remove_after_capture / after_capture()   hooks run
                     once a capture is made and before it is answered (the nemesis's
                     kill-after-capture); add_on_fault / remove_on_fault: hooks told of
                     each failure the knobs inject (the nemesis's history); in this
                     process only
    CaptureHold      one capture call held at the barrier; wakes its waiter on release
    Knobs            the fault knobs, their validation, and how a partial change applies; the
                     one definition behind FakeRazorpay, the /_fake/knobs route
                     (gateway.server) and the controls (gateway.controls)
    RazorpayError    an error in Razorpay's JSON shape with its HTTP status;
                     not_found(), json_object() build the ones the routes need

No web framework here: gateway.server serves this over HTTP, gateway.controls drives it, and
both the harness and the tests read it directly.

The capture counters are part of the oracle: they count every call that reached capture
(accepted, rejected, or failed on purpose), so a double capture is visible here even when the
target's own tables say otherwise. A call over HTTP is counted when it is answered (after any
injected latency), so read the counters once the target's requests have returned. Errors carry
Razorpay's JSON shape and status codes because the SDK picks its exception class from
`error.code`, not from the HTTP status.

The capture barrier is how the harness forces a target that captures at the gateway before it
writes (runner.forcing): armed for one payment, every capture call for it waits before it is
counted or answered, until the harness releases the calls held (it does once every request of
the trial is held or blocked) or the hold's own timeout passes (a harness that went away must
not leave a gateway stuck). Released calls are answered as ever: the first captures, a second
gets Razorpay's 400 "This payment has already been captured".
"""

from __future__ import annotations

import copy
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from payrace.harness.gateway.signing import GatewayKeys, razorpay_id

_NULL_PAYMENT_FIELDS = (
    *("invoice_id", "refund_status", "description", "card_id", "bank", "wallet", "fee", "tax"),
    *("error_code", "error_description", "error_source", "error_step", "error_reason"),
)
_SERVER_ERROR = "The server encountered an error. The incident has been reported to admins."


class RazorpayError(Exception):
    def __init__(
        self,
        status: int,
        description: str,
        *,
        code: str = "BAD_REQUEST_ERROR",
        field: str | None = None,
        where: tuple[str, str, str] = ("NA", "NA", "NA"),  # Razorpay's source, step, reason
    ) -> None:
        super().__init__(description)
        self.status = status
        self.injected: str | None = None  # the knob that made this error, if one did
        source, step, reason = where
        error: dict[str, Any] = {"code": code, "description": description}
        error |= {"source": source, "step": step, "reason": reason, "metadata": {}, "field": field}
        self.body = {"error": error}


def not_found(field: str = "id") -> RazorpayError:
    where = ("business", "payment_initiation", "input_validation_failed")
    return RazorpayError(400, "The id provided does not exist", field=field, where=where)


def _copy(doc: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of an order or payment for a caller, as copy.deepcopy makes it at a
    quarter of its cost on the capture's path: the scalar fields shared (immutable), the
    lists and objects (notes, acquirer_data) copied, most of them empty."""
    copied = doc.copy()
    for key, value in doc.items():
        if isinstance(value, list | dict):
            copied[key] = copy.deepcopy(value) if value else type(value)()
    return copied


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object (empty means {}), or Razorpay's 400."""
    try:
        body: object = json.loads(raw or b"{}")
    except ValueError:
        raise RazorpayError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise RazorpayError(400, "The request body must be a JSON object.")
    return body


def _require_int(body: dict[str, Any], field: str) -> int:
    if field not in body:
        raise RazorpayError(400, f"The {field} field is required.", field=field)
    value = body[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RazorpayError(400, f"The {field} must be an integer.", field=field)
    return value


def _require_currency(body: dict[str, Any]) -> str:
    currency = body.get("currency")
    if currency is None:
        raise RazorpayError(400, "The currency field is required.", field="currency")
    if not (isinstance(currency, str) and len(currency) == 3 and currency.isupper()):
        raise RazorpayError(400, "The selected currency is invalid.", field="currency")
    return currency


@dataclass(frozen=True)
class Knobs:
    latency_s: float = 0.0  # added to every /v1 call
    capture_latency_s: float = 0.0  # added to captures only
    fail_rate: float = 0.0  # fraction of captures answered 502/503, seeded
    # Fraction of captures the gateway *performs* and then answers 504 (a timeout on the way
    # back): the money is taken, the caller is told nothing useful. Seeded on its own.
    timeout_rate: float = 0.0

    def __post_init__(self) -> None:
        if not (self.latency_s >= 0 and self.capture_latency_s >= 0):
            raise ValueError(f"latencies must be >= 0, got {self}")
        for name in ("fail_rate", "timeout_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)!r}")

    def changed(self, changes: Mapping[str, object]) -> Knobs:
        """These knobs with `changes` applied: None leaves a knob as it is; an unknown name or
        a value that is not a number raises ValueError (the route answers it with a 400)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            known = ", ".join(f.name for f in fields(self))
            raise ValueError(f"unknown knob(s) {', '.join(unknown)}; the knobs are {known}")
        set_to = {name: _number(name, v) for name, v in changes.items() if v is not None}
        return replace(self, **set_to)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _number(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


class CaptureHold:
    """One capture call held at the barrier until released, or until `timeout_s` passes.

    Thread-safe: released from the harness's thread, waited on in the server's event loop."""

    def __init__(self, payment_id: str, timeout_s: float) -> None:
        self.payment_id = payment_id
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._released = False
        self._wakeups: list[Callable[[], None]] = []

    @property
    def released(self) -> bool:
        with self._lock:
            return self._released

    def on_release(self, wake: Callable[[], None]) -> None:
        """Call `wake` once released (at once if it already is), from the releasing thread."""
        with self._lock:
            if not self._released:
                self._wakeups.append(wake)
                return
        wake()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
            wakeups, self._wakeups = self._wakeups, []
        for wake in wakeups:
            wake()


MAX_HOLD_S = 600.0


class FakeRazorpay:
    """Thread-safe: gateway.server answers from its own thread while the harness reads."""

    def __init__(
        self, keys: GatewayKeys = GatewayKeys(), *, knobs: Knobs = Knobs(), seed: int = 0
    ) -> None:
        self.keys = keys
        self._initial_knobs = knobs
        self._seed = seed
        self._lock = threading.Lock()
        self._after_capture: list[Callable[[str], None]] = []
        self._on_fault: list[Callable[[str, str, int], None]] = []
        self._reset_locked()

    # -- state, read and written from any thread -------------------------------------------

    def _reset_locked(self) -> None:
        self._orders: dict[str, dict[str, Any]] = {}
        self._payments: dict[str, dict[str, Any]] = {}
        self._captures: Counter[str] = Counter()
        self._accepted: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._injected: Counter[str] = Counter()
        self._auto_captured: Counter[str] = Counter()
        self._timed_out: Counter[str] = Counter()
        self._timeout_rng = random.Random(self._seed + 1)
        self._rng = random.Random(self._seed)
        self._knobs = self._initial_knobs
        self._armed: dict[str, float] = {}  # payment id -> how long one of its calls may wait
        self._held: dict[str, list[CaptureHold]] = {}
        self.hold_timeouts = 0  # held calls that waited out their timeout unreleased

    def reset(self) -> None:
        """Forget every order, payment and count; knobs and the failure rng restart as built;
        every held capture call is released."""
        with self._lock:
            held = [h for hs in self._held.values() for h in hs]
            self._reset_locked()
        for hold in held:
            hold.release()

    # -- the capture barrier ----------------------------------------------------------------

    def arm_holds(self, payment_id: str, timeout_s: float) -> None:
        """From now on hold every capture call for `payment_id` until released or `timeout_s`."""
        if not 0 < timeout_s <= MAX_HOLD_S:
            raise ValueError(f"timeout_s must be within (0, {MAX_HOLD_S:g}], got {timeout_s!r}")
        with self._lock:
            self._armed[payment_id] = timeout_s
            self._held.setdefault(payment_id, [])

    def hold_capture(self, payment_id: str) -> CaptureHold | None:
        """A capture call for `payment_id` arrived: its hold when armed, else None (go on)."""
        with self._lock:
            timeout_s = self._armed.get(payment_id)
            if timeout_s is None:
                return None
            hold = CaptureHold(payment_id, timeout_s)
            self._held[payment_id].append(hold)
            return hold

    def leave_hold(self, hold: CaptureHold, *, timed_out: bool = False) -> None:
        """The held call goes on (released, timed out or abandoned): it is held no more."""
        with self._lock:
            held = self._held.get(hold.payment_id, [])
            if hold in held:
                held.remove(hold)
                self.hold_timeouts += timed_out
        hold.release()

    def release_holds(self, payment_id: str) -> int:
        """Let the calls held for `payment_id` go on (it stays armed); how many were held."""
        with self._lock:
            held, self._held[payment_id] = self._held.get(payment_id, []), []
            if payment_id not in self._armed:
                del self._held[payment_id]
        for hold in held:
            hold.release()
        return len(held)

    def disarm_holds(self, payment_id: str) -> int:
        """Stop holding calls for `payment_id` and release those held; how many were held."""
        with self._lock:
            self._armed.pop(payment_id, None)
        return self.release_holds(payment_id)

    def disarm_all_holds(self) -> None:
        with self._lock:
            armed = list(self._held)
            self._armed.clear()
        for payment_id in armed:
            self.release_holds(payment_id)

    def holds(self) -> dict[str, int]:
        """Armed payment ids -> capture calls held for each right now."""
        with self._lock:
            return {payment_id: len(self._held.get(payment_id, [])) for payment_id in self._armed}

    def set_knobs(self, **changes: float | None) -> dict[str, float]:
        """Change latency / failure injection at run time (see Knobs.changed); the knobs now."""
        with self._lock:
            self._knobs = self._knobs.changed(changes)
            return self._knobs.as_dict()

    def knobs(self) -> dict[str, float]:
        with self._lock:
            return self._knobs.as_dict()

    def delay_s(self, *, capture: bool) -> float:
        """The latency injected into one /v1 call; a capture also waits capture_latency_s."""
        with self._lock:
            knobs = self._knobs
        return knobs.latency_s + (knobs.capture_latency_s if capture else 0.0)

    def order(self, order_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._orders.get(order_id)
            return None if found is None else _copy(found)

    def payment(self, payment_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._payments.get(payment_id)
            return None if found is None else _copy(found)

    def capture_calls(self, payment_id: str) -> int:
        with self._lock:
            return self._captures[payment_id]

    def counters(self) -> dict[str, dict[str, int]]:
        """Per payment: captures = accepted + rejected; injected = the rejections we caused;
        auto_captured = captured by the gateway itself; captured = 1 for every payment whose
        status at the gateway is captured now, however it got there (no_phantom_capture)."""
        with self._lock:
            return {
                "captures": dict(self._captures),
                "accepted": dict(self._accepted),
                "rejected": dict(self._rejected),
                "injected": dict(self._injected),
                "auto_captured": dict(self._auto_captured),
                "timed_out": dict(self._timed_out),
                "captured": {
                    pid: 1 for pid, p in self._payments.items() if p["status"] == "captured"
                },
            }

    def auto_capture(self, payment_id: str) -> dict[str, Any]:
        """Razorpay captures an authorized payment on its own (automatic capture) and would
        now send payment.captured; an already captured payment is left as it is."""
        with self._lock:
            payment = self._payments.get(payment_id)
            if payment is None:
                raise not_found()
            if payment["status"] == "captured":
                return _copy(payment)
            body = {"amount": payment["amount"], "currency": payment["currency"]}
            captured = self._capture_locked(payment_id, body)
            self._auto_captured[payment_id] += 1
            return captured

    def create_order(self, body: dict[str, Any]) -> dict[str, Any]:
        amount = _require_int(body, "amount")
        if amount < 100:
            raise RazorpayError(400, "The amount must be atleast INR 1.00", field="amount")
        currency = _require_currency(body)
        receipt = body.get("receipt")
        if receipt is not None and (not isinstance(receipt, str) or len(receipt) > 40):
            raise RazorpayError(
                400, "The receipt may not be greater than 40 characters.", field="receipt"
            )
        order: dict[str, Any] = {
            "id": razorpay_id("order_"),
            "entity": "order",
            "amount": amount,
            "amount_paid": 0,
            "amount_due": amount,
            "currency": currency,
            "receipt": receipt,
            "offer_id": None,
            "status": "created",
            "attempts": 0,
            # Razorpay's PHP backend serialises empty notes as [] rather than {}; clients meet it.
            "notes": body.get("notes") or [],
            "created_at": int(time.time()),
        }
        with self._lock:
            self._orders[order["id"]] = order
            return _copy(order)

    def authorize_payment(self, order_id: str, *, method: str = "upi") -> dict[str, Any]:
        """The customer pays at Checkout: a payment authorized for the order's full amount."""
        with self._lock:
            order = self._orders.get(order_id)
            if order is None:
                raise KeyError(f"no order {order_id!r} at the fake gateway")
            if order["status"] == "paid":
                raise ValueError(f"order {order_id} is already paid")
            payment: dict[str, Any] = {
                "id": razorpay_id("pay_"),
                "entity": "payment",
                "amount": order["amount"],
                "currency": order["currency"],
                "status": "authorized",
                "order_id": order_id,
                "method": method,
                "captured": False,
                "international": False,
                "amount_refunded": 0,
                "vpa": "success@razorpay" if method == "upi" else None,
                "email": "void@razorpay.com",
                "contact": "+919000090000",
                "notes": [],
                "acquirer_data": {},
                "created_at": int(time.time()),
            }
            # The rest of Razorpay's payment entity is null until something happens to it.
            for field in _NULL_PAYMENT_FIELDS:
                payment[field] = None
            self._payments[payment["id"]] = payment
            order["status"] = "attempted"
            order["attempts"] += 1
            return _copy(payment)

    def add_after_capture(self, hook: Callable[[str], None]) -> None:
        """Call `hook(payment_id)` after each accepted capture, before its answer goes out
        (gateway.server runs it in a worker thread and holds the answer until it returns)."""
        with self._lock:
            self._after_capture.append(hook)

    def remove_after_capture(self, hook: Callable[[str], None]) -> None:
        with self._lock:
            if hook in self._after_capture:
                self._after_capture.remove(hook)

    def after_capture(self) -> list[Callable[[str], None]]:
        with self._lock:
            return list(self._after_capture)

    def add_on_fault(self, hook: Callable[[str, str, int], None]) -> None:
        """Call `hook(fault, payment_id, status)` for each failure the knobs inject into a
        capture ("gateway-errors" 502/503, "gateway-timeout" 504), before it is answered."""
        with self._lock:
            self._on_fault.append(hook)

    def remove_on_fault(self, hook: Callable[[str, str, int], None]) -> None:
        with self._lock:
            if hook in self._on_fault:
                self._on_fault.remove(hook)

    def capture(self, payment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._capture_counted(payment_id, body)
        except RazorpayError as exc:
            if exc.injected is not None:
                with self._lock:
                    hooks = list(self._on_fault)
                for hook in hooks:
                    hook(exc.injected, payment_id, exc.status)
            raise

    def _capture_counted(self, payment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        # One critical section from count to state change: two racing captures of one payment
        # must see each other, or the fake would hide exactly the bug payrace hunts.
        with self._lock:
            self._captures[payment_id] += 1
            # Drawn on every call, so call n fails iff u_n < fail_rate: a higher rate only adds
            # failures to the same seeded sequence.
            draw = self._rng.random()
            status = self._rng.choice((502, 503))
            try:
                if draw < self._knobs.fail_rate:
                    self._injected[payment_id] += 1
                    failed = RazorpayError(status, _SERVER_ERROR, code="SERVER_ERROR")
                    failed.injected = "gateway-errors"
                    raise failed
                captured = self._capture_locked(payment_id, body)
            except RazorpayError:
                self._rejected[payment_id] += 1
                raise
            self._accepted[payment_id] += 1
            if self._knobs.timeout_rate and self._timeout_rng.random() < self._knobs.timeout_rate:
                # Captured, and then the answer is lost: what the caller sees of a timeout.
                self._timed_out[payment_id] += 1
                lost = RazorpayError(504, "Gateway Timeout", code="GATEWAY_ERROR")
                lost.injected = "gateway-timeout"
                raise lost
            return captured

    def _capture_locked(self, payment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        payment = self._payments.get(payment_id)
        if payment is None:
            raise not_found()
        amount = _require_int(body, "amount")
        currency = _require_currency(body)
        if payment["status"] == "captured":
            raise RazorpayError(400, "This payment has already been captured")
        if payment["status"] != "authorized":
            raise RazorpayError(
                400,
                "Only payments which have been authorized and not yet captured can be captured",
            )
        if amount != payment["amount"]:
            raise RazorpayError(
                400, "Capture amount must be equal to the amount authorized", field="amount"
            )
        if currency != payment["currency"]:
            raise RazorpayError(
                400, "Currency should be same as payment currency", field="currency"
            )
        fee = payment["amount"] * 2 // 100  # Razorpay's fee includes its 18% GST
        payment.update(status="captured", captured=True, fee=fee, tax=fee * 18 // 118)
        order = self._orders[payment["order_id"]]
        order.update(status="paid", amount_paid=order["amount"], amount_due=0)
        return _copy(payment)
