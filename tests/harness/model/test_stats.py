"""payrace.harness.model.stats: HDR latency histograms, their encoding, merging and plot data."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from payrace.harness.model.stats import HIGHEST_US, LatencyHistogram, PathHistograms

# 3 significant digits: a reported value is within 0.1 % (plus one recorded microsecond
# of rounding) of the exact one.
REL = 1e-3
ABS_MS = 0.002


def exact_percentile(sorted_values: list[float], p: float) -> float:
    """HdrHistogram's definition: the smallest value with at least p % of values <= it."""
    rank = max(1, int(p / 100 * len(sorted_values) + 0.5))
    return sorted_values[rank - 1]


def recorded(values: list[float]) -> LatencyHistogram:
    hist = LatencyHistogram()
    for v in values:
        hist.record_ms(v)
    return hist


def test_uniform_one_to_thousand_ms_gives_textbook_percentiles() -> None:
    hist = recorded([float(ms) for ms in range(1, 1001)])
    s = hist.summary()
    assert s["count"] == 1000
    assert s["p50"] == pytest.approx(500, rel=REL)
    assert s["p95"] == pytest.approx(950, rel=REL)
    assert s["p99"] == pytest.approx(990, rel=REL)
    assert s["max"] == pytest.approx(1000, rel=REL)
    assert s["mean"] == pytest.approx(500.5, rel=REL)


def test_heavy_tailed_percentiles_match_exact_ones_within_hdr_precision() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(0.0, 1.5) for _ in range(20_000)]
    s = recorded(values).summary()
    ordered = sorted(values)
    for key, p in (("p50", 50.0), ("p95", 95.0), ("p99", 99.0)):
        assert s[key] == pytest.approx(exact_percentile(ordered, p), rel=REL, abs=ABS_MS)
    assert s["max"] == pytest.approx(ordered[-1], rel=REL, abs=ABS_MS)
    assert s["mean"] == pytest.approx(sum(values) / len(values), rel=REL, abs=ABS_MS)


def test_summary_is_rounded_to_microseconds() -> None:
    s = recorded([0.1234567]).summary()
    assert s["p50"] == 0.123
    assert s["max"] == 0.123


def test_empty_summary_is_null_not_zero_and_plots_are_empty() -> None:
    """Nothing measured is null: a p50 of 0 would read as perfect alignment or no wait."""
    hist = LatencyHistogram()
    assert hist.count == 0
    assert hist.summary() == {
        "count": 0,
        "mean": None,
        "p50": None,
        "p95": None,
        "p99": None,
        "max": None,
    }
    assert hist.cdf() == []
    assert hist.buckets() == []


@pytest.mark.parametrize("bad", [-0.001, -5.0, math.nan])
def test_negative_or_nan_latency_is_rejected(bad: float) -> None:
    hist = LatencyHistogram()
    with pytest.raises(ValueError):
        hist.record_ms(bad)
    assert hist.count == 0


def test_values_past_one_hour_are_clamped_counted_and_still_in_the_tail() -> None:
    hist = recorded([1.0, 3_600_000.0, 7_200_000.0, math.inf])
    assert hist.clamped == 2  # exactly one hour is in range
    assert hist.count == 4
    assert hist.summary()["max"] == HIGHEST_US / 1000


def test_zero_is_a_valid_latency() -> None:
    hist = recorded([0.0, 0.0, 0.0004])
    assert hist.summary()["max"] == 0.0
    assert hist.count == 3


def test_encode_decode_round_trip_is_equal() -> None:
    rng = random.Random(3)
    hist = recorded([rng.expovariate(0.5) for _ in range(5_000)] + [9e9])
    text = hist.encode()
    assert isinstance(text, str)
    assert text.isascii() and "\n" not in text
    back = LatencyHistogram.decode(text)
    assert back == hist
    assert back.clamped == 1
    assert back.summary() == hist.summary()
    assert back != recorded([1.0])


def test_empty_histogram_round_trips() -> None:
    assert LatencyHistogram.decode(LatencyHistogram().encode()) == LatencyHistogram()


def test_decode_rejects_garbage() -> None:
    with pytest.raises(Exception):  # noqa: B017  # base64/zlib/HDR cookie errors all count
        LatencyHistogram.decode("not a histogram")


def test_merge_adds_counts_and_matches_recording_everything_in_one() -> None:
    a_values = [float(v) for v in range(1, 200)]
    b_values = [v * 7.5 for v in range(1, 50)] + [8e9]
    a, b = recorded(a_values), recorded(b_values)
    a.merge(b)
    assert a.count == len(a_values) + len(b_values)
    assert a.clamped == 1
    assert a == recorded(a_values + b_values)
    assert b.count == len(b_values)  # the source is left alone


def test_cdf_is_monotone_and_ends_at_one() -> None:
    rng = random.Random(11)
    hist = recorded([rng.paretovariate(1.2) for _ in range(10_000)])
    cdf = hist.cdf(points=50)
    assert 2 <= len(cdf) <= 50
    xs = [x for x, _ in cdf]
    fs = [f for _, f in cdf]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    assert fs == sorted(fs)
    assert fs[-1] == 1.0
    assert xs[-1] == hist.summary()["max"]
    assert 0 < fs[0] < 1


def test_cdf_keeps_the_tail_of_a_long_tailed_distribution() -> None:
    # 99 % of waits are tiny, 1 % queued behind a lock: fraction steps of 1/20 alone
    # would jump from the body (<= 0.95) straight to the max and draw the queue as one step.
    values = [0.01 + i * 1e-5 for i in range(9_900)] + [50.0 + i for i in range(100)]
    cdf = recorded(values).cdf(points=40)
    tail = [x for x, _ in cdf if x >= 50.0]
    assert len(tail) >= 3
    assert len(cdf) <= 40


def test_small_cdf_keeps_every_bin() -> None:
    cdf = recorded([1.0, 1.0, 2.0, 4.0]).cdf()
    # x is a bin's highest equivalent value (4.000 ms shares a 2 us bin with 4.001 ms)
    assert [f for _, f in cdf] == [0.5, 0.75, 1.0]
    assert [x for x, _ in cdf] == pytest.approx([1.0, 2.0, 4.0], rel=REL)


def test_buckets_sum_to_count_and_are_contiguous() -> None:
    rng = random.Random(5)
    hist = recorded([rng.uniform(1.0, 5.0) for _ in range(3_000)])
    buckets = hist.buckets(20)
    assert len(buckets) == 20
    assert sum(c for _, _, c in buckets) == hist.count
    for (_, hi, _), (lo, _, _) in itertools.pairwise(buckets):
        assert hi == lo
    widths = [hi - lo for lo, hi, _ in buckets]
    assert max(widths) == pytest.approx(min(widths), rel=1e-3)  # linear: < 2 decades


def test_buckets_are_log_spaced_when_the_range_spans_decades() -> None:
    hist = recorded([0.01, 0.1, 1.0, 10.0, 100.0])
    buckets = hist.buckets(10)
    assert sum(c for _, _, c in buckets) == 5
    ratios = [hi / lo for lo, hi, _ in buckets[1:]]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-2)
    assert sorted(c for _, _, c in buckets if c) == [1, 1, 1, 1, 1]  # one per decade


def test_buckets_with_a_fixed_range_still_count_everything() -> None:
    hist = recorded([0.5, 2.0, 30.0])
    buckets = hist.buckets(5, lo_ms=1.0, hi_ms=10.0)
    assert buckets[0][0] == 1.0 and buckets[-1][1] == 10.0
    assert sum(c for _, _, c in buckets) == 3


def test_one_distinct_value_gets_one_visible_bucket() -> None:
    buckets = recorded([2.0, 2.0]).buckets(3)
    assert sum(c for _, _, c in buckets) == 2
    assert all(hi > lo for lo, hi, _ in buckets)


def test_path_histograms_derive_all_and_keep_paths_apart() -> None:
    paths = PathHistograms()
    for ms in (1.0, 2.0, 3.0):
        paths.record("lock", "client", ms)
    paths.record("lock", "webhook", 100.0)
    paths.record("hold", "client", 5.0)
    summary = paths.summary()
    assert set(summary) == {"lock", "hold"}
    assert list(summary["lock"]) == ["client", "webhook", "all"]
    assert summary["lock"]["all"]["count"] == 4
    assert summary["lock"]["all"]["max"] == pytest.approx(100.0, rel=REL)
    assert summary["lock"]["client"]["max"] == pytest.approx(3.0, rel=REL)
    assert summary["hold"]["all"]["count"] == 1
    assert paths.get("lock", "nobody").count == 0
    assert paths.get("lock", "all").count == 4
    with pytest.raises(ValueError):
        paths.record("lock", "all", 1.0)


def test_path_plots_share_bucket_edges_within_a_kind() -> None:
    paths = PathHistograms()
    for ms in (0.1, 0.2, 0.3):
        paths.record("lock", "client", ms)
    for ms in (40.0, 80.0):
        paths.record("lock", "webhook", ms)
    plots = paths.plots(buckets=12)
    assert set(plots["lock"]) == {"client", "webhook"}
    client, webhook = plots["lock"]["client"], plots["lock"]["webhook"]
    assert [b[:2] for b in client["buckets"]] == [b[:2] for b in webhook["buckets"]]
    assert sum(b[2] for b in client["buckets"]) == 3
    assert sum(b[2] for b in webhook["buckets"]) == 2
    assert client["cdf"][-1][1] == 1.0


def test_path_histograms_travel_and_merge_like_locust_workers() -> None:
    worker_a, worker_b = PathHistograms(), PathHistograms()
    worker_a.record("lock", "client", 1.0)
    worker_b.record("lock", "client", 2.0)
    worker_b.record("lock", "webhook", 3.0)
    master = PathHistograms()
    for worker in (worker_a, worker_b):
        wire = worker.encode()
        assert set(wire["lock"]) <= {"client", "webhook"}
        master.merge(PathHistograms.decode(wire))
    assert master.get("lock", "client").count == 2
    assert master.get("lock", "webhook").count == 1
    assert master.summary()["lock"]["all"]["count"] == 3


@pytest.mark.parametrize("seed", range(6))
def test_summary_and_percentiles_equal_hdrhistograms_own_scans(seed: int) -> None:
    # summary() and percentile_ms() read the non-empty bins only; they must give exactly
    # what HdrHistogram's get_mean_value() and get_value_at_percentile() give, so a summary
    # never changes with how it is computed (decoded and merged histograms included).
    rng = random.Random(seed)
    hist = LatencyHistogram()
    for _ in range(rng.choice([1, 2, 50, 3000])):
        hist.record_ms(rng.choice([0.0, rng.lognormvariate(1.0, 2.0), rng.uniform(0, 5)]))
    if seed % 2:
        hist = LatencyHistogram.decode(hist.encode())
        hist.merge(recorded([rng.expovariate(0.1) for _ in range(rng.randrange(1, 40))]))
    h = hist._h
    s = hist.summary()
    assert s["mean"] == round(h.get_mean_value() / 1000.0, 3)
    for p in (0.0, 0.1, 50.0, 95.0, 99.0, 99.9, 100.0):
        assert hist.percentile_ms(p) == round(
            min(h.get_value_at_percentile(p), HIGHEST_US) / 1000.0, 3
        )
    expected = h.get_percentile_to_value_dict([50.0, 95.0, 99.0])
    assert [s["p50"], s["p95"], s["p99"]] == [
        round(expected[p] / 1000.0, 3) for p in (50.0, 95.0, 99.0)
    ]
