"""Forced by locks against forced by pause, on the reference service, for docs/benchmarks.md.

    bench()    rounds of `payrace run --mode forced` for naive and for_update, each round
               running every (target, force) pair one after another, so the two forcings
               share whatever else the machine does; trials/s per pair, median over rounds
    _main()    the command line:
               python tools/bench_forcing.py [--dsn DSN] [--trials 200] [--rounds 3]
                                             [--targets inproc,http]

--force pause holds each request at the service's pause point (its probes: in-process, or
X-Payrace-Pause over HTTP); --force locks holds the trial's rows in the database and its
capture calls at the fake gateway, and the service runs with no probes at all. A script, not
part of the installed package: run it from a checkout where payrace is installed. Without
--dsn it starts an embedded PostgreSQL once and every run makes its own database there.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from payrace.harness.infra.provider import provide_postgres
from payrace.harness.runner.config import FORCES, RunConfig
from payrace.harness.runner.run import run

STRATEGIES = ("naive", "for_update")
Key = tuple[str, str, str]  # target, force, strategy


def bench(dsn: str, trials: int, rounds: int, targets: Sequence[str]) -> dict[Key, list[Any]]:
    """(target, force, strategy) -> per round: (trials/s, violating trials, forced trials)."""
    figures: dict[Key, list[Any]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as out:
        for _ in range(rounds):
            for target in targets:
                for force in FORCES:
                    config = RunConfig(
                        strategies=list(STRATEGIES),
                        trials=trials,
                        mode="forced",
                        target=target,
                        force=force,
                        dsn=dsn,
                        out_dir=Path(out),
                    )
                    summary = asyncio.run(run(config, announce=lambda line: None))
                    for name, result in summary["strategies"].items():
                        forced = result["forced"]
                        figures[(target, force, name)].append(
                            (
                                result["trials_per_second"],
                                result["violating_trials"],
                                forced["forced"],
                            )
                        )
    return figures


def table(figures: dict[Key, list[Any]], trials: int) -> str:
    lines = [
        "| target | strategy | force | trials/s median (each round) | violating | forced |",
        "|---|---|---|---|---|---|",
    ]
    for (target, force, strategy), rounds in sorted(figures.items()):
        rates = [r[0] for r in rounds]
        each = ", ".join(f"{r:.1f}" for r in rates)
        lines.append(
            f"| {target} | {strategy} | {force} | {statistics.median(rates):.1f} ({each}) | "
            f"{min(r[1] for r in rounds)}..{max(r[1] for r in rounds)} / {trials} | "
            f"{min(r[2] for r in rounds)}..{max(r[2] for r in rounds)} / {trials} |"
        )
    return "\n".join(lines)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a PostgreSQL server (default: an embedded one)")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", default="inproc,http")
    args = parser.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.dsn:
        print(table(bench(args.dsn, args.trials, args.rounds, targets), args.trials))
        return
    with provide_postgres(None, announce=print) as db:
        print(table(bench(db.url, args.trials, args.rounds, targets), args.trials))


if __name__ == "__main__":
    _main()
