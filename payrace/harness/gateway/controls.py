"""What the harness asks of the fake gateway, wherever it runs.

    GatewayControl   authorize a payment at Checkout, read the capture counters, turn the
                     fault knobs (gateway.fake.Knobs names them and checks their values), hold
                     and release capture calls (the barrier of runner.forcing)
    ├── LocalGateway     a FakeRazorpay in this process
    └── RemoteGateway    a fake gateway in another process (`payrace gateway`), over its
                         /_fake routes (gateway.server)

Used by the runner (authorize, counters, holds) and the nemesis (knobs). Light on purpose: no web
framework, only the fake's state module and httpx.
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import quote

import httpx

from payrace.harness.gateway.fake import FakeRazorpay


class GatewayControl(Protocol):
    def create_order(self, amount: int, currency: str) -> dict[str, Any]: ...

    def authorize(self, gateway_order_id: str) -> dict[str, Any]: ...

    def counters(self) -> dict[str, dict[str, int]]: ...

    def auto_capture(self, payment_id: str) -> dict[str, Any]:
        """The gateway captures on its own, as before its payment.captured webhook."""
        ...

    def knobs(self) -> dict[str, float]: ...

    def set_knobs(self, **changes: float | None) -> dict[str, float]:
        """Change the named knobs (None leaves one as it is); the knobs now."""
        ...

    def arm_holds(self, payment_id: str, timeout_s: float) -> None:
        """Hold capture calls for this gateway payment id until released (or timeout_s)."""
        ...

    def release_holds(self, payment_id: str) -> int:
        """Let the calls held for it go on, still armed; how many were held."""
        ...

    def disarm_holds(self, payment_id: str) -> int:
        """Stop holding its calls and release those held; how many were held."""
        ...

    def holds(self) -> dict[str, int]:
        """Armed gateway payment ids -> capture calls held right now."""
        ...


class LocalGateway:
    def __init__(self, fake: FakeRazorpay) -> None:
        self.fake = fake

    def create_order(self, amount: int, currency: str) -> dict[str, Any]:
        return self.fake.create_order({"amount": amount, "currency": currency})

    def authorize(self, gateway_order_id: str) -> dict[str, Any]:
        return self.fake.authorize_payment(gateway_order_id)

    def counters(self) -> dict[str, dict[str, int]]:
        return self.fake.counters()

    def auto_capture(self, payment_id: str) -> dict[str, Any]:
        return self.fake.auto_capture(payment_id)

    def knobs(self) -> dict[str, float]:
        return self.fake.knobs()

    def set_knobs(self, **changes: float | None) -> dict[str, float]:
        return self.fake.set_knobs(**changes)

    def arm_holds(self, payment_id: str, timeout_s: float) -> None:
        self.fake.arm_holds(payment_id, timeout_s)

    def release_holds(self, payment_id: str) -> int:
        return self.fake.release_holds(payment_id)

    def disarm_holds(self, payment_id: str) -> int:
        return self.fake.disarm_holds(payment_id)

    def holds(self) -> dict[str, int]:
        return self.fake.holds()


class RemoteGateway:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=10.0)

    def _json(self, response: httpx.Response) -> Any:
        response.raise_for_status()
        return response.json()

    def create_order(self, amount: int, currency: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._json(
            self.http.post("/_fake/orders", json={"amount": amount, "currency": currency})
        )
        return doc

    def authorize(self, gateway_order_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._json(
            self.http.post("/_fake/payments", json={"order_id": gateway_order_id})
        )
        return doc

    def auto_capture(self, payment_id: str) -> dict[str, Any]:
        path = f"/_fake/payments/{quote(payment_id)}/auto_capture"
        doc: dict[str, Any] = self._json(self.http.post(path))
        return doc

    def counters(self) -> dict[str, dict[str, int]]:
        doc: dict[str, dict[str, int]] = self._json(self.http.get("/_fake/counters"))
        return doc

    def knobs(self) -> dict[str, float]:
        doc: dict[str, float] = self._json(self.http.get("/_fake/knobs"))
        return doc

    def set_knobs(self, **changes: float | None) -> dict[str, float]:
        # JSON null reaches Knobs.changed as None: "leave it", as in this process.
        doc: dict[str, float] = self._json(self.http.post("/_fake/knobs", json=changes))
        return doc

    def arm_holds(self, payment_id: str, timeout_s: float) -> None:
        body = {"payment_id": payment_id, "timeout_s": timeout_s}
        self._json(self.http.post("/_fake/holds", json=body))

    def release_holds(self, payment_id: str) -> int:
        return int(
            self._json(self.http.post(f"/_fake/holds/{quote(payment_id)}/release"))["released"]
        )

    def disarm_holds(self, payment_id: str) -> int:
        return int(self._json(self.http.delete(f"/_fake/holds/{quote(payment_id)}"))["released"])

    def holds(self) -> dict[str, int]:
        doc: dict[str, int] = self._json(self.http.get("/_fake/holds"))
        return doc

    def close(self) -> None:
        self.http.close()
