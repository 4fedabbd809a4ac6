"""Write tests/durations.json, the seconds each test took in one run of the suite (those of
0.3 s or more; the rest count as 0.05 s), from that run's JUnit XML. tests/conftest.py orders
the test files heaviest first with it, so that pytest-xdist (`--dist loadfile
--no-loadscope-reorder`, the Makefile's) starts the long files first instead of last.

    .venv/bin/pytest -n 5 --dist loadfile --no-loadscope-reorder --junitxml=/tmp/suite.xml
    .venv/bin/python tools/suite_durations.py /tmp/suite.xml

A stale file only orders the files less well: it never selects, skips or changes a test.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "durations.json"
KEPT_S = 0.3  # shorter tests are left out: the file stays small, the order the same


def per_test(junit: Path) -> dict[str, float]:
    """Seconds per test id (setup, call and teardown: JUnit's time) in the JUnit XML."""
    took: dict[str, float] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        # classname is the module's dotted path ("tests.harness.test_cli"), then any class.
        parts = case.get("classname", "").split(".")
        module = next(
            (i for i in range(len(parts) - 1, -1, -1) if parts[i].startswith("test_")), None
        )
        if module is None:
            continue
        path = "/".join(parts[: module + 1]) + ".py"
        node = "::".join([path, *parts[module + 1 :], case.get("name", "")])
        took[node] = took.get(node, 0.0) + float(case.get("time") or 0)
    return {node: round(s, 1) for node, s in sorted(took.items()) if s >= KEPT_S}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/suite_durations.py JUNIT_XML", file=sys.stderr)
        return 2
    durations = per_test(Path(argv[0]))
    files = {node.split("::", 1)[0] for node in durations}
    missing = sorted(name for name in files if not (ROOT / name).is_file())
    if missing:
        print(f"not test files of this checkout: {', '.join(missing[:5])}", file=sys.stderr)
        return 2
    OUT.write_text(json.dumps(durations, indent=0) + "\n")
    print(f"{OUT.relative_to(ROOT)}: {len(durations)} tests, {sum(durations.values()):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
