"""Latency plots as inline SVG markup, from numbers alone: no scripts, no external resources.

    Series        one line or one set of bars: label, colour, data
    cdf()         step CDFs on shared axes, with p50 and p99 guides
    histogram()   bars per bucket: side by side when the series share bucket edges,
                  overlaid and translucent otherwise
    PALETTE       series colours, in the order callers hand them out
    CSS           the rules for the classes the markup uses (a page embeds it once)

  inside
    _Axis         value -> pixel; x in ms: log decades when the values span more than two
                  (harness.model.stats.is_wide, the same rule its buckets follow), else 0-based
    _frame()      plot box, grid, tick labels, axis labels
    _legend()     coloured keys, right-aligned above the plot
    _svg()        the <svg> element with its accessible title
    _no_data()    a titled "no samples" box, so a page keeps its layout

Data shapes are PathHistograms.plots()'s: a CDF is [[ms, fraction], ...] ascending, a
histogram [[lo_ms, hi_ms, count], ...]. Every label is escaped here; callers pass text.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

from payrace.harness.model.stats import is_wide

WIDTH, HEIGHT = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 66, 30, 34, 50  # the right margin holds the p50/p99 labels
FLOOR_MS = 0.001  # 1 us, the histogram's resolution: where 0 sits on a log axis

PALETTE = ("#1f6fb4", "#d4462f", "#2e9a4a", "#8a4fbf", "#c48a00", "#4a4a4a")

CSS = """svg{background:#fff;border:1px solid #e3e3e3;max-width:100%;height:auto}
svg .title{font-size:14px;font-weight:600;fill:#222} svg .tick{font-size:11px;fill:#444}
svg .axis{font-size:12px;fill:#222} svg .legend{font-size:12px;fill:#222}
svg .plot{fill:none;stroke:#999} svg .grid{stroke:#eee}
svg .guide{stroke:#aaa;stroke-dasharray:4 3} svg .guide-label{font-size:10px;fill:#777}
svg .cdf{fill:none;stroke-width:2} svg .overlay{fill-opacity:.55}
"""


@dataclass(frozen=True)
class Series:
    label: str
    color: str
    data: list[list[float]]


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / target if span > 0 else 1.0
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * magnitude >= raw:
            return m * magnitude
    return 10 * magnitude


def _tick_label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.6f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class _Axis:
    lo: float
    hi: float
    log: bool
    start: float  # pixels
    end: float

    @classmethod
    def for_ms(cls, values: Sequence[float], start: float, end: float) -> _Axis:
        """Latency axis: log decades when the values span more than two, else 0-based."""
        positive = [v for v in values if v > 0] or [FLOOR_MS]
        lo, hi = min(positive), max(max(values, default=1.0), FLOOR_MS)
        if is_wide(lo, hi):
            lo_decade = math.floor(math.log10(max(lo, FLOOR_MS)))
            hi_decade = max(math.ceil(math.log10(hi)), lo_decade + 1)
            return cls(10.0**lo_decade, 10.0**hi_decade, True, start, end)
        step = _nice_step(hi)
        return cls(0.0, math.ceil(hi / step) * step, False, start, end)

    @classmethod
    def linear(cls, hi: float, start: float, end: float) -> _Axis:
        step = _nice_step(hi)
        return cls(0.0, max(math.ceil(hi / step) * step, step), False, start, end)

    def __call__(self, value: float) -> float:
        if self.log:
            value = min(max(value, self.lo), self.hi)
            share = math.log10(value / self.lo) / math.log10(self.hi / self.lo)
        else:
            share = (value - self.lo) / (self.hi - self.lo) if self.hi > self.lo else 0.0
        return self.start + share * (self.end - self.start)

    def ticks(self) -> list[float]:
        if self.log:
            lo, hi = round(math.log10(self.lo)), round(math.log10(self.hi))
            return [10.0**k for k in range(lo, hi + 1)]
        step = _nice_step(self.hi - self.lo)
        count = round((self.hi - self.lo) / step)
        return [self.lo + step * i for i in range(count + 1)]


def _frame(title: str, x: _Axis, y: _Axis, x_label: str, y_label: str, y_fmt: str = "") -> str:
    parts = [
        f'<text class="title" x="{LEFT}" y="20">{_esc(title)}</text>',
        f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
        f'height="{HEIGHT - TOP - BOTTOM}"/>',
    ]
    for t in x.ticks():
        px = x(t)
        parts.append(f'<line class="grid" x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{y.start}"/>')
        parts.append(
            f'<text class="tick" x="{px:.1f}" y="{y.start + 16}" '
            f'text-anchor="middle">{_esc(_tick_label(t))}</text>'
        )
    for t in y.ticks():
        py = y(t)
        label = f"{t:{y_fmt}}" if y_fmt else _tick_label(t)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py:.1f}" y2="{py:.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">'
            f"{_esc(label)}</text>"
        )
    scale = ", log scale" if x.log else ""
    parts.append(
        f'<text class="axis" x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 10}" '
        f'text-anchor="middle">{_esc(x_label)} (ms{scale})</text>'
    )
    middle = (TOP + y.start) / 2
    parts.append(
        f'<text class="axis" transform="translate(16 {middle:.1f}) rotate(-90)" '
        f'text-anchor="middle">{_esc(y_label)}</text>'
    )
    return "".join(parts)


def _legend(series: Sequence[Series]) -> str:
    parts = []
    x = WIDTH - RIGHT - 8
    for s in reversed(series):
        width = 7 * len(s.label) + 18
        x -= width
        parts.append(
            f'<rect x="{x}" y="11" width="10" height="10" fill="{_esc(s.color)}"/>'
            f'<text class="legend" x="{x + 14}" y="20">{_esc(s.label)}</text>'
        )
    return "".join(parts)


def _svg(body: str, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{_esc(label)}">'
        f"<title>{_esc(label)}</title>{body}</svg>"
    )


def _no_data(title: str) -> str:
    return _svg(
        f'<text class="title" x="{LEFT}" y="20">{_esc(title)}</text>'
        f'<text class="axis" x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">'
        "no samples</text>",
        title,
    )


def cdf(title: str, x_label: str, series: Sequence[Series], span: Sequence[float] = ()) -> str:
    """Step CDFs on shared axes, with p50 and p99 guides. `span`: extra x values the
    axis must cover, so plots of one kind share their scale."""
    series = [s for s in series if s.data]
    if not series:
        return _no_data(title)
    x = _Axis.for_ms([*span, *(p[0] for s in series for p in s.data)], LEFT, WIDTH - RIGHT)
    y = _Axis(0.0, 1.0, False, HEIGHT - BOTTOM, TOP)
    parts = [_frame(title, x, y, x_label, "fraction of requests ≤ x", ".2f")]
    for level, name in ((0.5, "p50"), (0.99, "p99")):
        py = y(level)
        parts.append(
            f'<line class="guide" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py:.1f}" y2="{py:.1f}"/>'
            f'<text class="guide-label" x="{WIDTH - RIGHT + 3}" y="{py + 3:.1f}">{name}</text>'
        )
    for s in series:
        # A CDF jumps at each recorded value: step up, then run flat to the next value.
        points = [(x(s.data[0][0]), y(0.0))]
        previous = 0.0
        for ms, fraction in s.data:
            px = x(ms)
            points.append((px, y(previous)))
            points.append((px, y(fraction)))
            previous = fraction
        points.append((float(WIDTH - RIGHT), y(previous)))
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        parts.append(
            f'<polyline class="cdf" points="{path}" stroke="{_esc(s.color)}">'
            f"<title>{_esc(s.label)}</title></polyline>"
        )
    parts.append(_legend(series))
    return _svg("".join(parts), title)


def histogram(
    title: str, x_label: str, series: Sequence[Series], span: Sequence[float] = ()
) -> str:
    """Bars per bucket; grouped side by side when the series share bucket edges (as
    PathHistograms.plots() makes them), overlaid and translucent otherwise. `span` as
    for cdf()."""
    series = [s for s in series if s.data]
    if not series:
        return _no_data(title)
    edges = [e for s in series for b in s.data for e in (b[0], b[1])]
    x = _Axis.for_ms([*span, *edges], LEFT, WIDTH - RIGHT)
    tallest = max(b[2] for s in series for b in s.data)
    y = _Axis.linear(tallest * 1.1, HEIGHT - BOTTOM, TOP)  # headroom above the tallest bar
    parts = [_frame(title, x, y, x_label, "requests", ".0f" if y.hi >= 5 else "")]
    shared = all([b[:2] for b in s.data] == [b[:2] for b in series[0].data] for s in series)
    for index, s in enumerate(series):
        for lo, hi, count in s.data:
            if count <= 0:
                continue
            left, right = x(lo), x(hi)
            if shared:
                width = (right - left) / len(series)
                left, right = left + index * width, left + (index + 1) * width
            top = y(count)
            parts.append(
                f'<rect class="bar{"" if shared else " overlay"}" x="{left:.1f}" '
                f'y="{top:.1f}" width="{max(right - left - 0.5, 0.8):.1f}" '
                f'height="{y.start - top:.1f}" fill="{_esc(s.color)}">'
                f"<title>{_esc(s.label)}: {_tick_label(lo)} to {_tick_label(hi)} ms: "
                f"{count:.0f}</title></rect>"
            )
    parts.append(_legend(series))
    return _svg("".join(parts), title)
