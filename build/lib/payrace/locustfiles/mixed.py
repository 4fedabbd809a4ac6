"""A realistic mix: shoppers who abandon checkout, look up their payments, and pay.

    Shopper
        check_status        (8)  GET /payments/{id} of one of their recent payments
        abandon_checkout    (4)  POST /orders, then nothing: the customer closes the tab
        pay                 (3)  the race: client callback and one webhook, released together
        fail_then_capture   (1)  payment.failed, then payment.captured a moment later (Razorpay
                                 documents this as normal), the callback racing the capture

Think time between tasks keeps the capture rate a fraction of the request rate, as in a shop.
"""

from __future__ import annotations

# Locust first: importing it lets gevent patch sockets, threads and time before anything else.
from locust import between, task

# isort: split
from _payrace import CAPTURE_EVENTS, PayraceUser, verify, webhook


class Shopper(PayraceUser):
    wait_time = between(0.05, 0.5)

    @task(8)
    def check_status(self) -> None:
        if not self.recent:
            self.new_payment(pay=False)
            return
        self.read_payment(self.rng.choice(self.recent))

    @task(4)
    def abandon_checkout(self) -> None:
        self.new_payment(pay=False)

    @task(3)
    def pay(self) -> None:
        self.race(self.new_payment(), verify(), webhook(self.rng.choice(CAPTURE_EVENTS)))

    @task(1)
    def fail_then_capture(self) -> None:
        later = self.rng.uniform(1.0, 10.0)
        self.race(
            self.new_payment(),
            webhook("payment.failed"),
            webhook("payment.captured", delay_ms=later),
            verify(delay_ms=later),
        )
