"""harness/model/history.py: indexes, monotonic times, classification, JSONL, thread safety."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from payrace.harness.model.history import History, Operation, classify


def test_invoke_then_complete_records_two_ops_with_increasing_index_and_time() -> None:
    history = History()
    inv = history.invoke("verify", "client", 3, 41, {"gateway_payment_id": "pay_x"})
    done = history.complete(
        inv,
        "ok",
        value={"status": "captured", "idempotent": False},
        status=200,
        server={"lock": 1.5, "received_at_ns": 123},
    )
    assert (inv.index, done.index) == (0, 1)
    assert 0 <= inv.time <= done.time
    assert inv.type == "invoke" and inv.value == {"gateway_payment_id": "pay_x"}
    assert (done.f, done.process, done.trial, done.payment) == ("verify", "client", 3, 41)
    assert done.type == "ok" and done.status == 200
    assert done.value == {"status": "captured", "idempotent": False}
    assert done.server == {"lock": 1.5, "received_at_ns": 123}
    assert history.ops() == [inv, done] == list(history)
    assert len(history) == 2
    assert history.completions() == [done]


def test_completion_without_value_or_server_gets_empty_dicts_and_keeps_error() -> None:
    history = History()
    inv = history.invoke("webhook", "webhook-1", 0, None, {})
    done = history.complete(inv, "info", error="ConnectError: refused")
    assert done.value == {} and done.server == {}
    assert done.status is None and done.error == "ConnectError: refused"


def test_indexes_and_times_increase_over_many_ops() -> None:
    history = History()
    for n in range(200):
        history.invoke("verify", "client", n, n, {})
    ops = history.ops()
    assert [op.index for op in ops] == list(range(200))
    times = [op.time for op in ops]
    assert times == sorted(times)
    assert history.now() >= times[-1]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, "ok"),
        (201, "ok"),
        (299, "ok"),
        (400, "fail"),
        (404, "fail"),
        (409, "fail"),
        (499, "fail"),
        (500, "info"),
        (502, "info"),
        (503, "info"),
        (None, "info"),
        (302, "info"),
        (100, "info"),
    ],
)
def test_classify_maps_status_to_ok_fail_or_info(status: int | None, expected: str) -> None:
    assert classify(status) == expected


def test_jsonl_round_trip_gives_equal_ops(tmp_path: Path) -> None:
    history = History(strategy="for_update")
    inv = history.invoke(
        "webhook",
        "webhook-2",
        7,
        99,
        {"event": "payment.captured", "event_id": "evt_1", "gateway_payment_id": "pay_1"},
    )
    history.complete(
        inv,
        "ok",
        value={"status": "captured", "idempotent": True, "nested": {"a": [1, 2]}},
        status=200,
        server={"lock": 0.25, "hold": 3.0, "received_at_ns": 1_700_000_000_000_000_000},
    )
    inv2 = history.invoke("verify", "client", 7, 99, {"gateway_payment_id": "pay_1"})
    history.complete(inv2, "info", error="ReadTimeout: timed out")
    path = tmp_path / "history.jsonl"
    history.to_jsonl(path)

    assert len(path.read_text().splitlines()) == 4
    loaded = History.from_jsonl(path)
    assert loaded.ops() == history.ops()
    assert all(isinstance(op, Operation) for op in loaded)


def test_from_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    history = History()
    history.invoke("verify", "client", 0, 1, {})
    path = tmp_path / "h.jsonl"
    history.to_jsonl(path)
    path.write_text(path.read_text() + "\n\n")
    assert History.from_jsonl(path).ops() == history.ops()


def test_strategy_tag_is_stamped_on_every_op() -> None:
    tagged = History(strategy="naive")
    inv = tagged.invoke("verify", "client", 0, 1, {})
    done = tagged.complete(inv, "ok", status=200)
    assert inv.strategy == done.strategy == "naive"
    untagged = History()
    assert untagged.invoke("verify", "client", 0, 1, {}).strategy is None


def test_many_threads_appending_get_unique_contiguous_indexes() -> None:
    history = History()
    threads_n, per_thread = 16, 250
    barrier = threading.Barrier(threads_n)

    def work(worker: int) -> None:
        barrier.wait()
        for n in range(per_thread):
            inv = history.invoke("verify", f"client-{worker}", n, worker, {})
            history.complete(inv, "ok", status=200)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    ops = history.ops()
    total = threads_n * per_thread * 2
    assert len(ops) == total
    # Appended in index order, and each index exactly once.
    assert [op.index for op in ops] == list(range(total))
    # Times follow index order even across threads: both are taken under one lock.
    times = [op.time for op in ops]
    assert times == sorted(times)
    for worker in range(threads_n):
        mine = [op for op in ops if op.process == f"client-{worker}"]
        assert [op.type for op in mine] == ["invoke", "ok"] * per_thread
