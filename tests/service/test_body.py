"""payrace/service/body.py: bodies bounded in size (413, never read whole) and in nesting."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.types import Message, Receive, Scope, Send

from payrace.service.body import (
    MAX_JSON_DEPTH,
    BodyLimitMiddleware,
    json_depth,
    lone_surrogate,
    may_escape_surrogate,
)


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ("[]", 1),
        ('{"a": [{"b": 1}]}', 3),
        ('{"a": "[[[[{{{{"}', 1),  # brackets inside strings do not count
        ('{"a": "\\"[[["}', 1),  # nor after an escaped quote
        ("[" * 1000 + "]" * 1000, 1000),
        ("[" * 50, 50),  # unterminated: still measured, in one pass
    ],
)
def test_json_depth_counts_arrays_and_objects_outside_strings(text: str, depth: int) -> None:
    assert json_depth(text) == depth


def test_lone_surrogates_are_found_in_values_and_keys_but_pairs_are_text() -> None:
    assert lone_surrogate(json.loads('{"a": {"b": ["x", "\\ud800"]}}')) == "body.a.b[1]"
    assert lone_surrogate(json.loads('{"\\udfff": 1}')) == "body (a key)"
    assert lone_surrogate(json.loads('{"a": "\\ud83d\\ude00"}')) is None  # an escaped emoji
    assert lone_surrogate(json.loads('{"a": "caf\\u00e9", "n": [1, 2.5, null, true]}')) is None


def test_only_a_surrogate_escape_can_make_a_lone_surrogate() -> None:
    assert may_escape_surrogate('{"a": "\\ud800"}')
    assert may_escape_surrogate('{"\\uDFFF": 1}')
    assert may_escape_surrogate('{"a": "\\ud83d\\ude00"}')  # a pair: the walk says None
    assert not may_escape_surrogate('{"a": "caf\\u00e9 \\uD7FF \\uE000", "b": "\\\\"}')


# Strings with lone surrogates (Cs), backslashes, quotes and astral characters, nested.
_texts = st.recursive(
    st.text(alphabet=st.characters(categories=["Cs", "Ll", "Po", "So", "Cc"])) | st.integers(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(doc=_texts, ascii_only=st.booleans())
def test_a_text_the_quick_check_clears_never_parses_to_a_lone_surrogate(
    doc: Any, ascii_only: bool
) -> None:
    text = json.dumps(doc, ensure_ascii=ascii_only)
    try:
        text.encode("utf-8")  # what the service decodes from: UTF-8 holds no surrogate
    except UnicodeEncodeError:
        return
    if not may_escape_surrogate(text):
        assert lone_surrogate(json.loads(text)) is None


class Recorder:
    """An ASGI app that reads the whole body, and the messages its server sent back."""

    def __init__(self) -> None:
        self.body: bytes | None = None
        self.sent: list[Message] = []

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.body = b"".join(chunks)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def status(self) -> int:
        return int(self.sent[0]["status"])

    def error(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.sent[1]["body"])["error"]
        return body


def streamed(total: int, chunk: int = 64 * 1024) -> tuple[Receive, list[int]]:
    """A client sending `total` bytes in chunks; `read` counts what the server took."""
    read = [0]

    async def receive() -> Message:
        size = min(chunk, total - read[0])
        read[0] += size
        return {"type": "http.request", "body": b"x" * size, "more_body": read[0] < total}

    return receive, read


def scope(headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    return {"type": "http", "method": "POST", "path": "/orders", "headers": headers or []}


async def test_a_body_of_100_mb_without_content_length_is_413_after_reading_the_limit() -> None:
    app = Recorder()
    limit = 64 * 1024
    receive, read = streamed(100 * 1024 * 1024)

    await BodyLimitMiddleware(app.app, max_bytes=limit)(scope(), receive, app.send)

    assert app.status() == 413
    assert app.error()["code"] == "body_too_large"
    assert app.body is None  # the route never ran
    assert read[0] <= 2 * limit  # one chunk past the limit, not 100 MB


async def test_a_declared_content_length_over_the_limit_is_413_before_reading() -> None:
    app = Recorder()
    receive, read = streamed(100 * 1024 * 1024)
    headers = [(b"content-length", str(100 * 1024 * 1024).encode())]

    await BodyLimitMiddleware(app.app, max_bytes=1024)(scope(headers), receive, app.send)

    assert app.status() == 413
    assert read[0] == 0
    assert "1024 bytes" in app.error()["message"]


async def test_a_body_within_the_limit_reaches_the_app_unchanged() -> None:
    app = Recorder()
    receive, _ = streamed(3000, chunk=1000)

    await BodyLimitMiddleware(app.app, max_bytes=3000)(scope(), receive, app.send)

    assert app.status() == 200
    assert app.body == b"x" * 3000


@pytest.mark.parametrize("padding", [b"", b'{"s": "' + b"{[" * 40 + b'"}, '])
async def test_json_nested_past_the_limit_is_400_and_at_the_limit_passes(padding: bytes) -> None:
    """Also when brackets inside strings push the count past the limit: only nesting counts."""
    for depth, status in ((MAX_JSON_DEPTH, 200), (MAX_JSON_DEPTH + 1, 400)):
        app = Recorder()
        raw = b"[" + padding + b"[" * (depth - 1) + b"]" * depth
        if padding:
            assert raw.count(b"[") + raw.count(b"{") > 2 * MAX_JSON_DEPTH

        async def receive(raw: bytes = raw) -> Message:
            return {"type": "http.request", "body": raw, "more_body": False}

        await BodyLimitMiddleware(app.app, max_bytes=64 * 1024)(scope(), receive, app.send)

        assert app.status() == status
        if status == 400:
            assert app.error()["code"] == "invalid_body"
            assert f"{depth} levels" in app.error()["message"]


async def test_a_content_length_that_is_not_a_number_is_400() -> None:
    app = Recorder()
    receive, _ = streamed(10)

    await BodyLimitMiddleware(app.app, max_bytes=1024)(
        scope([(b"content-length", b"ten")]), receive, app.send
    )

    assert app.status() == 400
