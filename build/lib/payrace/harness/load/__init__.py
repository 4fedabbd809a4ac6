"""Load: Locust around the stack (launch) and the gate inside Locust's processes (gate:
light and gevent-safe, it runs in every Locust process)."""
