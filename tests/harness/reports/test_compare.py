"""reports.compare: the table's cells and compare.html carry the summary's verdict."""

from __future__ import annotations

from rich.console import Console

from payrace.harness.reports.compare import HEAD, build_html, build_markdown, cells, render_table
from payrace.harness.runner.compare import merge


def _summary(valid: object) -> dict[str, object]:
    result = {
        "valid": valid, "trials": 2, "violating_trials": 0 if valid is True else 2,
        "trials_per_second": 3.0, "latency_ms": {"lock": {"all": {"p50": 1.0, "p99": 2.5}}},
        "conflicts": {"answered_409": 1, "retried": 1}, "gateway_capture_calls": 2,
    }  # fmt: skip
    return merge("run", [("forced", {"duration_s": 1.0, "strategies": {"for_update": result}})])


def test_cells_give_every_column_and_say_what_was_not_measured() -> None:
    [row] = _summary(True)["compare"]["rows"]  # type: ignore[index]
    got = cells(row)
    assert len(got) == len(HEAD)
    assert got[:7] == ["for_update", "forced", "valid", "valid", "0/2", "3.0", "3.0"]
    assert got[7:9] == ["n/a", "n/a"]  # forced: the harness holds the requests
    assert got[9:12] == ["1.00", "2.50", "n/a"]  # no max recorded: n/a, never 0
    assert got[14] == "1 (1)"


def test_the_page_and_the_console_say_the_summarys_verdict() -> None:
    for valid, line in ((True, "as declared (exit code 0)"), (False, "not as declared")):
        summary = _summary(valid)
        page = build_html(summary)
        assert f"verdict: {line}" in page and "<script" not in page
        console = Console(record=True, width=250)
        render_table(summary, console)
        assert f"verdict: {line}" in console.export_text()
        markdown = build_markdown(summary)
        assert f"Verdict: {line}" in markdown
        assert "| for_update | forced |" in markdown
