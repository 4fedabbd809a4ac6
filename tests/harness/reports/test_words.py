"""reports.words: every checker's examples said in words, never as JSON or a repr."""

from __future__ import annotations

from typing import Any

import pytest

from payrace.harness.reports.words import check_message, count_words, in_words

OPS = [
    {"index": 12, "f": "verify", "process": "client", "type": "ok", "status": 200, "trial": 3},
    {"index": 13, "f": "webhook", "process": "webhook-1", "type": "info", "trial": 3},
]


@pytest.mark.parametrize(
    ("checker", "example", "said"),
    [
        (
            "single_capture_write",
            {"payment": 17, "table": "payments", "writes": 2, "txids": [811, 812], "ops": OPS},
            "payment 17 (trial 3): 2 transactions set its payments row to captured (txids 811, "
            "812), by verify from client (request #12, answered 200) and webhook from webhook-1 "
            "(request #13, no answer (info))",
        ),
        (
            "single_invoice_paid",
            {"payment": 5, "table": "invoices", "writes": 0, "final_status": "pending"},
            "payment 5 ended captured but no transaction set its invoices row to paid "
            "(final status pending)",
        ),
        (
            "gateway_capture_once",
            {"gateway_payment_id": "pay_ABC", "payment": 4, "calls": 2, "accepted": 1, "ops": []},
            "pay_ABC (payment 4): 2 capture calls reached the gateway, 1 accepted",
        ),
        (
            "no_lost_capture",
            {"payment": 4, "final_status": "pending", "confirmed_by": ["webhook ok #9"]},
            "payment 4 ends pending although confirmed captured: webhook ok #9",
        ),
        (
            "no_5xx",
            {**OPS[0], "status": 500, "payment": 17, "code": "internal", "error": "boom"},
            "verify from client (request #12, answered 500) for payment 17 (trial 3), error code "
            "internal: boom",
        ),
        (
            "no_deadlock",
            {"unattributed": 2, "why": "never seen as a cycle"},
            "2 deadlock(s) PostgreSQL counted that no trial could be tied to: never seen as a "
            "cycle",
        ),
        (
            "error_classes",
            {
                "f": "webhook",
                "status": 404,
                "code": None,
                "count": 3,
                "expected": False,
                "first_index": 5,
                "last_index": 40,
            },
            "webhook answered 404 3 times (requests #5 to #40), unexpected",
        ),
        ("a_team_checker", {"payment": 3, "rows": [1, 2]}, "payment 3; rows 1, 2"),
    ],
)
def test_each_checkers_example_in_words(checker: str, example: dict[str, Any], said: str) -> None:
    assert in_words(checker, example) == said


def test_a_shape_the_checker_does_not_know_is_still_words() -> None:
    said = in_words("single_capture_write", {"payment": 1, "writes": "many", "txids": {"a": 1}})
    assert "{" not in said and "'" not in said


def test_a_failing_check_names_the_checker_the_count_and_the_first_example() -> None:
    check = {"valid": False, "count": 3, "checked": 20, "first": {"payment": 9, "writes": 0}}
    assert count_words("single_capture_write", check) == (
        "3 of 20 payments captured by more than one transaction"
    )
    assert check_message("single_capture_write", check).startswith(
        "single_capture_write: 3 of 20 payments captured by more than one transaction; "
        "first: payment 9 ended captured"
    )
    unknown = {"valid": "unknown", "count": 0, "checked": 0, "note": "not settled"}
    assert check_message("no_deadlock", unknown) == "no_deadlock: unknown: not settled"
    # The counter's facts as an unsettled no_deadlock carries them: not an untied deadlock.
    facts = {"counted": 0, "settled": False, "cycles_seen": 0, "attributed": 0,
             "unattributed": 0, "why_unattributed": "", "payments": []}  # fmt: skip
    said = in_words("no_deadlock", facts)
    assert said == "count not settled: 0 counted so far, 0 wait-for cycle(s) seen"
    untied = {"unattributed": 2, "why": "no lock sampler ran"}
    assert "2 deadlock(s) PostgreSQL counted that no trial could be tied to" in in_words(
        "no_deadlock", untied
    )
    assert check_message("no_5xx", {"valid": True, "checked": 8}) == "no_5xx: held (8 checked)"
