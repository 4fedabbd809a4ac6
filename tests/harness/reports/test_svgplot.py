"""payrace.harness.reports.svgplot: CDF and histogram SVG markup from numbers, read back as XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from payrace.harness.model.stats import PathHistograms
from payrace.harness.reports import svgplot
from payrace.harness.reports.svgplot import HEIGHT, RIGHT, TOP, WIDTH, Series

NS = "{http://www.w3.org/2000/svg}"
BOTTOM_PX = HEIGHT - svgplot.BOTTOM


def parse(markup: str) -> ET.Element:
    root = ET.fromstring(markup)  # well-formed, or the browser shows nothing
    assert root.tag == f"{NS}svg"
    return root


def of_class(root: ET.Element, cls: str) -> list[ET.Element]:
    return [e for e in root.iter() if cls in (e.get("class") or "").split()]


def x_ticks(root: ET.Element) -> list[str]:
    return [e.text or "" for e in of_class(root, "tick") if e.get("text-anchor") == "middle"]


def x_label(root: ET.Element) -> str:
    return next(e.text or "" for e in of_class(root, "axis") if e.get("y") == str(HEIGHT - 10))


def cdf_of(*values: float) -> list[list[float]]:
    return [[v, (i + 1) / len(values)] for i, v in enumerate(values)]


def test_wide_spread_latencies_get_a_log_axis_with_decade_ticks() -> None:
    paths = PathHistograms()
    for ms in (0.01, 0.02, 0.05, 3.0, 250.0):
        paths.record("lock", "client", ms)
    data = paths.plots()["lock"]["client"]
    for root in (
        parse(svgplot.cdf("t", "lock wait", [Series("client", "#000", data["cdf"])])),
        parse(svgplot.histogram("t", "lock wait", [Series("client", "#000", data["buckets"])])),
    ):
        assert x_label(root) == "lock wait (ms, log scale)"
        assert x_ticks(root)[0] == "0.01" and x_ticks(root)[-1] == "1,000"


@pytest.mark.parametrize(("hi", "log"), [(100.0, False), (101.0, True)])
def test_the_axis_turns_log_past_two_decades(hi: float, log: bool) -> None:
    root = parse(svgplot.cdf("t", "hold", [Series("a", "#000", cdf_of(1.0, hi))]))
    assert x_label(root) == ("hold (ms, log scale)" if log else "hold (ms)")
    assert x_ticks(root)[0] == ("1" if log else "0")  # linear axes start at 0


def test_every_label_is_escaped_and_reads_back_as_text() -> None:
    evil = "<b onload=\"x('1')\">&amp;</b>"
    series = [Series(evil, "#000", cdf_of(1.0, 2.0))]
    bars = [Series(evil, "#000", [[1.0, 2.0, 3.0]])]
    for markup in (
        svgplot.cdf(evil, evil, series),
        svgplot.histogram(evil, evil, bars),
        svgplot.cdf(evil, evil, []),
    ):
        assert "<b" not in markup and "&amp;amp;" in markup
        root = parse(markup)
        assert root.get("aria-label") == evil
        assert not [e for e in root.iter() if e.tag == f"{NS}b"]
        texts = {e.text for e in root.iter()}
        assert evil in texts  # the title, as typed
    root = parse(svgplot.histogram("t", evil, bars))
    assert x_label(root) == f"{evil} (ms)"
    assert of_class(root, "legend")[0].text == evil
    assert root.findtext(f"{NS}rect[@class='bar']/{NS}title", "").startswith(f"{evil}: 1 to 2")


@pytest.mark.parametrize("series", [[], [Series("client", "#000", [])]])
def test_no_data_draws_a_titled_no_samples_box(series: list[Series]) -> None:
    for draw in (svgplot.cdf, svgplot.histogram):
        root = parse(draw("lock wait: CDF", "lock wait", series))
        assert [e.text for e in of_class(root, "title")] == ["lock wait: CDF"]
        assert [e.text for e in of_class(root, "axis")] == ["no samples"]
        assert not of_class(root, "plot")


def test_histogram_of_empty_buckets_draws_axes_but_no_bars() -> None:
    root = parse(svgplot.histogram("t", "x", [Series("a", "#000", [[0.0, 1.0, 0.0]])]))
    assert of_class(root, "plot") and not of_class(root, "bar")


def test_step_cdf_rises_at_each_value_and_runs_flat_to_the_right_edge() -> None:
    root = parse(svgplot.cdf("t", "x", [Series("a", "#123456", cdf_of(2.0, 4.0, 6.0, 8.0))]))
    (line,) = of_class(root, "cdf")
    assert line.get("stroke") == "#123456"
    points = [tuple(map(float, p.split(","))) for p in (line.get("points") or "").split()]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    assert ys[0] == ys[1] == BOTTOM_PX  # starts at fraction 0
    assert (xs[-1], ys[-1]) == (WIDTH - RIGHT, TOP)  # ends at fraction 1, right edge
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True)
    assert len(points) == 2 + 2 * 4  # a riser and a tread per value
    guides = {e.text: float(e.get("y") or 0) - 3 for e in of_class(root, "guide-label")}
    assert guides == {"p50": pytest.approx(142.0), "p99": pytest.approx(36.2)}


def test_histogram_groups_bars_on_shared_edges_and_overlays_them_otherwise() -> None:
    a = Series("a", "#000", [[0.0, 10.0, 4.0], [10.0, 20.0, 2.0]])
    b = Series("b", "#111", [[0.0, 10.0, 1.0], [10.0, 20.0, 3.0]])
    shifted = Series("b", "#111", [[5.0, 15.0, 1.0], [15.0, 25.0, 3.0]])
    grouped = parse(svgplot.histogram("t", "x", [a, b]))
    bars = of_class(grouped, "bar")
    assert len(bars) == 4 and not of_class(grouped, "overlay")
    # side by side within a bucket: b's first bar starts where a's ends
    a0, b0 = (float(bar.get("x") or 0) for bar in (bars[0], bars[2]))
    assert b0 - a0 == pytest.approx(float(bars[0].get("width") or 0) + 0.5, abs=0.11)
    assert len(of_class(parse(svgplot.histogram("t", "x", [a, shifted])), "overlay")) == 4


def test_span_gives_a_kinds_histogram_and_cdf_one_x_scale() -> None:
    span = [0.005, 900.0]
    bars = parse(svgplot.histogram("h", "x", [Series("a", "#000", [[1.0, 2.0, 1.0]])], span))
    cdf = parse(svgplot.cdf("c", "x", [Series("a", "#000", cdf_of(1.0, 2.0))], span))
    assert x_ticks(bars) == x_ticks(cdf) == ["0.001", "0.01", "0.1", "1", "10", "100", "1,000"]
    narrow = parse(svgplot.cdf("c", "x", [Series("a", "#000", cdf_of(1.0, 2.0))]))
    assert x_ticks(narrow) != x_ticks(cdf)
