"""The README's first-look commands are run as written, so they never rot."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from payrace.harness.infra.provider import Database

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[tuple[str, int]]:
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- readme-test", 1)[1].split("```console", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.strip().splitlines():
        command, _, comment = line.partition("#")
        match = re.match(r"\s*(\d+)", comment)
        assert match, f"README test line lacks '# <exit code>': {line!r}"
        commands.append((command.strip(), int(match.group(1))))
    return commands


def test_the_readme_opens_with_the_two_commands() -> None:
    first_block = README.read_text(encoding="utf-8").split("```console", 1)[1].split("```")[0]
    assert first_block.split() == ["make", "race", "make", "test"]


@pytest.mark.slow
def test_readme_first_look_commands_give_their_exit_codes(pg: Database, tmp_path: Path) -> None:
    commands = readme_commands()
    assert len(commands) >= 2
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PAYRACE_DSN": pg.url, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for command, expected in commands:
        argv = [*shlex.split(command), "--out", str(tmp_path)]
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == expected, (command, done.stdout[-2000:], done.stderr[-2000:])
