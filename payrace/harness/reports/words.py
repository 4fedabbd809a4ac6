"""A checker's result in words, for people: JUnit messages, the console and report.html.

    in_words()      (checker name, one example: first / worst / last) -> one sentence
    count_words()   (checker name, its result) -> "3 of 20 payments captured more than once"
    check_message() "checker: count; first: example", the line a failing testcase carries

The examples are the small dicts model.checker builds (payment, audit rows, history
operations, gateway ids); a shape it does not know is still said as `key value` pairs,
never as JSON or a Python repr. Nothing here imports rich, so the Locust gate stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

# What each checker counts (its `checked`) and what a violation of it is, as a phrase that
# follows "N of M <unit>".
_COUNTED: dict[str, tuple[str, str]] = {
    "single_capture_write": ("payments", "captured by more than one transaction"),
    "single_invoice_paid": ("payments", "with an invoice marked paid more than once or never"),
    "single_order_paid": ("payments", "with an order marked paid more than once or never"),
    "gateway_capture_once": ("gateway payments", "captured at the gateway more than once"),
    "no_lost_capture": ("confirmed payments", "confirmed captured but not captured"),
    "no_5xx": ("answers", "a crash (5xx)"),
    "no_deadlock": ("payments", "deadlocked"),
    "error_classes": ("answers", "in an unexpected error class"),
}

_TABLE_DONE = {"payments": "captured", "invoices": "paid", "orders": "paid"}
_LISTED = 4  # requests or statements named in one sentence; the rest are counted


def _scalar(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(_scalar(v) for v in value[:_LISTED]) + (
            f" and {len(value) - _LISTED} more" if len(value) > _LISTED else ""
        )
    if isinstance(value, Mapping):
        return "; ".join(f"{k} {_scalar(v)}" for k, v in value.items())
    return str(value)


def _and(parts: Iterable[str]) -> str:
    items = list(parts)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _request(op: Mapping[str, Any]) -> str:
    """`verify from client (request #8, answered 200)`."""
    what = f"{op.get('f', '?')} from {op.get('process', '?')}"
    status = op.get("status")
    answer = f"answered {status}" if status is not None else f"no answer ({op.get('type', '?')})"
    index = op.get("index")
    return f"{what} ({f'request #{index}, ' if index is not None else ''}{answer})"


def _requests(ops: object) -> str:
    if not isinstance(ops, list) or not ops:
        return ""
    named = [_request(op) for op in ops[:_LISTED] if isinstance(op, Mapping)]
    more = len(ops) - len(named)
    return _and(named) + (f" and {more} more" if more > 0 else "")


def _payment(example: Mapping[str, Any]) -> str:
    payment = example.get("payment")
    trial = example.get("trial")
    if trial is None:
        ops = example.get("ops") or []
        trials = {op.get("trial") for op in ops if isinstance(op, Mapping) and op.get("trial")}
        trial = trials.pop() if len(trials) == 1 else None
    text = f"payment {payment}" if payment is not None else "a payment"
    return text + (f" (trial {trial})" if trial is not None else "")


def _single_write(example: Mapping[str, Any]) -> str:
    table = str(example.get("table") or "payments")
    audit = [a for a in example.get("audit") or [] if isinstance(a, Mapping)]
    done = next((str(a["new"]) for a in audit if a.get("new")), _TABLE_DONE.get(table, "done"))
    writes = example.get("writes") or 0
    who = _payment(example)
    if writes == 0:
        return (
            f"{who} ended captured but no transaction set its {table} row to {done} "
            f"(final status {_scalar(example.get('final_status'))})"
        )
    txids = _scalar(example.get("txids"))
    text = f"{who}: {writes} transactions set its {table} row to {done} (txids {txids})"
    if requests := _requests(example.get("ops")):
        text += f", by {requests}"
    return text


def _gateway(example: Mapping[str, Any]) -> str:
    gid = example.get("gateway_payment_id", "?")
    text = (
        f"{gid} ({_payment(example)}): {example.get('calls', '?')} capture calls reached the "
        f"gateway, {example.get('accepted', '?')} accepted"
    )
    if requests := _requests(example.get("ops")):
        text += f", by {requests}"
    return text


def _lost(example: Mapping[str, Any]) -> str:
    if "gateway_payment_ids" in example:
        return (
            f"gateway captures of {_scalar(example['gateway_payment_ids'])} belong to no "
            "payment the run knows"
        )
    confirmed = _scalar(example.get("confirmed_by"))
    final = example.get("final_status")
    ends = f"ends {final}" if final is not None else "is outside what the oracle observed"
    return f"{_payment(example)} {ends} although confirmed captured: {confirmed}"


def _crash(example: Mapping[str, Any]) -> str:
    text = _request(example)
    if example.get("payment") is not None:
        text += f" for {_payment(example)}"
    if example.get("code"):
        text += f", error code {example['code']}"
    if example.get("error"):
        text += f": {example['error']}"
    return text


def _deadlock(example: Mapping[str, Any]) -> str:
    if "settled" in example:  # the counter's facts: it had not settled, or was not waited for
        return (
            f"count not settled: {example.get('counted', 0)} counted so far, "
            f"{example.get('cycles_seen', 0)} wait-for cycle(s) seen"
        )
    if "unattributed" in example:
        return (
            f"{example['unattributed']} deadlock(s) PostgreSQL counted that no trial could be "
            f"tied to: {example.get('why') or 'no reason recorded'}"
        )
    if "payment" not in example:  # a shape this module does not know
        return _scalar({k: v for k, v in example.items() if not isinstance(v, list | dict)})
    text = f"{_payment(example)}: {example.get('deadlocks', '?')} deadlock(s)"
    statements = [str(s) for s in example.get("statements") or []]
    if statements:
        text += f"; statements: {_and(statements[:_LISTED])}"
    replies = [r for r in example.get("replies") or [] if isinstance(r, Mapping)]
    if replies:
        r = replies[0]
        text += (
            f"; {r.get('f')} from {r.get('process')} answered {r.get('status')}: {r.get('said')}"
        )
    return text


def _error_class(example: Mapping[str, Any]) -> str:
    if "classes" in example:
        classes = [c for c in example.get("classes") or [] if isinstance(c, Mapping)]
        return _and(_error_class(c) for c in classes) or "no answers"
    status = example.get("status")
    said = f"{example.get('f', '?')} answered {status if status is not None else 'nothing'}"
    if example.get("code"):
        said += f" {example['code']}"
    count = example.get("count", "?")
    said += f" {count} time{'s' * (count != 1)}"
    first, last = example.get("first_index"), example.get("last_index")
    if first is not None:
        said += f" (requests #{first}" + (f" to #{last})" if last != first else ")")
    if example.get("expected") is False:
        said += ", unexpected"
    return said


_SAY: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "single_capture_write": _single_write,
    "single_invoice_paid": _single_write,
    "single_order_paid": _single_write,
    "gateway_capture_once": _gateway,
    "no_lost_capture": _lost,
    "no_5xx": _crash,
    "no_deadlock": _deadlock,
    "error_classes": _error_class,
}


def in_words(checker: str, example: object) -> str:
    """One checker example as a sentence; "" for none."""
    if example is None:
        return ""
    if not isinstance(example, Mapping):
        return _scalar(example)
    say = _SAY.get(checker)
    if say is not None:
        try:
            return say(example)
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # a shape this module does not know: said plainly below
    return _scalar({k: v for k, v in example.items() if k not in ("ops", "audit")})


def count_words(checker: str, check: Mapping[str, Any]) -> str:
    """`3 of 20 payments captured by more than one transaction`."""
    unit, what = _COUNTED.get(checker, ("checked", "violating"))
    return f"{check.get('count', '?')} of {check.get('checked', '?')} {unit} {what}"


def check_message(checker: str, check: Mapping[str, Any]) -> str:
    """The line a failing testcase (or a console row) carries for one checker."""
    valid = check.get("valid", "unknown")
    if valid is False:
        text = f"{checker}: {count_words(checker, check)}"
        first = in_words(checker, check.get("first"))
        return text + (f"; first: {first}" if first else "")
    if valid is True:
        return f"{checker}: held ({check.get('checked', '?')} checked)"
    note = check.get("note") or "the checker could not decide"
    first = in_words(checker, check.get("first"))
    return f"{checker}: unknown: {note}" + (f"; first undecided: {first}" if first else "")
