"""What installing payrace does to a team's project: one namespace, a plugin that costs nothing.

A wheel is built from this checkout (non-editable, as a team would install it). Its contents
must all live under `payrace/`; installed into a fresh virtualenv beside a project that has its
own `service` and `harness` packages, that project's own pytest run must pass, with the
payrace plugin loaded and neither a web framework, an ORM nor the razorpay SDK imported.

What is tested is the wheel, not pip's resolver: the wheel is installed with `--no-deps`, and
its dependencies are the ones this checkout's virtualenv already holds, lent to the new one
through a directory of links to exactly the distributions the wheel's `Requires-Dist` names
and theirs in turn (one minute of unpacking 70-odd wheels spared). A dependency the wheel
forgot to declare is missing there, as it would be for a team.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Builds a wheel and virtualenvs: `make test-fast` skips these.
pytestmark = pytest.mark.slow
HEAVY = ("fastapi", "sqlalchemy", "razorpay", "starlette", "asyncpg", "locust", "psycopg")


def _run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PAYRACE"))}
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: setuptools leaves build/ beside the sources it builds.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    shutil.copytree(
        ROOT / "payrace", source / "payrace", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), "."], source)
    (built,) = out.glob("payrace-*.whl")
    return built


def test_the_wheel_installs_the_payrace_namespace_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"payrace", next(t for t in tops if t.endswith(".dist-info"))}
    assert "payrace/locustfiles/race_pairs.py" in names  # `payrace load` finds its scenarios
    meta = next(n for n in names if n.endswith("entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(meta).decode()
    assert "payrace = payrace.harness.pytest_plugin" in entry_points
    assert "payrace = payrace.harness.cli:main" in entry_points


@pytest.fixture(scope="module")
def team_project(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Iterator[Path]:
    """A team's project with its own `service` and `harness`, payrace installed beside it."""
    project = tmp_path_factory.mktemp("team")
    for package, body in {
        "service": "def answer() -> int:\n    return 42\n",
        "harness": "NAME = 'the team harness'\n",
    }.items():
        (project / package).mkdir()
        (project / package / "__init__.py").write_text(body)
    (project / "tests").mkdir()
    (project / "tests" / "test_team.py").write_text(
        textwrap.dedent(
            """
            import harness
            from service import answer

            def test_the_team_packages_are_the_teams_own():
                assert answer() == 42
                assert harness.NAME == "the team harness"
            """
        )
    )
    (project / "pyproject.toml").write_text('[tool.pytest.ini_options]\npythonpath = ["."]\n')
    venv = project / ".venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], project)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
          str(wheel)], project)  # fmt: skip
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                project).stdout.strip()  # fmt: skip
    lent = venv / "lent-site-packages"  # inside .venv: the team's pytest never collects it
    lent.mkdir()
    for dist in _requirement_closure(wheel):
        for top in _top_levels(dist):
            if not (lent / top.name).exists():
                (lent / top.name).symlink_to(top)
    # A path in a .pth file goes after the venv's own site-packages: the wheel's payrace wins.
    (Path(site) / "payrace-test-dependencies.pth").write_text(f"{lent}\n")
    yield project


def _requirement_closure(wheel: Path) -> list[importlib.metadata.Distribution]:
    """The installed distributions the wheel requires, with the extras it asks for, and what
    they require in turn (markers evaluated for this interpreter)."""
    with zipfile.ZipFile(wheel) as archive:
        (meta,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(meta).decode()
    todo = [
        (Requirement(line.split(":", 1)[1].strip()), "")
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    seen: dict[str, tuple[importlib.metadata.Distribution, set[str]]] = {}
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        dist, extras = seen.get(name, (importlib.metadata.distribution(req.name), set()))
        if name in seen and set(req.extras) <= extras:
            continue
        seen[name] = (dist, extras | set(req.extras))
        # A requirement of the distribution itself, or of one of the extras asked of it.
        todo += [(Requirement(r), e) for r in dist.requires or [] for e in ("", *req.extras)]
    return [dist for dist, _ in seen.values()]


def _top_levels(dist: importlib.metadata.Distribution) -> set[Path]:
    """What a distribution put directly in site-packages: packages, modules, its dist-info."""
    files = dist.files
    assert files is not None, f"{dist.metadata['Name']} lists no files (no RECORD)"
    tops = set()
    for file in files:
        first = file.parts[0]
        if first not in ("..", "__pycache__") and not first.endswith(".pth"):
            tops.add(Path(dist.locate_file(first)))
    return tops


# The team's pytest run, with a look at what it imported once it is over (sys.modules sees
# plugins loaded through importlib too, which `-X importtime` does not list).
_TEAM_RUN = """
import sys, pytest
code = pytest.main(["-q", "-p", "no:cacheprovider"])
print("PLUGIN", "payrace.harness.pytest_plugin" in sys.modules)
print("HEAVY", sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:])))
sys.exit(code)
"""


def test_a_team_project_with_its_own_service_package_still_passes(team_project: Path) -> None:
    python = str(team_project / ".venv" / "bin" / "python")
    done = _run([python, "-c", _TEAM_RUN, *HEAVY], team_project)
    assert "1 passed" in done.stdout
    assert "PLUGIN True" in done.stdout  # the plugin was loaded ...
    assert "HEAVY []" in done.stdout  # ... and imported none of the stack it races with


def test_the_installed_cli_answers(team_project: Path) -> None:
    done = _run([str(team_project / ".venv" / "bin" / "payrace"), "--help"], team_project)
    assert "exactly once" in done.stdout
