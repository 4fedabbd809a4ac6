"""What installing payrace adds to a team's pytest start, for docs/benchmarks.md.

    python tools/bench_plugin.py [--runs N] [--ref REF ...]

For each git REF (default: HEAD; give an older one to compare in the same run), a wheel is
built from that commit, installed into a fresh virtualenv beside a trivial test suite (one
test), and `python -m pytest -q` is timed N times with payrace's plugin and N times with it
disabled (`-p no:payrace`), interleaved so that a busy machine slows both alike. The added
cost is the difference of the medians. Results: a markdown table on stdout and
reports/bench/plugin.json.

A script, not part of the installed package; it needs git, pip and the package index (the
wheels' dependencies), and leaves nothing behind but the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRIVIAL = "def test_trivial() -> None:\n    assert 1 + 1 == 2\n"


def _run(args: list[str], cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True)


def _timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def measure(ref: str, runs: int, work: Path) -> dict[str, Any]:
    tree, dist, project = work / f"tree-{ref}", work / f"dist-{ref}", work / f"project-{ref}"
    _run(["git", "worktree", "add", "--detach", str(tree), ref], ROOT)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), "."], tree)
    finally:
        _run(["git", "worktree", "remove", "--force", str(tree)], ROOT)
    (wheel,) = dist.glob("payrace-*.whl")
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "test_trivial.py").write_text(TRIVIAL)
    _run([sys.executable, "-m", "venv", str(project / ".venv")], project)
    python = str(project / ".venv" / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", str(wheel), "pytest"], project)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PAYRACE"))}
    base = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    _timed(base, project, env)  # a first run compiles the .pyc files; not counted
    with_plugin, without = [], []
    for _ in range(runs):
        with_plugin.append(_timed(base, project, env))
        without.append(_timed([*base, "-p", "no:payrace"], project, env))
    med_with, med_without = statistics.median(with_plugin), statistics.median(without)
    return {
        "ref": ref,
        "commit": commit,
        "runs": runs,
        "with_plugin_s": round(med_with, 3),
        "without_plugin_s": round(med_without, 3),
        "added_s": round(med_with - med_without, 3),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--ref", action="append", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="payrace-bench-plugin-") as tmp:
        results = [measure(ref, args.runs, Path(tmp)) for ref in args.ref or ["HEAD"]]
    report = {
        "command": "python tools/bench_plugin.py " + " ".join(argv),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": results,
    }
    out = ROOT / "reports" / "bench" / "plugin.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print("| ref | commit | pytest start with payrace | with -p no:payrace | added |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['ref']} | {r['commit']} | {r['with_plugin_s']:.3f} s "
            f"| {r['without_plugin_s']:.3f} s | {r['added_s']:+.3f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
