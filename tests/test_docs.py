"""The pages under docs/: their Python examples are run as written, so they never rot.

A block marked `<!-- docs-test: NAME -->` right before a ```python fence is executed here:
docs/razorpay-sdks.md's SDK blocks through the real `razorpay` package against a real fake
gateway (GatewayServer on loopback, the page's base URL swapped for its free port), and
docs/pause-protocol.md's Python sketch against the real PostgreSQL with racing captures.
Relative links in docs/ must name files that exist.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import (
    GatewayKeys,
    client_callback,
    signed_webhook,
    webhook_event,
)
from payrace.harness.infra.provider import Database
from payrace.service.instrument.probes import PauseHeaderError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SHOWN_GATEWAY = "http://127.0.0.1:9411"  # what the page tells a reader; `payrace gateway`'s default


def docs_block(page: str, name: str) -> str:
    text = (DOCS / page).read_text(encoding="utf-8")
    marker = f"<!-- docs-test: {name} -->"
    assert text.count(marker) == 1, f"{page}: expected one {marker}"
    after = text.split(marker, 1)[1].lstrip("\n")
    assert after.startswith("```python\n"), f"{page}: {marker} must precede a ```python block"
    return after.removeprefix("```python\n").split("\n```", 1)[0]


def test_docs_block_reads_the_marked_python_fence() -> None:
    block = docs_block("razorpay-sdks.md", "sdk-python")
    assert block.startswith("import razorpay\n")
    assert "```" not in block


# -- docs/razorpay-sdks.md --------------------------------------------------------------------


@pytest.fixture
def sdk_page_namespace() -> Any:
    """The page's two Python blocks run in one namespace against a fake gateway of their own."""
    fake = FakeRazorpay(GatewayKeys())
    with GatewayServer(fake) as server:
        client_block = docs_block("razorpay-sdks.md", "sdk-python")
        # The page shows `payrace gateway`'s default port; the test's gateway has a free one.
        assert client_block.count(f'base_url="{SHOWN_GATEWAY}"') == 1
        namespace: dict[str, Any] = {}
        exec(client_block.replace(SHOWN_GATEWAY, server.url), namespace)
        exec(docs_block("razorpay-sdks.md", "sdk-python-signatures"), namespace)
        yield fake, namespace


def test_the_python_sdk_block_creates_and_fetches_an_order_at_the_fake(
    sdk_page_namespace: Any,
) -> None:
    fake, namespace = sdk_page_namespace
    order = namespace["order"]
    # At this fake, not anywhere else: the order is in its own state.
    assert fake.order(order["id"]) == order
    assert order["amount"] == 50000 and order["status"] == "created"


def test_the_client_the_page_builds_captures_once_and_is_refused_the_second_time(
    sdk_page_namespace: Any,
) -> None:
    from razorpay.errors import BadRequestError

    fake, namespace = sdk_page_namespace
    client = namespace["client"]
    payment = fake.authorize_payment(namespace["order"]["id"])
    captured = client.payment.capture(payment["id"], 50000, {"currency": "INR"})
    assert captured["status"] == "captured"
    with pytest.raises(BadRequestError, match="already been captured"):
        client.payment.capture(payment["id"], 50000, {"currency": "INR"})
    assert fake.capture_calls(payment["id"]) == 2


def test_the_page_s_signature_checks_accept_what_payrace_sends(sdk_page_namespace: Any) -> None:
    fake, namespace = sdk_page_namespace
    keys = GatewayKeys()
    payment = fake.authorize_payment(namespace["order"]["id"])
    form = client_callback(payment["order_id"], payment["id"], keys.key_secret)
    assert namespace["callback_is_genuine"](form)
    body, headers = signed_webhook(webhook_event("payment.captured", payment), keys.webhook_secret)
    assert namespace["webhook_is_genuine"](body, headers["X-Razorpay-Signature"])


def test_the_page_s_signature_checks_refuse_a_forgery(sdk_page_namespace: Any) -> None:
    fake, namespace = sdk_page_namespace
    keys = GatewayKeys()
    payment = fake.authorize_payment(namespace["order"]["id"])
    forged = client_callback(payment["order_id"], payment["id"], "not_the_key_secret")
    assert not namespace["callback_is_genuine"](forged)
    body, headers = signed_webhook(webhook_event("payment.captured", payment), keys.webhook_secret)
    # One byte more whitespace: the same JSON, other bytes, another signature.
    assert not namespace["webhook_is_genuine"](body + b" ", headers["X-Razorpay-Signature"])


# -- docs/pause-protocol.md -------------------------------------------------------------------


SCHEMA = "docs_pause_sketch"


@pytest.fixture
async def sketch_pool(pg: Database, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """A pool whose `payments` table is the sketch's own (a schema of its own, dropped after)."""
    monkeypatch.setenv("PAYRACE_PROBES", "1")
    admin = await asyncpg.connect(pg.url)
    try:
        await admin.execute(
            f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}; "
            f"CREATE TABLE {SCHEMA}.payments (id int PRIMARY KEY, status text NOT NULL)"
        )
        pool = await asyncpg.create_pool(
            pg.url, min_size=1, max_size=8, server_settings={"search_path": SCHEMA}
        )
        try:
            yield pool
        finally:
            await pool.close()
            await admin.execute(f"DROP SCHEMA {SCHEMA} CASCADE")
    finally:
        await admin.close()


def pause_sketch(pool: Any, *, lock: bool = True) -> dict[str, Any]:
    code = docs_block("pause-protocol.md", "pause-python")
    if not lock:  # the incident's read: the same sketch without its row lock
        assert code.count(" FOR UPDATE") == 1
        code = code.replace(" FOR UPDATE", "")
    namespace: dict[str, Any] = {"pool": pool}
    exec(code, namespace)
    return namespace


async def race(
    sketch: dict[str, Any], payment_id: int, header: str | None, requests: int, *, late_s: float = 0
) -> Any:
    """`requests` captures of one payment at once; with `late_s`, each starts that much after
    the one before it."""
    await sketch["pool"].execute("INSERT INTO payments VALUES ($1, 'pending')", payment_id)

    async def one(i: int) -> Any:
        await asyncio.sleep(i * late_s)
        return await sketch["with_pause"](header, lambda: sketch["capture"](payment_id))

    return await asyncio.gather(*(one(i) for i in range(requests)))


async def test_the_pause_sketch_makes_a_naive_read_capture_twice_in_every_trial(
    sketch_pool: Any,
) -> None:
    sketch = pause_sketch(sketch_pool, lock=False)
    for trial in range(1, 6):
        header = f"group=docs-naive-{trial}; size=2; timeout_ms=5000; hold_ms=0"
        # The second starts 0.1 s late, long after an unpaused first would have committed: both
        # reading `pending` (both capturing) is the pause's doing, not the scheduler's.
        answers = await race(sketch, trial, header, 2, late_s=0.1)
        assert answers == [("pending", "honoured"), ("pending", "honoured")]


async def test_the_pause_sketch_lets_a_locking_capture_through_once(sketch_pool: Any) -> None:
    sketch = pause_sketch(sketch_pool)
    for trial in range(1, 4):
        header = f"group=docs-lock-{trial}; size=3; timeout_ms=5000; hold_ms=5"
        answers = await race(sketch, trial, header, 3)
        # The waiters were seen blocked in their FOR UPDATE, not timed out: one capture.
        assert sorted(answers) == [
            ("captured", "honoured"),
            ("captured", "honoured"),
            ("pending", "honoured"),
        ]
    assert sketch["GROUPS"] == {}


async def test_the_pause_sketch_answers_timed_out_when_a_member_never_comes(
    sketch_pool: Any,
) -> None:
    sketch = pause_sketch(sketch_pool)
    answers = await race(sketch, 1, "group=docs-short; size=3; timeout_ms=150", 2)
    assert [state for _, state in answers] == ["timed-out", "timed-out"]


async def test_the_pause_sketch_ignores_the_header_without_probes_and_refuses_a_bad_one(
    sketch_pool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sketch = pause_sketch(sketch_pool)
    with pytest.raises(PauseHeaderError, match="group"):
        await race(sketch, 1, "size=2", 1)
    monkeypatch.delenv("PAYRACE_PROBES")
    assert await race(sketch, 2, "group=docs-off; size=2", 1) == [("pending", None)]


def test_every_relative_link_in_docs_names_a_file_that_exists() -> None:
    pages = sorted(DOCS.glob("*.md"))
    assert any(p.name == "pause-protocol.md" for p in pages)
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.name}: {target}")
    assert broken == []


def test_the_profile_page_links_both_pages_in_its_see_also_line() -> None:
    last = (DOCS / "profile.md").read_text(encoding="utf-8").rstrip().splitlines()[-1]
    assert last.startswith("See also")
    assert "(razorpay-sdks.md)" in last and "(pause-protocol.md)" in last


def test_every_test_the_reliability_findings_table_names_exists() -> None:
    """docs/service-reliability.md maps issue 11's findings to tests; a renamed or deleted
    test must not leave the table pointing at nothing."""
    root = ROOT
    text = (DOCS / "service-reliability.md").read_text(encoding="utf-8")
    table = text.split("## Issue 11's findings and the tests that hold them", 1)[1]
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(r.split("|")[1]) for r in rows] == list(range(1, 12))
    for row in rows:
        module = None
        # Test references only: `path.py[::name]` or `::name`; other code spans quote input.
        refs = [
            r for r in re.findall(r"`([^`]+)`", row.split("|")[3]) if ".py" in r or r[:2] == "::"
        ]
        assert refs, row
        for ref in refs:
            if ref.startswith("::"):  # another test of the module named before it
                path, name = module, ref[2:]
            else:
                path, _, name = ref.partition("::")
                module = path
            assert path is not None and (root / "tests" / path).is_file(), ref
            if name:
                source = (root / "tests" / path).read_text(encoding="utf-8")
                assert re.search(rf"def {re.escape(name)}\(", source), f"{path}::{name}"
