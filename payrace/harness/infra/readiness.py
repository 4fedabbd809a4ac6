"""Wait until something payrace started answers: one poll loop for servers and databases.

    wait_until_ready(probe)   call `probe` until it returns; it raises NotReady("what it saw")
                              meanwhile. Fails at once when `stopped()` says the thing is gone,
                              and past the timeout with what was seen last
    NotReady                  what a probe raises while the thing is not ready yet
    wait_until_answers()      the HTTP probe: GET a URL until it answers 200

Used by infra.processes (the service's /healthz), infra.provider (PostgreSQL: a query
answers) and gateway.server (the fake gateway's /_fake/counters).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import httpx

T = TypeVar("T")


class NotReady(Exception):
    """Not ready yet; the text is what the probe saw, for the timeout's message."""


def wait_until_ready(
    probe: Callable[[], T],
    *,
    timeout_s: float,
    timed_out: Callable[[str], Exception],
    stopped: Callable[[], str | None] = lambda: None,
    poll_s: float = 0.1,
    first_poll_s: float | None = None,
) -> T:
    """`probe()`'s first answer. `stopped()` says why the thing is gone (None while it runs):
    that is raised as a RuntimeError at once instead of waiting out the timeout. Past
    `timeout_s`, raises `timed_out(what was seen last)`. Polls every `poll_s`; with
    `first_poll_s`, the first pauses are that short and double up to `poll_s` (a thing that
    is up a few milliseconds after it was started is then not waited for a whole poll_s)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    pause = poll_s if first_poll_s is None else min(first_poll_s, poll_s)
    while True:
        reason = stopped()
        if reason is not None:
            raise RuntimeError(reason)
        try:
            return probe()
        except NotReady as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise timed_out(last)
        time.sleep(pause)
        pause = min(pause * 2, poll_s)


def wait_until_answers(
    url: str,
    path: str,
    *,
    timeout_s: float,
    stopped: Callable[[], str | None],
    what: str,
    hint: str,
    poll_s: float = 0.1,
    request_timeout_s: float = 2.0,
) -> None:
    """GET `url + path` until it answers 200 (first after 5 ms, then backing off to
    `poll_s`). On timeout, a TimeoutError names `what`, the last answer (or error) seen, and
    ends with `hint` (what to check)."""
    # A plain-HTTP probe needs no certificate store: loading it was most of the probe's cost.
    verify = url.startswith("https:")
    with httpx.Client(timeout=request_timeout_s, verify=verify) as client:

        def answers() -> None:
            try:
                response = client.get(f"{url}{path}")
            except httpx.HTTPError as exc:
                raise NotReady(f"{type(exc).__name__}: {exc}") from None
            if response.status_code != 200:
                raise NotReady(f"HTTP {response.status_code}: {response.text[:200]}")

        def timed_out(last: str) -> TimeoutError:
            return TimeoutError(
                f"{what} at {url} did not answer {path} within {timeout_s}s "
                f"(last seen: {last}); {hint}"
            )

        wait_until_ready(
            answers,
            timeout_s=timeout_s,
            timed_out=timed_out,
            stopped=stopped,
            poll_s=poll_s,
            first_poll_s=0.005,
        )
