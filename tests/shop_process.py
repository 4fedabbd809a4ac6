"""The example Flask shop (examples/flask_shop) as a subprocess, for the tests that race it.

    SHOP_KEYS      the shop's own Razorpay test keys (not payrace's defaults); a FakeRazorpay
                   built with them accepts the shop's SDK calls and signs what the shop checks
    shop_env()     the SHOP_* variables for one database, gateway and variant
    ShopProcess    `python -m examples.flask_shop` in its own session; ready when
                   /shop/api/v1/health answers (infra.readiness); stopped on exit and on a
                   failed start, with everything it forked (infra.processes.stop_process)

Kept in tests/, not in examples/: the example knows nothing of payrace and imports none of
it, as a team's service would not; starting it for a test is payrace's side of the fence.
It is run from the checkout (cwd), since `examples` is not part of the installed wheel.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.processes import await_answer, free_port, spawn_group, stop_process
from payrace.harness.infra.provider import Database

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "/shop/api/v1"
SHOP_KEYS = GatewayKeys(
    key_id="rzp_test_shop0000000001",
    key_secret="shop_key_secret_0001",
    webhook_secret="shop_webhook_secret_0001",
    account_id="acc_shop0000000001",
)


def shop_env_keys(keys: GatewayKeys = SHOP_KEYS) -> dict[str, str]:
    """The variables holding the shop's keys; its payrace profile reads the same ones."""
    return {
        "SHOP_RAZORPAY_KEY_ID": keys.key_id,
        "SHOP_RAZORPAY_KEY_SECRET": keys.key_secret,
        "SHOP_RAZORPAY_WEBHOOK_SECRET": keys.webhook_secret,
    }


def shop_env(
    db: Database, gateway_url: str, variant: str, keys: GatewayKeys = SHOP_KEYS
) -> dict[str, str]:
    return {
        "SHOP_DATABASE_URL": db.url,
        **shop_env_keys(keys),
        "SHOP_RAZORPAY_BASE_URL": gateway_url,
        "SHOP_VARIANT": variant,
    }


class ShopProcess:
    """The shop on loopback; `url` is its base URL with the /shop/api/v1 prefix."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        log_path: Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.env = env
        self.log_path = log_path
        self.host = host
        self.port = port or free_port(host)
        self.root_url = f"http://{host}:{self.port}"
        self.url = self.root_url + PREFIX
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ShopProcess:
        cmd = [sys.executable, "-m", "examples.flask_shop", "--host", self.host]
        cmd += ["--port", str(self.port)]
        self.proc = spawn_group(cmd, self.env, log_path=self.log_path, cwd=ROOT)
        await_answer(
            self.proc,
            self.root_url,
            f"{PREFIX}/health",
            what="flask shop",
            hint="check SHOP_DATABASE_URL and the shop's log",
            log_path=self.log_path,
            timeout_s=self.start_timeout_s,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)
