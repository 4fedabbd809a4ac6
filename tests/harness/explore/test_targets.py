"""explore.targets: the reference service as the explorer's target.

Driving it is tested in test_engine.py and test_plan.py; an app as the target in test_app.py.
Here: its names, and what it tells the explorer about a request (one capture, real database).
"""

from __future__ import annotations

import httpx
import pytest

from payrace.harness.explore.scenario import ScenarioError
from payrace.harness.explore.targets import ReferenceTarget
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.signing import GatewayKeys, client_callback
from payrace.harness.infra.provider import Database
from payrace.harness.model.profile import Profile


def test_the_reference_target_is_named_by_strategy_and_isolation() -> None:
    target = ReferenceTarget("for_update", "rr")
    assert (target.name, target.isolation) == ("for_update", "REPEATABLE READ")
    assert target.exact_pids and target.model is None  # its probes name every backend
    assert target.profile.oracle == Profile.reference().oracle


def test_which_strategies_lock_the_payment_read() -> None:
    locks = {s: ReferenceTarget(s, "rc").lock_rows for s in ("naive", "for_update", "advisory")}
    assert locks == {"naive": False, "for_update": True, "advisory": True}


def test_the_reference_profile_carries_the_keys_it_is_given() -> None:
    keys = GatewayKeys(key_id="rzp_test_other", key_secret="s1", webhook_secret="s2")
    assert ReferenceTarget("naive", "rc", keys).profile.keys == keys


def test_an_unknown_strategy_names_the_known_ones() -> None:
    with pytest.raises(ScenarioError, match="unknown strategy fastest; choose from naive"):
        ReferenceTarget("fastest", "rc")


class Told:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_statement(self, statement: str) -> None:
        self.seen.append(" ".join(statement.split()[:2]))

    def on_commit(self) -> None:
        self.seen.append("COMMIT")

    def on_error(self, message: str) -> None:
        self.seen.append(f"error: {message}")


async def test_the_target_tells_each_statement_and_commit_of_a_capture_but_not_its_intent(
    explore_db: Database, gateway: tuple[FakeRazorpay, str]
) -> None:
    """The capture runs on asyncpg (payrace.service.sql), the routes on SQLAlchemy: the
    explorer is told both. The capture intent's INSERT (its own pool) is not a step of the
    schedule (capture.Runner.intents), so it is not told."""
    fake, url = gateway
    target, told = ReferenceTarget("for_update", "rc"), Told()
    app = await target.start(explore_db.url, url, told)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as client:
            order = (await client.post("/orders", json={"amount": 50000})).json()
            paid = fake.authorize_payment(order["gateway_order_id"])
            body = client_callback(order["gateway_order_id"], paid["id"], target.keys.key_secret)
            told.seen.clear()
            answer = await client.post(
                "/payments/verify", json={**body, "internal_payment_id": order["payment_id"]}
            )
    finally:
        await target.stop()

    assert answer.status_code == 200, answer.text
    assert told.seen == [
        "SELECT payments.id,",
        "UPDATE payments",
        "UPDATE invoices",
        "UPDATE orders",
        "COMMIT",
    ]
