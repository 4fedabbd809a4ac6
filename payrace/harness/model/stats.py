"""Latency histograms: what the locks cost, kept as HdrHistograms so they merge and travel.

    LatencyHistogram   milliseconds in, microseconds inside (3 significant digits, 1 us .. 1 h)
        record_ms()        negative -> ValueError; above 1 h -> clamped to 1 h, counted in .clamped
        merge()            add another histogram's counts (Locust workers -> master, trials -> run)
        encode()/decode()  HdrHistogram's compressed base64 text, so a histogram fits in a message
        summary()          {"count", "mean", "p50", "p95", "p99", "max"} in ms, 3 decimals;
                           null when nothing was recorded (0 would read as "no wait at all")
        cdf()              [[ms, fraction <= ms], ...] for a CDF plot, ends at 1.0
        buckets()          [[lo_ms, hi_ms, count], ...] for a histogram plot (log-spaced when wide)
    PathHistograms     kind ("lock", "hold", "request", ...) -> path ("client", "webhook", ...)
        summary()          adds a derived "all" path per kind (summary.json's latency_ms)
        plots()            cdf + buckets per path, with one set of bucket edges per kind so the
                           client and webhook histograms of a kind can be compared bar by bar
        encode()/decode()  kind -> path -> text, for Locust's report_to_master

Why HdrHistogram: lock waits are heavy-tailed (most waits are ~0, the interesting ones are
the few that queued behind a held row lock), so a fixed relative precision over six
decades is what the p99 and max need; and histograms from many Locust workers add up
exactly, which averaged percentiles never do.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour: no lock wait worth reporting is longer
SIGNIFICANT_DIGITS = 3
_CLAMPED_SUFFIX = ";clamped="
ALL = "all"


def _ms(us: float) -> float:
    # HDR reports a bin's highest equivalent value, which for the top bin lies past 1 h;
    # a clamped value should read as the ceiling it was clamped to.
    return round(min(us, HIGHEST_US) / 1000.0, 3)


class LatencyHistogram:
    """Milliseconds in, recorded in microseconds with 3 significant digits, 1 us .. 1 h."""

    def __init__(self) -> None:
        self._h = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
        self.clamped = 0

    def record_ms(self, ms: float) -> None:
        if math.isnan(ms) or ms < 0:
            raise ValueError(f"a latency must be a non-negative number of ms, got {ms!r}")
        us = round(ms * 1000.0) if math.isfinite(ms) else HIGHEST_US + 1
        if us > HIGHEST_US:
            # A clamped value still counts towards count and percentiles (as 1 h), so a
            # stuck request shows up in p99/max instead of vanishing from the histogram.
            us = HIGHEST_US
            self.clamped += 1
        self._h.record_value(us)

    @property
    def count(self) -> int:
        return int(self._h.get_total_count())

    def merge(self, other: LatencyHistogram) -> None:
        self._h.add(other._h)
        self.clamped += other.clamped

    def encode(self) -> str:
        text: str = self._h.encode().decode("ascii")
        # HdrHistogram's wire format has no room for our clamp counter; base64 never
        # contains ';', so a suffix keeps plain blobs (from any HdrHistogram tool) decodable.
        return f"{text}{_CLAMPED_SUFFIX}{self.clamped}" if self.clamped else text

    @classmethod
    def decode(cls, data: str) -> LatencyHistogram:
        blob, _, clamped = data.partition(_CLAMPED_SUFFIX)
        decoded = HdrHistogram.decode(blob.encode("ascii"))
        if decoded.lowest_trackable_value != LOWEST_US or (
            decoded.significant_figures != SIGNIFICANT_DIGITS
        ):
            raise ValueError(
                "not a payrace latency histogram "
                f"(lowest={decoded.lowest_trackable_value}, digits={decoded.significant_figures})"
            )
        hist = cls()
        # Adding into a fresh histogram (rather than adopting the decoded one) keeps every
        # LatencyHistogram on identical bucket geometry, so merge() stays a plain array add.
        hist._h.add(decoded)
        hist.clamped = int(clamped) if clamped else 0
        return hist

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencyHistogram):
            return NotImplemented
        # Compared by bins, not HdrHistogram.equals(): the library's add() into an empty
        # histogram resets its min to 0, so equal contents could compare unequal.
        return self.clamped == other.clamped and list(self._bins()) == list(other._bins())

    __hash__ = None  # type: ignore[assignment]  # mutable, so unhashable

    def __repr__(self) -> str:
        return f"LatencyHistogram({self.summary()!r}, clamped={self.clamped})"

    def _nonzero(self) -> list[tuple[int, int]]:
        """(index, count) of every non-empty HDR bin, in value order.

        One slice of the counts array (done in C) and a comprehension: the library's own
        scans (get_mean_value's recorded iterator, get_percentile_to_value_dict) make several
        Python method calls per bin, empty ones included, which made the summary of a run's
        histograms cost about a second."""
        h = self._h
        if h.get_total_count() == 0:
            return []
        # No public accessor for the last bin; decoded histograms may hold fewer counts.
        last = min(h._counts_index_for(h.max_value) + 1, h.encoder.payload.counts_len)
        return [(index, n) for index, n in enumerate(h.counts[:last]) if n]

    def _bins(self) -> Iterator[tuple[int, int, int]]:
        """(lowest_us, highest_us, count) of every non-empty HDR bin, in value order."""
        h = self._h
        for index, n in self._nonzero():
            value = h.get_value_from_index(index)
            yield (
                int(h.get_lowest_equivalent_value(value)),
                int(h.get_highest_equivalent_value(value)),
                int(n),
            )

    def _stats(self, percentiles: list[float]) -> tuple[float, dict[float, int]]:
        """The mean and the values at `percentiles` (sorted, 0..100), in us, computed exactly
        as HdrHistogram's get_mean_value() and get_value_at_percentile() do (a bin's median
        equivalent value for the mean; the highest equivalent value of the first bin whose
        running count reaches the target, the lowest for percentile 0), from the non-empty
        bins only."""
        h = self._h
        targets = [(p, h.get_target_count_at_percentile(p)) for p in percentiles]
        found: dict[float, int] = {}
        weighted = 0
        running = 0
        for index, n in self._nonzero():
            value = h.get_value_from_index(index)
            weighted += n * h._hdr_median_equiv_value(value)
            running += n
            while len(found) < len(targets) and running >= targets[len(found)][1]:
                p = targets[len(found)][0]
                found[p] = (
                    h.get_highest_equivalent_value(value)
                    if p
                    else h.get_lowest_equivalent_value(value)
                )
        return float(weighted) / h.get_total_count(), found

    def summary(self) -> dict[str, float | int | None]:
        if self.count == 0:
            return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
        mean, p = self._stats([50.0, 95.0, 99.0])
        return {
            "count": self.count,
            "mean": _ms(mean),
            "p50": _ms(p[50.0]),
            "p95": _ms(p[95.0]),
            "p99": _ms(p[99.0]),
            "max": _ms(self._h.get_max_value()),
        }

    def percentile_ms(self, percentile: float) -> float:
        """Any percentile (0..100) in ms; 0.0 when empty."""
        if self.count == 0:
            return 0.0
        return _ms(self._stats([percentile])[1][percentile])

    def cdf(self, points: int = 100) -> list[list[float]]:
        """At most `points` [ms, fraction <= ms] pairs, increasing in both, ending at 1.0.

        When there are more bins than points, half the budget goes to even steps in
        fraction (the body) and half to even steps in value (the tail, log-spaced when
        wide): fraction steps alone would fold a long tail into its last point.
        """
        if points < 2:
            raise ValueError("a CDF needs at least 2 points")
        bins = list(self._bins())
        if not bins:
            return []
        total = self.count
        steps: list[tuple[float, float]] = []  # (ms, fraction <= ms)
        running = 0
        for _lo, hi, n in bins:
            running += n
            steps.append((_ms(hi), round(running / total, 6)))
        if len(steps) > points:
            budget = points - 2  # the first and last steps are always kept
            by_fraction = budget // 2
            by_value = budget - by_fraction
            keep = {0, len(steps) - 1}
            fraction_edges = [(i + 1) / (by_fraction + 1) for i in range(by_fraction)]
            value_edges = _edges(steps[0][0], steps[-1][0], by_value + 2)[1:-1]
            keep.update(_first_reaching([f for _, f in steps], fraction_edges))
            keep.update(_first_reaching([v for v, _ in steps], value_edges))
            steps = [steps[i] for i in sorted(keep)]
        return [[ms, fraction] for ms, fraction in steps]

    def value_range_ms(self) -> tuple[float, float] | None:
        """(lowest, highest) recorded value in ms at HDR resolution; None when empty."""
        bins = list(self._bins())
        if not bins:
            return None
        return bins[0][0] / 1000.0, (bins[-1][1] + 1) / 1000.0

    def buckets(
        self, n: int = 30, *, lo_ms: float | None = None, hi_ms: float | None = None
    ) -> list[list[float]]:
        """`n` contiguous [lo_ms, hi_ms, count] buckets (empty ones included) whose counts
        sum to .count; log-spaced when the range spans more than two decades.

        lo_ms / hi_ms fix the range, so histograms of several paths share their edges;
        values outside it fall into the first or last bucket rather than out of the sum.
        """
        if n < 1:
            raise ValueError("need at least one bucket")
        bins = list(self._bins())
        if not bins:
            return []
        lo = bins[0][0] / 1000.0 if lo_ms is None else lo_ms
        hi = (bins[-1][1] + 1) / 1000.0 if hi_ms is None else hi_ms
        edges = _edges(lo, hi, n + 1)
        counts = [0] * n
        for b_lo, b_hi, count in bins:
            middle = (b_lo + b_hi) / 2000.0
            counts[_bucket_of(edges, middle)] += count
        return [[round(edges[i], 6), round(edges[i + 1], 6), float(counts[i])] for i in range(n)]


def is_wide(lo: float, hi: float) -> bool:
    """More than two decades apart: plot on a log axis (with 1 us standing in for 0)."""
    return hi / max(lo, LOWEST_US / 1000.0) > 100.0


def _edges(lo: float, hi: float, count: int) -> list[float]:
    """`count` increasing edges from lo to hi: log-spaced when wide, else linear."""
    if count < 2:
        return [lo, hi][:count]
    if hi <= lo:
        hi = lo + LOWEST_US / 1000.0  # one distinct value still gets a visible bar
    if is_wide(lo, hi):
        floor = max(lo, LOWEST_US / 1000.0)
        ratio = (hi / floor) ** (1.0 / (count - 1))
        edges = [floor * ratio**i for i in range(count)]
        edges[0] = lo
    else:
        step = (hi - lo) / (count - 1)
        edges = [lo + step * i for i in range(count)]
    edges[-1] = hi
    return edges


def _bucket_of(edges: list[float], value: float) -> int:
    last = len(edges) - 2
    for i in range(last + 1):
        if value < edges[i + 1]:
            return i
    return last


def _first_reaching(values: list[float], thresholds: list[float]) -> set[int]:
    """Index of the first value >= each threshold (values and thresholds increasing)."""
    found: set[int] = set()
    i = 0
    for t in thresholds:
        while i < len(values) - 1 and values[i] < t:
            i += 1
        found.add(i)
    return found


class PathHistograms:
    """kind ("lock", "hold", "request", ...) -> path ("client", "webhook", ...) ->
    LatencyHistogram; 'all' is derived."""

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, LatencyHistogram]] = {}

    def record(self, kind: str, path: str, ms: float) -> None:
        if path == ALL:
            raise ValueError(f"'{ALL}' is derived from the other paths; record a real path")
        paths = self._by_kind.setdefault(kind, {})
        hist = paths.get(path)
        if hist is None:  # not setdefault: a histogram allocates ~23,000 counters
            hist = paths[path] = LatencyHistogram()
        hist.record_ms(ms)

    def kinds(self) -> list[str]:
        return list(self._by_kind)

    def paths(self, kind: str) -> list[str]:
        return list(self._by_kind.get(kind, {}))

    def get(self, kind: str, path: str) -> LatencyHistogram:
        """The live histogram of a path, a fresh merge for 'all', an empty one if unseen."""
        paths = self._by_kind.get(kind, {})
        if path == ALL:
            merged = LatencyHistogram()
            for hist in paths.values():
                merged.merge(hist)
            return merged
        return paths.get(path) or LatencyHistogram()

    def summary(self) -> dict[str, dict[str, dict[str, float | int | None]]]:
        return {
            kind: {
                **{path: hist.summary() for path, hist in paths.items()},
                ALL: self.get(kind, ALL).summary(),
            }
            for kind, paths in self._by_kind.items()
        }

    def plots(self, points: int = 100, buckets: int = 30) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for kind, paths in self._by_kind.items():
            span = self.get(kind, ALL).value_range_ms()
            out[kind] = {}
            for path, hist in paths.items():
                if span is None or hist.count == 0:
                    out[kind][path] = {"cdf": [], "buckets": []}
                    continue
                out[kind][path] = {
                    "cdf": hist.cdf(points),
                    "buckets": hist.buckets(buckets, lo_ms=span[0], hi_ms=span[1]),
                }
        return out

    def encode(self) -> dict[str, dict[str, str]]:
        return {
            kind: {path: hist.encode() for path, hist in paths.items()}
            for kind, paths in self._by_kind.items()
        }

    @classmethod
    def decode(cls, data: dict[str, dict[str, str]]) -> PathHistograms:
        out = cls()
        for kind, paths in data.items():
            for path, text in paths.items():
                if path == ALL:
                    continue  # derived; tolerate senders that included it
                out._by_kind.setdefault(kind, {})[path] = LatencyHistogram.decode(text)
        return out

    def merge(self, other: PathHistograms) -> None:
        for kind, paths in other._by_kind.items():
            mine = self._by_kind.setdefault(kind, {})
            for path, hist in paths.items():
                mine.setdefault(path, LatencyHistogram()).merge(hist)
