"""The isolation matrix: every strategy at every isolation level, from the explorer.

    LEVELS          READ COMMITTED, REPEATABLE READ, SERIALIZABLE
    REQUESTS        the matrix's default race: the client callback and a payment.authorized
                    webhook, the one pair in which both requests call the gateway's capture
                    (with a payment.captured webhook a double gateway capture cannot happen,
                    so the gateway column would be zero by construction)
    DATABASE_CHECKS, GATEWAY_CHECKS   which checkers are the database's side of a double
                    capture (rows written twice) and which the gateway's (money taken twice,
                    or the shop and the gateway disagreeing)
    Cell            one (strategy, level): schedules, violating ones, and per side how many
    declared()      what a cell is declared to be: a strategy of model.verdict.DECLARED that
                    is valid there is declared valid at every level (DECLARED_LEVELS: at the
                    levels it lists, e.g. advisory at READ COMMITTED only); naive is declared
                    violated at READ COMMITTED (the incident's level); every other cell is
                    measured and shown, not judged
    explore_matrix()  every cell explored exhaustively (explore.plan.execute) on one database
    summary()       the cells as summary.json (mode "matrix"), stamped with the one verdict:
                    exit 0 iff every declared cell is as declared

reports.matrix draws it (console, matrix.html, matrix.md); cli.matrix_command runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from payrace.harness.explore.findings import ExploreResult
from payrace.harness.explore.plan import execute, make_plan
from payrace.harness.gateway.fake import FakeRazorpay
from payrace.harness.gateway.server import GatewayServer
from payrace.harness.gateway.signing import GatewayKeys
from payrace.harness.infra.machine import machine
from payrace.harness.infra.provider import Database
from payrace.harness.model.verdict import (
    DECLARED,
    DECLARED_LEVELS,
    EXIT_ERROR,
    RunOutcome,
    against_declared,
    found_word,
)
from payrace.postgres import ISOLATION_CODES
from payrace.service.strategies import resolve

LEVELS = ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")
REQUESTS = ("client", "payment.authorized")
DATABASE_CHECKS = ("single_capture_write", "single_invoice_paid", "single_order_paid")
GATEWAY_CHECKS = ("gateway_capture_once", "no_phantom_capture", "no_lost_capture")


@dataclass(frozen=True)
class Cell:
    strategy: str
    isolation: str
    runs_at: str  # the level the transaction ran at: a strategy may pin its own (serializable)
    declared: str | None  # None: measured, not judged
    found: str  # valid | violated | unknown
    schedules: int
    violating: int
    database: int  # schedules violating a database-side check
    gateway: int  # schedules violating a gateway-side check
    other: int  # schedules violating any other check (deadlock, 5xx, error classes)
    waiting: int  # schedules in which a request waited for a lock
    complete: bool
    first_violation: str | None  # the schedule id that replays it
    checks: dict[str, int]  # violating schedules per checker
    duration_s: float

    @property
    def key(self) -> str:
        return f"{self.strategy}.{ISOLATION_CODES[self.isolation]}"

    @property
    def as_declared(self) -> bool | None:
        return None if self.declared is None else self.found == self.declared

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "key": self.key, "as_declared": self.as_declared}


def declared(strategy: str, isolation: str) -> str | None:
    word = DECLARED.get(strategy)
    if isolation not in DECLARED_LEVELS.get(strategy, LEVELS):
        return None  # a known limit of the strategy at this level: measured, not judged
    if word == "valid":
        return "valid"
    if word == "violated" and isolation == "READ COMMITTED":
        return "violated"
    return None


def cell_of(result: ExploreResult, isolation: str) -> Cell:
    def count(names: Sequence[str]) -> int:
        return sum(1 for r in result.runs if set(r.violated) & set(names))

    sides = (*DATABASE_CHECKS, *GATEWAY_CHECKS)
    first = result.shortest_violation()
    return Cell(
        strategy=result.strategy,
        isolation=isolation,
        runs_at=resolve(result.strategy).isolation_level or isolation,
        declared=declared(result.strategy, isolation),
        found=found_word(result.verdict.valid),
        schedules=len(result.runs),
        violating=len(result.violating()),
        database=count(DATABASE_CHECKS),
        gateway=count(GATEWAY_CHECKS),
        other=sum(1 for r in result.runs if set(r.violated) - set(sides)),
        waiting=len(result.waiting()),
        complete=result.complete and not result.problems(),
        first_violation=first.id if first is not None else None,
        checks={name: n for name, n in result.by_checker().items() if n},
        duration_s=round(result.duration_s, 3),
    )


async def explore_matrix(
    db: Database | str,
    strategies: Sequence[str],
    levels: Sequence[str] = LEVELS,
    requests: Sequence[str] = REQUESTS,
    *,
    seed: int = 1,
    on_cell: Callable[[Cell], None] = lambda cell: None,
) -> list[Cell]:
    """Every schedule of `requests` for each (strategy, level), in that order. Each cell gets
    a fake gateway of its own, so its capture counters are the cell's alone."""
    cells = []
    for strategy in strategies:
        for level in levels:
            plan = make_plan(strategy=strategy, requests=requests, isolation=level,
                             pct_runs=None, depth=2, seed=seed, replay=None,
                             scenario=None)  # fmt: skip
            fake = FakeRazorpay(GatewayKeys(), seed=seed)
            with GatewayServer(fake) as server:
                result = await execute(plan, db, fake, server.url)
            cell = cell_of(result, plan.scenario.isolation)
            on_cell(cell)
            cells.append(cell)
    return cells


def summary(
    cells: Sequence[Cell],
    *,
    run_id: str,
    command: str,
    requests: Sequence[str],
    database: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """summary.json of the matrix: its cells, and the verdict over the declared ones (a cell
    the explorer could not finish is an error: the run cannot be trusted)."""
    judged = {
        c.key: {"valid": {"valid": True, "violated": False}.get(c.found, "unknown"),
                "expected": c.declared}
        for c in cells
        if c.declared is not None
    }  # fmt: skip
    problems = [f"{c.key}: the exploration did not finish" for c in cells if not c.complete]
    outcome = against_declared(judged, problems)
    if outcome.exit_code == EXIT_ERROR:
        outcome = RunOutcome("error", EXIT_ERROR, "declared", outcome.reasons)
    return outcome.stamp(
        {
            "run_id": run_id,
            "command": command,
            "mode": "matrix",
            "duration_s": round(time.perf_counter() - started, 3),
            "machine": machine(),
            "database": database,
            "requests": list(requests),
            "levels": list(dict.fromkeys(c.isolation for c in cells)),
            "strategies": list(dict.fromkeys(c.strategy for c in cells)),
            "cells": [c.to_json() for c in cells],
        }
    )


__all__ = [
    "DATABASE_CHECKS",
    "GATEWAY_CHECKS",
    "LEVELS",
    "REQUESTS",
    "Cell",
    "declared",
    "explore_matrix",
    "summary",
]
