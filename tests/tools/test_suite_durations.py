"""tools/suite_durations.py and the order tests/conftest.py gives the test files with it.

The script is not a package module: it is loaded from its path. The ordering is checked on a
suite of its own, collected by pytest in a subprocess with this repository's conftest hook.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from scripts import load_script

ROOT = Path(__file__).parents[2]

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="tests.harness.test_cli" name="test_slow[a]" time="12.34"/>
<testcase classname="tests.harness.test_cli" name="test_quick" time="0.01"/>
<testcase classname="tests.test_readme" name="test_commands" time="0.5"/>
<testcase classname="tests.service.test_app.TestRoutes" name="test_one" time="2.0"/>
</testsuite></testsuites>
"""


def _module() -> ModuleType:
    return load_script("suite_durations")


def test_junit_times_become_test_ids_and_short_tests_are_left_out(tmp_path: Path) -> None:
    junit = tmp_path / "suite.xml"
    junit.write_text(JUNIT)
    assert _module().per_test(junit) == {
        "tests/harness/test_cli.py::test_slow[a]": 12.3,
        "tests/service/test_app.py::TestRoutes::test_one": 2.0,
        "tests/test_readme.py::test_commands": 0.5,
    }


def test_a_junit_file_of_another_checkout_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = _module()
    out = tmp_path / "durations.json"
    monkeypatch.setattr(module, "OUT", out)
    junit = tmp_path / "suite.xml"
    junit.write_text(JUNIT.replace("tests.harness.test_cli", "tests.gone.test_nothing_here"))
    assert module.main([str(junit)]) == 2
    assert "tests/gone/test_nothing_here.py" in capsys.readouterr().err
    assert not out.exists()
    assert module.main([]) == 2  # usage


def test_the_committed_durations_name_tests_of_this_checkout() -> None:
    """A renamed or removed file only weighs less; the file still has to parse."""
    known = json.loads((ROOT / "tests" / "durations.json").read_text())
    assert known and all(isinstance(s, float | int) and s >= 0 for s in known.values())
    files = {node.split("::", 1)[0] for node in known}
    assert sum((ROOT / name).is_file() for name in files) >= 0.9 * len(files)


@pytest.mark.slow  # two pytest processes
def test_the_heaviest_file_is_handed_out_first_and_each_files_order_stays(tmp_path: Path) -> None:
    """The conftest hook on a suite of three files: the file whose tests took longest comes
    first, whatever its name or number of tests; a deselected slow test no longer weighs."""
    suite = tmp_path / "tests"
    suite.mkdir()
    (suite / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    for name, tests in {
        "test_a_many.py": ["one", "two", "three", "four"],
        "test_b_long.py": ["first", "second"],
        "test_c_mid.py": ["only"],
    }.items():
        (suite / name).write_text("".join(f"def test_{t}():\n    pass\n\n\n" for t in tests))
    durations = {
        "tests/test_b_long.py::test_second": 30.0,
        "tests/test_c_mid.py::test_only": 2.0,
        "tests/test_a_many.py::test_one": 1.0,
    }
    (suite / "durations.json").write_text(json.dumps(durations))

    def order(*args: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
             "-p", "no:randomly", "--rootdir", str(tmp_path), "tests", *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return [line for line in done.stdout.splitlines() if "::" in line]

    assert order() == [
        "tests/test_b_long.py::test_first",
        "tests/test_b_long.py::test_second",
        "tests/test_c_mid.py::test_only",
        "tests/test_a_many.py::test_one",
        "tests/test_a_many.py::test_two",
        "tests/test_a_many.py::test_three",
        "tests/test_a_many.py::test_four",
    ]
    # Without its 30 s test, test_b_long weighs 0.05 s: behind both others.
    without = order("-k", "not second")
    assert without[0] == "tests/test_c_mid.py::test_only"
    assert without[-1] == "tests/test_b_long.py::test_first"
