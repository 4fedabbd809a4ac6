"""Test-only instrumentation of the reference service: inert unless a harness enables it.

    probes       pause points: named places in the capture path where a controller may hold a
                 request; `pause()` is a no-op until a controller is installed (in-process by
                 the harness, or over HTTP by the middleware with PAYRACE_PROBES on)
    timing       per-request lock wait, lock hold, database and gateway times, rendered as the
                 W3C Server-Timing header (and parsed back by the harness and the locustfiles)
    middleware   the ASGI middleware that adds Server-Timing / X-Payrace-Received-At to every
                 answer and, only with PAYRACE_PROBES on, honours X-Payrace-Pause

`timing` imports nothing beyond the standard library and `probes`, so a Locust process can
parse Server-Timing without loading the service.
"""
