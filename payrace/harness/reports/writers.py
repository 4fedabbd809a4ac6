"""A run's report files, written together: summary.json, junit.xml and report.html.

    WRITERS       key -> (file name, writer): reports.summary.write_json,
                  reports.junit.write_junit, reports.html.write_html
    write_all()   every WRITERS file into a run directory; returns key -> path

Used by `payrace run` (harness.cli), `payrace explore` (harness.explore.engine), the Locust
gate (harness.load.gate), `payrace load` (harness.load.launch) and the pytest plugin. It
imports no rich (the console is reports.console), so the Locust processes stay light.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from payrace.harness.reports.html import write_html
from payrace.harness.reports.junit import write_junit
from payrace.harness.reports.summary import write_json
from payrace.redact import redact_tree

WRITERS: dict[str, tuple[str, Callable[[dict[str, Any], Path], None]]] = {
    "summary": ("summary.json", write_json),
    "junit": ("junit.xml", write_junit),
    "html": ("report.html", write_html),
}


def write_all(summary: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """summary.json, junit.xml and report.html in out_dir (history.jsonl is the runner's)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # CI uploads these files: no password typed anywhere in a run reaches them.
    summary = redact_tree(summary)
    written = {}
    for key, (filename, writer) in WRITERS.items():
        writer(summary, out_dir / filename)
        written[key] = out_dir / filename
    return written
