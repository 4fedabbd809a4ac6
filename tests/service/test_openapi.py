"""payrace/service/openapi.py: the document describes the service, and the service keeps it.

schemathesis generates requests from the service's own OpenAPI document and sends them to the
reference service running under uvicorn (real HTTP, real PostgreSQL, the fake gateway). Bounded:
a few dozen examples per operation, well under 30 s. Webhook bodies are signed with the real
secret, so generated envelopes reach the parser and the capture path instead of stopping at the
signature. Not one answer may be a server error, and each must match the documented responses.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.processes import ServiceProcess, service_env
from payrace.harness.infra.provider import Database
from payrace.service.openapi import ERRORS, WEBHOOK_DOC, add_components, errors

KEYS = GatewayKeys()
EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def service_url(pg: Database, gateway_url: str) -> Iterator[str]:
    env = {**service_env(pg, gateway_url, "for_update", keys=KEYS), "RECONCILE_INTERVAL_S": "0"}
    with ServiceProcess(env) as svc:
        yield svc.url


def test_errors_document_the_one_error_shape_and_retry_after() -> None:
    documented = errors(400, 503)
    assert set(documented) == {400, 503}
    assert documented[400]["description"] == ERRORS[400]
    assert "headers" not in documented[400]
    assert "Retry-After" in documented[503]["headers"]


def test_add_components_resolves_every_reference() -> None:
    document = add_components({"paths": {"/hook": {"post": WEBHOOK_DOC}}})
    text = json.dumps(document)
    schemas = document["components"]["schemas"]
    refs = set(re.findall(r'"#/components/schemas/([A-Za-z]+)"', text))

    assert refs >= {"ErrorDetail", "WebhookEnvelope", "WebhookPayload", "PaymentEntity"}
    assert refs <= set(schemas)  # every reference resolves
    assert "ErrorBody" in schemas
    assert "$defs" not in text


def _send(case: Any, base_url: str) -> httpx.Response:
    kwargs = case.as_transport_kwargs(base_url=base_url)
    headers = dict(kwargs.get("headers") or {})
    if case.path == "/webhooks/razorpay" and "json" in kwargs:
        # Sign what is sent, as Razorpay would: the body then reaches the parser.
        raw = json.dumps(kwargs.pop("json")).encode()
        headers["X-Razorpay-Signature"] = hmac.new(
            KEYS.webhook_secret.encode(), raw, hashlib.sha256
        ).hexdigest()
        headers["Content-Type"] = "application/json"
        kwargs["content"] = raw
    kwargs["headers"] = headers
    method = kwargs.pop("method")
    url = kwargs.pop("url")
    kwargs = {k: v for k, v in kwargs.items() if k in ("params", "json", "content", "headers")}
    return httpx.request(method, url, timeout=10, **kwargs)


def exercise(operation: Any, base_url: str, failures: list[str], sent: list[int]) -> Any:
    """A hypothesis test of one operation: its generated cases sent, their answers checked."""

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        response = _send(case, base_url)
        sent.append(response.status_code)
        try:
            case.validate_response(
                response,
                checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
            )
        except Exception as exc:  # collected: every operation runs, all failures listed
            failures.append(f"{operation.method.upper()} {case.path}: {exc}")

    return run


@pytest.mark.slow
def test_generated_requests_never_get_a_server_error_or_an_undocumented_status(
    service_url: str,
) -> None:
    schema = schemathesis.openapi.from_url(f"{service_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/orders",
        "/payments/verify",
        "/webhooks/razorpay",
        "/payments/{payment_id}",
        "/healthz",
    }
    failures: list[str] = []
    sent: list[int] = []  # the status of every answer
    started = time.monotonic()
    for operation in operations:
        exercise(operation, service_url, failures, sent)()
    elapsed = time.monotonic() - started

    assert failures == [], "\n\n".join(failures[:5])
    assert len(sent) >= 2 * len(operations)  # cases were really sent
    assert 500 not in sent
    assert elapsed < 60  # bounded; typically well under 30 s


@pytest.mark.slow
@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(
    raw=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=20,
    )
)
def test_any_signed_json_is_never_a_server_error(service_url: str, raw: Any) -> None:
    body = json.dumps(raw).encode()
    signature = hmac.new(KEYS.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
    response = httpx.post(
        f"{service_url}/webhooks/razorpay",
        content=body,
        headers={"X-Razorpay-Signature": signature, "Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code in (200, 400, 404), response.text
    assert "error" in response.json() or "ignored" in response.json()
