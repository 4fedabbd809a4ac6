"""The shop fixed: the charge is read with SELECT ... FOR UPDATE, so a second request waits
for the first to commit and then sees it captured (an idempotent answer).
`payrace explore --app examples.starlette_shop.fixed:create_app`."""

from __future__ import annotations

from starlette.applications import Starlette

from examples.starlette_shop.app import build


def create_app() -> Starlette:
    return build(locked=True)
