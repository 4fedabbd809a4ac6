"""service/errors.py: every error leaves as `{"error": {"code", "message"}}` with its status."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
import pytest
from asyncpg.exceptions import (
    CannotConnectNowError,
    ConnectionDoesNotExistError,
    InterfaceError,
    InternalClientError,
    LockNotAvailableError,
    QueryCanceledError,
    UniqueViolationError,
)
from conftest import Service, service_settings
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from service_calls import KEYS
from sqlalchemy.exc import DBAPIError

from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.signing import client_callback, signed_webhook, webhook_event
from payrace.harness.infra.provider import Database, provide_postgres
from payrace.service.errors import (
    ApiError,
    GatewayFailed,
    NotFound,
    Rejected,
    RetryLater,
    connection_lost,
    error_response,
    install_handlers,
    timed_out,
)


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: int = Field(gt=0)
    note: str


def build_app() -> FastAPI:
    app = FastAPI()
    install_handlers(app)

    @app.get("/raise/{kind}")
    async def raise_(kind: str) -> None:
        errors: dict[str, ApiError] = {
            "not_found": NotFound("payment 7 does not exist"),
            "rejected": Rejected("amount 1 does not match", code="amount_mismatch"),
            "retry": RetryLater("try again", sqlstate="40001"),
            "gateway": GatewayFailed("gateway unavailable: ServerError"),
            "plain": ApiError("bad"),
        }
        if kind == "boom":
            raise RuntimeError("secret internals")
        raise errors[kind]

    @app.post("/items")
    async def items(item: Item) -> Item:
        return item

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # Starlette re-raises an unhandled exception after sending the 500; the client should see
    # the response, as a real HTTP client would.
    transport = httpx.ASGITransport(app=build_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://errors") as c:
        yield c


@pytest.mark.parametrize(
    ("kind", "status", "body"),
    [
        ("not_found", 404, {"code": "not_found", "message": "payment 7 does not exist"}),
        ("rejected", 400, {"code": "amount_mismatch", "message": "amount 1 does not match"}),
        ("retry", 409, {"code": "retry_later", "message": "try again", "sqlstate": "40001"}),
        ("gateway", 502, {"code": "gateway_error", "message": "gateway unavailable: ServerError"}),
        ("plain", 400, {"code": "bad_request", "message": "bad"}),
    ],
)
async def test_api_errors_answer_with_their_status_code_and_message(
    client: httpx.AsyncClient, kind: str, status: int, body: dict[str, str]
) -> None:
    response = await client.get(f"/raise/{kind}")

    assert response.status_code == status
    assert response.json() == {"error": body}


async def test_only_retry_later_tells_the_client_when_to_retry(client: httpx.AsyncClient) -> None:
    assert (await client.get("/raise/retry")).headers["retry-after"] == "1"
    assert "retry-after" not in (await client.get("/raise/rejected")).headers


def test_a_code_given_to_one_error_does_not_change_its_class() -> None:
    assert Rejected("x", code="order_mismatch").code == "order_mismatch"
    assert Rejected("y").code == "rejected"
    assert Rejected.code == "rejected"


async def test_validation_errors_are_422_naming_each_field(client: httpx.AsyncClient) -> None:
    response = await client.post("/items", json={"amount": -1, "extra": True})

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert [f["field"] for f in error["fields"]] == ["amount", "note", "extra"]
    assert error["message"].startswith("amount: ")
    assert "note: Field required" in error["message"]


async def test_a_body_that_is_not_json_is_a_422_about_the_body(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/items", content=b"{", headers={"content-type": "application/json"}
    )

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    assert response.json()["error"]["fields"] == [{"field": "body", "problem": "JSON decode error"}]


async def test_a_bad_path_parameter_names_the_parameter(client: httpx.AsyncClient) -> None:
    response = await client.get("/items/seven")

    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "item_id"


async def test_unknown_routes_and_methods_answer_in_the_same_shape(
    client: httpx.AsyncClient,
) -> None:
    missing = await client.get("/nowhere")
    wrong_method = await client.delete("/items")

    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "not_found", "message": "Not Found"}}
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    # RFC 9110: a 405 names the methods the resource does answer.
    assert wrong_method.headers["allow"] == "POST"


async def test_an_unexpected_exception_is_a_500_that_hides_its_details(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    response = await client.get("/raise/boom")

    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "secret internals" not in response.text
    assert any(r.name == "service" and r.exc_info for r in caplog.records)


def test_error_response_builds_the_shape_with_extras() -> None:
    response = error_response(418, "teapot", "short and stout", field="spout")

    assert response.status_code == 418
    assert (
        response.body == b'{"error":{"code":"teapot","message":"short and stout","field":"spout"}}'
    )


# -- a database outage: 503 with Retry-After for as long as it lasts, never a 500 --------------


def _raised_by_the_driver(exc: BaseException) -> BaseException:
    """`exc` raised from inside a real asyncpg connect attempt, as a refused connect is."""
    import asyncpg

    async def connect() -> None:
        await asyncpg.connect("postgresql://postgres@127.0.0.1:1/postgres", timeout=2)

    try:
        asyncio.run(connect())
    except OSError as real:
        return real
    raise AssertionError("port 1 on loopback answered")


@pytest.mark.parametrize(
    "exc",
    [
        CannotConnectNowError("the database system is starting up"),
        ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        InterfaceError("cannot call Connection.fetch(): connection is closed"),
        # A pool's connection asyncpg took back as its backend went away (sql.Database).
        InterfaceError(
            "cannot call Connection.fetchval(): connection has been released back to the pool"
        ),
        # A backend killed during a new connection's first statement (kill-backends:0.01).
        InternalClientError("cannot switch to state 11; another operation (2) is in progress"),
    ],
    ids=[
        "starting-up",
        "closed-mid-statement",
        "closed",
        "released-as-it-closed",
        "killed-during-first-statement",
    ],
)
def test_what_a_dead_or_restarting_server_raises_counts_as_a_lost_connection(
    exc: BaseException,
) -> None:
    assert connection_lost(exc)
    assert connection_lost(DBAPIError("SELECT 1", None, exc))  # type: ignore[arg-type]


def test_a_refused_connect_from_the_driver_is_lost_but_an_oserror_elsewhere_is_not() -> None:
    refused = _raised_by_the_driver(ConnectionRefusedError())
    assert isinstance(refused, OSError)
    assert connection_lost(refused)
    try:
        Path("/nonexistent/payrace").read_text()
    except FileNotFoundError as elsewhere:
        assert not connection_lost(elsewhere)


@pytest.mark.parametrize(
    "exc",
    [
        UniqueViolationError("duplicate key"),
        InterfaceError("cannot perform operation: another operation is in progress"),
        ValueError("bad"),
    ],
)
def test_statement_errors_and_bugs_are_not_lost_connections(exc: BaseException) -> None:
    assert not connection_lost(exc)
    assert not connection_lost(DBAPIError("SELECT 1", None, exc))  # type: ignore[arg-type]


class OwnCluster:
    """pg_ctl on a throwaway embedded cluster this module owns. As root, pgserver runs the
    server as its own `pgserver` user, and pg_ctl refuses root: run it as that user too."""

    def __init__(self, database: Database) -> None:
        self.url = database.url
        with psycopg.connect(self.url) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
        assert row is not None
        self.pgdata = Path(row[0])
        self.socket_dir = parse_qs(urlsplit(self.url).query)["host"][0]
        from pgserver._commands import POSTGRES_BIN_PATH

        self.pg_ctl = str(POSTGRES_BIN_PATH / "pg_ctl")
        self.user = "pgserver" if os.geteuid() == 0 else None

    def _run(self, *args: str) -> None:
        command = [self.pg_ctl, "-D", str(self.pgdata), "-w", *args]
        subprocess.run(command, user=self.user, check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        self._run("-m", "fast", "stop")

    def start(self) -> None:
        # The options pgserver started it with: no TCP, the same Unix socket directory.
        log = str(self.pgdata / "log")
        self._run("-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", log, "start")


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[tuple[Database, OwnCluster]]:
    with provide_postgres(prefer="embedded") as database:
        cluster = OwnCluster(database)
        try:
            yield database, cluster
        finally:
            cluster.start() if not _answers(database.url) else None


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


async def _every_route(
    svc: Service, order: dict[str, Any], payment: dict[str, Any]
) -> list[httpx.Response]:
    """One request to each database route, as a client would send during the outage."""
    gateway_order = order["gateway_order_id"]
    callback = client_callback(gateway_order, payment["id"], KEYS.key_secret)
    body, headers = signed_webhook(webhook_event("payment.captured", payment), KEYS.webhook_secret)
    return [
        await svc.client.get("/healthz"),
        await svc.client.get(f"/payments/{order['payment_id']}"),
        await svc.client.post("/orders", json={"amount": 50000, "currency": "INR"}),
        await svc.client.post(
            "/payments/verify", json={**callback, "internal_payment_id": order["payment_id"]}
        ),
        await svc.client.post("/webhooks/razorpay", content=body, headers=headers),
    ]


@pytest.mark.slow
async def test_every_route_answers_503_with_retry_after_while_postgres_is_down_then_recovers(
    own_cluster: tuple[Database, OwnCluster], gateway_url: str, fake_gateway: FakeRazorpay
) -> None:
    database, cluster = own_cluster
    async with Service(service_settings(database, gateway_url, reconcile_interval_s=0)) as svc:
        orders = []
        for _ in range(3):  # the pool holds live connections when the server goes away
            created = await svc.client.post("/orders", json={"amount": 50000, "currency": "INR"})
            assert created.status_code == 201, created.text
            orders.append(created.json())
        paid = [(o, fake_gateway.authorize_payment(o["gateway_order_id"])) for o in orders]
        await asyncio.to_thread(cluster.stop)
        try:
            # Several rounds: the first meets the pool's stale connections, the later ones
            # new connections to a server that is not there (FileNotFoundError on the socket).
            down = [r for _ in range(3) for r in await _every_route(svc, *paid[0])]
        finally:
            await asyncio.to_thread(cluster.start)
        up = await _every_route(svc, *paid[1])

    assert [r.status_code for r in down] == [503] * len(down), [r.text for r in down]
    for response in down:
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "database_unavailable"
    assert [r.status_code for r in up] == [200, 200, 201, 200, 200], [r.text for r in up]


@pytest.mark.slow
async def test_requests_during_a_restart_are_503_or_answered_never_500(
    own_cluster: tuple[Database, OwnCluster], gateway_url: str, fake_gateway: FakeRazorpay
) -> None:
    database, cluster = own_cluster
    statuses: list[int] = []
    async with Service(service_settings(database, gateway_url, reconcile_interval_s=0)) as svc:
        created = await svc.client.post("/orders", json={"amount": 50000, "currency": "INR"})
        assert created.status_code == 201, created.text
        order = created.json()
        payment = fake_gateway.authorize_payment(order["gateway_order_id"])
        restarting = asyncio.create_task(
            asyncio.to_thread(lambda: (cluster.stop(), cluster.start()))
        )
        while not restarting.done():  # bounded by pg_ctl's own timeout
            statuses += [r.status_code for r in await _every_route(svc, order, payment)]
        await restarting
        after = await _every_route(svc, order, payment)

    assert statuses
    assert set(statuses) <= {200, 201, 503}, statuses
    assert 503 in statuses
    assert [r.status_code for r in after] == [200, 200, 201, 200, 200], [r.text for r in after]


@pytest.mark.parametrize(
    ("exc", "timeout"),
    [
        (LockNotAvailableError("canceling statement due to lock timeout"), "lock_timeout"),
        (QueryCanceledError("canceling statement due to statement timeout"), "statement_timeout"),
        (UniqueViolationError("duplicate key"), None),
    ],
)
def test_a_statement_the_databases_timeouts_cancelled_is_named(
    exc: BaseException, timeout: str | None
) -> None:
    assert timed_out(DBAPIError("SELECT 1", None, exc)) == timeout  # type: ignore[arg-type]
    assert not connection_lost(DBAPIError("SELECT 1", None, exc))  # type: ignore[arg-type]
    # The capture path's own (asyncpg directly, payrace.service.sql): the same answers.
    assert timed_out(exc) == timeout
    assert not connection_lost(exc)


async def test_a_lock_timeout_is_a_retryable_409_that_wrote_nothing(
    pg: Database, gateway_url: str, fake_gateway: FakeRazorpay
) -> None:
    """The lock-timeout nemesis (the target database's lock_timeout): a capture that waits
    longer for the payment's lock was a 500; the capture path retries it, then answers a
    retryable 409 naming the timeout, nothing written, and the retry after the lock is free
    captures."""
    with provide_postgres(pg.url) as database:
        with psycopg.connect(database.url, autocommit=True) as admin:
            name = admin.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
            admin.execute(f'ALTER DATABASE "{name}" SET lock_timeout = 100')
        settings = service_settings(database, gateway_url, reconcile_interval_s=0)
        async with Service(settings) as svc:
            order = (await svc.client.post("/orders", json={"amount": 50000})).json()
            payment = fake_gateway.authorize_payment(order["gateway_order_id"])
            with psycopg.connect(database.url) as holder:
                holder.execute(
                    "SELECT 1 FROM payments WHERE id = %s FOR UPDATE", (order["payment_id"],)
                )
                body = client_callback(order["gateway_order_id"], payment["id"], KEYS.key_secret)
                body["internal_payment_id"] = order["payment_id"]
                held = await svc.client.post("/payments/verify", json=body)
                holder.rollback()
            after = await svc.client.post("/payments/verify", json=body)
    assert held.status_code == 409, held.text
    assert held.headers["retry-after"] == "1"
    error = held.json()["error"]
    assert error["code"] == "retry_later" and "lock_timeout" in error["message"]
    assert fake_gateway.counters()["captures"].get(payment["id"], 0) == 1  # the retry's only
    assert after.status_code == 200 and after.json()["status"] == "captured", after.text
