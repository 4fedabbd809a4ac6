"""A run's report files, written together: summary.json, junit.xml and report.html.

    WRITERS       key -> (file name, writer): reports.summary.write_json,
                  reports.junit.write_junit, reports.html.write_html
    write_all()   every WRITERS file into a run directory; returns key -> path
    claim_run_dir()   a run directory no other run has: reports/<run id>[-N]

Used by `payrace run` (harness.cli), `payrace explore` (harness.explore.engine), the Locust
gate (harness.load.gate), `payrace load` (harness.load.launch) and the pytest plugin. It
imports no rich (the console is reports.console), so the Locust processes stay light.
"""

from __future__ import annotations

import itertools
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


def claim_run_dir(out_dir: Path, run_id: str) -> Path:
    """Create and return out_dir/<run_id>, or <run_id>-2, -3, ... when that exists: two runs
    started in the same second never share (or overwrite) a directory. mkdir is the check,
    so two processes racing for one name cannot both get it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = out_dir / (run_id if n == 1 else f"{run_id}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")  # pragma: no cover - itertools.count never ends
