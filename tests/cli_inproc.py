"""`payrace` invoked inside the test's own process, answering as `python -m payrace.harness.cli`
would: the same Typer app, arguments and environment, its exit code, stdout and stderr.

A new interpreter imports FastAPI, SQLAlchemy, the strategies and the harness before the
first argument is read: 1.1-1.5 s of a 2-core CI machine per call, most of a usage error's
test. Tests whose point is the process itself (signals, the `-m payrace.harness.cli` entry, a
command that would wait forever on a regression) still start one.

What differs from a process, and how it is made up for:
- an exception the CLI does not handle is caught by Click's test runner instead of printing a
  traceback: its traceback is appended to stderr and the exit code is 1, as Python's would
  be, so `"Traceback" not in stderr` still catches it;
- payrace's rich consoles are made at import, with the width of the terminal pytest started
  in: for the call they are replaced by consoles as wide as a process given `COLUMNS` gets;
- sys.argv is the command's for the call (summary.json records it, redacted);
- `main()`'s signal handlers are not installed (the tests that send signals start a process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections.abc import Mapping

from rich.console import Console
from typer.testing import CliRunner

from payrace.harness import cli


def payrace_cli(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `payrace *args` with `env` as its whole environment (os.environ when None)."""
    wanted = dict(os.environ if env is None else env)
    # CliRunner sets the given variables for the call and restores them; None unsets one.
    changes: dict[str, str | None] = {k: v for k, v in wanted.items() if os.environ.get(k) != v}
    changes.update({k: None for k in os.environ if k not in wanted})
    columns = int(wanted.get("COLUMNS", "80"))
    saved = cli.console, cli.err, sys.argv
    sys.argv = [cli.__file__, *args]  # summary.json keeps the command line
    # As at import in a process whose output is a pipe (cli.py widens stdout to 150).
    cli.console = Console(stderr=False, width=max(columns, 150), color_system=None)
    cli.err = Console(stderr=True, width=columns, color_system=None)
    try:
        result = CliRunner().invoke(cli.app, list(args), env=changes, catch_exceptions=True)
    finally:
        cli.console, cli.err, sys.argv = saved
    stderr = result.stderr
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
        code = 1
    return subprocess.CompletedProcess(["payrace", *args], code, result.stdout, stderr)
