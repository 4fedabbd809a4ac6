"""payrace.redact: passwords out of free text, hosts out of client-facing errors."""

from __future__ import annotations

import pytest

from payrace.redact import redact, redact_tree, without_endpoints


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "payrace run --dsn postgresql://alice:s3cr%40t@db.example:5432/postgres",
            "payrace run --dsn postgresql://alice:***@db.example:5432/postgres",
        ),
        ("postgres://bob:p:w@h/d", "postgres://bob:***@h/d"),
        ("host=db password=hunter2 dbname=x", "host=db password=*** dbname=x"),
        ("password='a b c' user=x", "password=*** user=x"),
        ("PGPASSWORD=abc psql", "PGPASSWORD=*** psql"),
        (
            "postgresql://u@/db?host=/tmp&password=zzz&x=1",
            "postgresql://u@/db?host=/tmp&password=***&x=1",
        ),
        # nothing secret: left exactly as it was
        ("http://127.0.0.1:8000/api@x", "http://127.0.0.1:8000/api@x"),
        ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
        ("no url here", "no url here"),
    ],
)
def test_redact_takes_out_passwords_only(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_tree_reaches_every_string_and_keeps_the_rest() -> None:
    marker = object()
    doc = {"command": "x --dsn postgresql://u:pw@h/d", "n": 3, "list": ["password=pw"], "o": marker}
    out = redact_tree(doc)
    assert out == {
        "command": "x --dsn postgresql://u:***@h/d",
        "n": 3,
        "list": ["password=***"],
        "o": marker,
    }
    assert doc["command"].endswith("u:pw@h/d")  # a copy: the input is left alone


def test_without_endpoints_hides_where_a_service_lives() -> None:
    said = (
        "gateway unavailable: ConnectionError: HTTPConnectionPool(host='10.0.0.5', port=41234): "
        "Max retries exceeded with url: /v1/payments/pay_x/capture; http://10.0.0.5:41234/v1 "
        "('10.0.0.5', 41234) 10.0.0.5:41234"
    )
    out = without_endpoints(said)
    assert "10.0.0.5" not in out and "41234" not in out
    assert out.startswith("gateway unavailable: ConnectionError")
    assert "/v1/payments/pay_x/capture" in out  # what failed is still said
