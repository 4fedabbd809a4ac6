"""At-least-once delivery as Razorpay does it: many webhooks about one payment, any order.

    WebhookStorm
        storm   payment.authorized, payment.captured and order.paid (sometimes payment.failed
                too, which Razorpay documents as normal before a capture), each delivered one
                to three times with the same event id, shuffled, most released together and
                some a few milliseconds late; the browser never calls back

Exactly one capture must come out of every storm, whatever order the events land in.
"""

from __future__ import annotations

# Locust first: importing it lets gevent patch sockets, threads and time before anything else.
from locust import between, task

# isort: split
from _payrace import Delivery, PayraceUser, webhook

EVENTS = ("payment.authorized", "payment.captured", "order.paid")


class WebhookStorm(PayraceUser):
    wait_time = between(0.0, 0.01)

    def _late(self) -> float:
        return self.rng.uniform(0.5, 20.0) if self.rng.random() < 0.3 else 0.0

    @task
    def storm(self) -> None:
        events = list(EVENTS)
        if self.rng.random() < 0.15:
            events.append("payment.failed")
        deliveries: list[Delivery] = []
        for event in events:
            first = webhook(event, delay_ms=self._late())
            deliveries.append(first)
            deliveries += [first.again(self._late()) for _ in range(self.rng.choice((0, 0, 1, 2)))]
        self.rng.shuffle(deliveries)
        self.race(self.new_payment(), *deliveries)
