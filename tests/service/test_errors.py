"""service/errors.py: every error leaves as `{"error": {"code", "message"}}` with its status."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from payrace.service.errors import (
    ApiError,
    GatewayFailed,
    NotFound,
    Rejected,
    RetryLater,
    error_response,
    install_handlers,
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
