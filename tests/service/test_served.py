"""payrace/service/app.py create_served_app(): the factory payrace starts uvicorn with tunes
the collector of its own process, and only there (run in a child: the settings are global)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

from payrace.service.app import GC_GEN0_THRESHOLD

CHILD = """
import gc, json
from payrace.service.app import create_served_app
app = create_served_app()
print(json.dumps({"threshold": gc.get_threshold()[0], "frozen": gc.get_freeze_count(),
                  "routes": sorted(r.path for r in app.routes)}))
"""


def test_the_served_app_freezes_what_it_built_and_collects_young_objects_less_often() -> None:
    env = {
        **os.environ,
        # Building the app connects nowhere: the pools open at startup.
        "DATABASE_URL": "postgresql://payrace@127.0.0.1:1/payrace",
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
    )
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["threshold"] == GC_GEN0_THRESHOLD != gc.get_threshold()[0]
    assert seen["frozen"] > 10_000  # the imported modules' objects
    assert "/payments/verify" in seen["routes"]
