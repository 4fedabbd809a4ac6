"""The reconciler: a capture the gateway accepted ends captured here, webhook or not.

    reconcile_once(runner, older_than_s)   one sweep; what tests and operators call
    Sweeper                                runs reconcile_once every RECONCILE_INTERVAL_S in
                                           the service's lifespan (payrace.service.app)
    SweepReport                            what one sweep looked at and did

Every capture the service asks of the gateway first commits a capture intent
(payrace.service.command.record_intent). If the gateway accepts but the answer is lost before
COMMIT (the backend was killed three times, the process died), the payment stays `pending`;
Razorpay's `payment.captured` webhook would record it, but webhooks can be missed (disabled,
failing endpoint past Razorpay's 24 hours of retries). Razorpay's guidance for that case is to
poll: fetch the payment (`GET /v1/payments/{id}`) and act on its status. A sweep does that for
each intent older than `older_than_s` whose payment is still not captured and, when the
gateway says `captured`, records the capture through the same strategy code path as a
`payment.captured` webhook (capture_at_gateway=False): the payment lock and the status check
after it apply, so a sweep racing a late webhook or callback updates the invoice once.
Intents of captured payments are dropped; those the gateway never captured stay until
RECONCILE_MAX_AGE_S (Razorpay's own webhook retry window), so a capture the gateway reports
late is still recorded.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from payrace.service.capture import Runner, capture
from payrace.service.command import CaptureCommand
from payrace.service.errors import ApiError, connection_lost
from payrace.service.gateway_client import GatewayError
from payrace.service.sql import Database

log = logging.getLogger("service.reconcile")

RECONCILE_MAX_AGE_S = 24 * 3600
BATCH = 200  # intents per sweep; the next sweep takes the rest


@dataclass
class SweepReport:
    checked: int = 0  # intents asked about at the gateway
    captured: list[int] = field(default_factory=list)  # payments this sweep recorded captured
    not_captured: int = 0  # the gateway has not captured them (yet)
    errors: list[str] = field(default_factory=list)  # gateway unreachable, a mismatch ...


async def reconcile_once(
    runner: Runner,
    *,
    older_than_s: float,
    max_age_s: float = RECONCILE_MAX_AGE_S,
    bookkeeping: Database | None = None,
) -> SweepReport:
    """One sweep. `bookkeeping` is where the intents are read and dropped (default: the
    runner's intents pool); a capture it records goes through the runner's capture pool."""
    report = SweepReport()
    bookkeeping = bookkeeping or runner.intents or runner.db
    due = await bookkeeping.fetch(_DUE, float(older_than_s), BATCH)
    for payment_id, gateway_payment_id in due:
        report.checked += 1
        try:
            at_gateway = await runner.gateway.fetch_payment(gateway_payment_id)
        except GatewayError as exc:
            report.errors.append(f"payment {payment_id}: {exc}")
            continue
        if at_gateway.get("status") != "captured":
            report.not_captured += 1
            continue
        cmd = CaptureCommand(
            source="reconcile",
            payment_id=payment_id,
            gateway_order_id=str(at_gateway.get("order_id")),
            gateway_payment_id=gateway_payment_id,
            capture_at_gateway=False,
            amount=at_gateway.get("amount"),
            currency=at_gateway.get("currency"),
            method=at_gateway.get("method"),
        )
        try:
            result = await capture(runner, cmd)
        except ApiError as exc:  # the gateway's payment does not match this one: say so
            report.errors.append(f"payment {payment_id}: {exc.code}: {exc.message}")
            continue
        if not result.idempotent:
            report.captured.append(payment_id)
            log.warning(
                "reconciled payment %s: captured at the gateway as %s, no callback recorded it",
                payment_id,
                gateway_payment_id,
            )
    # Done with: captured (by this sweep or any callback), or past Razorpay's retry window.
    await bookkeeping.execute(_DONE, float(max_age_s))
    return report


_DUE = """
SELECT capture_intents.payment_id, capture_intents.gateway_payment_id
  FROM capture_intents JOIN payments ON payments.id = capture_intents.payment_id
 WHERE payments.status <> 'captured'
   AND capture_intents.created_at < now() - make_interval(secs => $1)
 ORDER BY capture_intents.created_at
 LIMIT $2"""
_DONE = """
DELETE FROM capture_intents USING payments
 WHERE capture_intents.payment_id = payments.id
   AND (payments.status = 'captured'
        OR capture_intents.created_at < now() - make_interval(secs => $1))"""


class Sweeper:
    """reconcile_once every `interval_s`, for the life of the service; a sweep that fails
    (the database is down) is logged and the next one tries again."""

    def __init__(
        self,
        runner: Runner,
        *,
        interval_s: float,
        older_than_s: float,
        bookkeeping: Database | None = None,
    ) -> None:
        self.runner = runner
        self.interval_s = interval_s
        self.older_than_s = older_than_s
        self.bookkeeping = bookkeeping
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="payrace-reconcile")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await reconcile_once(
                    self.runner, older_than_s=self.older_than_s, bookkeeping=self.bookkeeping
                )
            except Exception as exc:
                if not connection_lost(exc):
                    log.exception("reconcile sweep failed", exc_info=exc)
                else:
                    log.info("reconcile sweep skipped: database unavailable (%s)", exc)
