"""harness/infra/cpu.py: CPU shares of named process groups, and the postmaster behind a DSN."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from payrace.harness.infra.cpu import CpuSampler, in_group, postmaster_pid
from payrace.harness.infra.processes import free_port
from payrace.harness.infra.provider import Database


@pytest.mark.slow
def test_cpu_sampler_counts_a_busy_group() -> None:
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"],
        start_new_session=True,
    )
    try:
        with CpuSampler({"busy": in_group(busy.pid)}) as sampler:
            busy.wait(timeout=10)
            time.sleep(1.1)  # one more sample after it exited changes nothing
        result = sampler.result()
    finally:
        busy.kill()
        busy.wait()
    assert result is not None
    assert 0.2 < result["groups"]["busy"]["cpu_s"] <= 2.0
    assert 0 < result["groups"]["busy"]["percent_of_machine"] <= 100


def test_postmaster_pid_is_the_parent_of_a_local_backend(pg: Database) -> None:
    postmaster = postmaster_pid(pg.url)
    if pg.route == "embedded":
        assert postmaster is not None
    if postmaster is not None:  # docker or a DSN: a postmaster here only if it runs locally
        assert psutil.pid_exists(postmaster)
        assert psutil.Process(postmaster).name() == "postgres"


def test_postmaster_pid_is_none_when_nothing_answers() -> None:
    assert postmaster_pid(f"postgresql://nobody@127.0.0.1:{free_port()}/nowhere") is None
