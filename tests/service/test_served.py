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


# What a started service imports: the served app built with the default (lean) gateway client
# and with GATEWAY_CLIENT=sdk, each in a child of its own (sys.modules is global).
IMPORTS = """
import json, sys
from payrace.service.app import create_served_app
app = create_served_app()
print(json.dumps({
    "gateway": type(app.state.runtime.gateway).__name__,
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("razorpay", "requests")),
}))
"""


def _served_imports(**extra: str) -> dict[str, object]:
    env = {**os.environ, "DATABASE_URL": "postgresql://payrace@127.0.0.1:1/payrace"}
    env.pop("GATEWAY_CLIENT", None)
    env.update(extra)
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS], env=env, capture_output=True, text=True, check=True
    )
    seen: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return seen


def test_the_lean_service_imports_neither_the_razorpay_sdk_nor_requests() -> None:
    # The SDK and requests are a tenth of a second of every start; only the SDK client runs them.
    assert _served_imports() == {"gateway": "LeanGatewayClient", "modules": []}


def test_the_sdk_client_still_imports_the_sdk_when_asked_for() -> None:
    seen = _served_imports(GATEWAY_CLIENT="sdk")
    assert seen["gateway"] == "SdkGatewayClient"
    assert {"razorpay", "requests"} <= set(seen["modules"])  # type: ignore[arg-type]
