"""The incident at volume: each payment's client callback and webhook(s), released together.

    RacePairs
        callback_and_webhook  (6)  the seed's race: the browser's callback and one webhook
        duplicate_webhook     (2)  at-least-once delivery: one event id twice, and the callback
        out_of_order          (2)  payment.captured overtakes payment.authorized; the callback
                                   races both

Run it with `payrace load` (which starts everything), or see README.md for Locust by hand.
"""

from __future__ import annotations

# Locust first: importing it lets gevent patch sockets, threads and time before anything else.
from locust import between, task

# isort: split
from _payrace import CAPTURE_EVENTS, PayraceUser, verify, webhook


class RacePairs(PayraceUser):
    wait_time = between(0.0, 0.01)  # a stream of payments: the races, not think time, matter

    @task(6)
    def callback_and_webhook(self) -> None:
        event = self.rng.choice(CAPTURE_EVENTS)
        self.race(self.new_payment(), verify(), webhook(event))

    @task(2)
    def duplicate_webhook(self) -> None:
        first = webhook("payment.captured")
        self.race(self.new_payment(), verify(), first, first.again())

    @task(2)
    def out_of_order(self) -> None:
        # The later event (authorized) arrives a few ms after the one that describes the
        # capture, as Razorpay allows; by then the capture may be mid-transaction.
        late = webhook("payment.authorized", delay_ms=self.rng.uniform(0.5, 5.0))
        self.race(self.new_payment(), webhook("payment.captured"), verify(), late)
