"""The shop as it shipped: the charge is read without a lock, so two requests both see it
pending and both capture it. `payrace explore --app examples.starlette_shop.buggy:create_app`."""

from __future__ import annotations

from starlette.applications import Starlette

from examples.starlette_shop.app import build


def create_app() -> Starlette:
    return build(locked=False)
