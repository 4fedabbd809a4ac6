"""payrace/harness/infra/readiness.py: waiting until what payrace started answers."""

from __future__ import annotations

import time

import pytest

from payrace.harness.infra.processes import free_port
from payrace.harness.infra.readiness import NotReady, wait_until_answers, wait_until_ready


def test_wait_until_answers_returns_once_the_path_answers_200(gateway_url: str) -> None:
    wait_until_answers(
        gateway_url, "/_fake/counters", timeout_s=5, stopped=lambda: None, what="gw", hint="-"
    )


def test_wait_until_answers_says_why_the_server_is_gone_without_waiting() -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^it exited with code 3$"):
        wait_until_answers(
            f"http://127.0.0.1:{free_port()}",
            "/healthz",
            timeout_s=30,
            stopped=lambda: "it exited with code 3",
            what="thing",
            hint="-",
        )
    assert time.monotonic() - started < 5


def test_wait_until_answers_times_out_naming_the_last_answer_and_the_hint(
    gateway_url: str,
) -> None:
    with pytest.raises(TimeoutError) as info:
        wait_until_answers(
            gateway_url,
            "/no-such-path",
            timeout_s=0.3,
            stopped=lambda: None,
            what="fake gateway",
            hint="try a larger timeout",
        )
    message = str(info.value)
    assert message.startswith(f"fake gateway at {gateway_url} did not answer /no-such-path ")
    # The fake answers unknown paths as Razorpay does: 400 with an error body, shown in part.
    assert "within 0.3s (last seen: HTTP 400: {" in message and "not found" in message
    assert message.endswith("; try a larger timeout")


def test_wait_until_ready_returns_the_first_answer_and_times_out_with_the_last_sight() -> None:
    seen = iter(["starting", "recovering"])

    def probe() -> str:
        sight = next(seen, None)
        if sight is not None:
            raise NotReady(sight)
        return "up"

    def timed_out(last: str) -> LookupError:
        return LookupError(f"gave up; last seen: {last}")

    assert wait_until_ready(probe, timeout_s=5, timed_out=timed_out, poll_s=0.01) == "up"

    def never() -> str:
        raise NotReady("still starting")

    started = time.monotonic()
    with pytest.raises(LookupError, match=r"^gave up; last seen: still starting$"):
        wait_until_ready(never, timeout_s=0.2, timed_out=timed_out, poll_s=0.01)
    assert 0.2 <= time.monotonic() - started < 5
