"""The shop's configuration, read from SHOP_* environment variables.

    Settings.from_env()   every variable checked; SettingsError names the ones to fix

No defaults for the database, the keys or the gateway: a service that falls back to a
default secret or to Razorpay's live URL is a worse example than one that refuses to start.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

VARIANTS = ("buggy", "fixed")
_REQUIRED = {
    "database_url": "SHOP_DATABASE_URL",
    "key_id": "SHOP_RAZORPAY_KEY_ID",
    "key_secret": "SHOP_RAZORPAY_KEY_SECRET",
    "webhook_secret": "SHOP_RAZORPAY_WEBHOOK_SECRET",
    "razorpay_base_url": "SHOP_RAZORPAY_BASE_URL",
}


class SettingsError(ValueError):
    """A variable is missing or wrong; the message names it."""


@dataclass(frozen=True)
class Settings:
    database_url: str  # libpq URL or key=value string, as psycopg takes it
    key_id: str
    key_secret: str
    webhook_secret: str
    razorpay_base_url: str  # the SDK's base_url: Razorpay's, or a fake gateway's
    variant: str = "fixed"
    pool_size: int = 20

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        missing = [name for name in _REQUIRED.values() if not env.get(name)]
        if missing:
            raise SettingsError(f"set {', '.join(missing)} (examples/flask_shop/README.md)")
        variant = env.get("SHOP_VARIANT", "fixed")
        if variant not in VARIANTS:
            raise SettingsError(f"SHOP_VARIANT must be buggy or fixed, got {variant!r}")
        pool_size = env.get("SHOP_POOL_SIZE", "20")
        if not pool_size.isdigit() or int(pool_size) < 1:
            raise SettingsError(f"SHOP_POOL_SIZE must be a positive integer, got {pool_size!r}")
        values = {field: env[name] for field, name in _REQUIRED.items()}
        return cls(**values, variant=variant, pool_size=int(pool_size))
