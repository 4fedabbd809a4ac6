"""`payrace`: the command line.

    payrace run       trials of one or more strategies; exit 0 clean, 1 violated or gate
                      breached, 2 usage or infrastructure error
    payrace race      what `make race`: naive and for_update, forced and aligned; exits non-zero
                      only when a strategy's verdict differs from what it is declared to be
    payrace matrix    every strategy at every isolation level, from the explorer
                      (payrace.harness.explore.matrix): its own command, not an explore
                      flag, because its answer is a strategy x level grid, not one
                      exploration with its schedules and replay ids
    payrace explore   every schedule of the pause points (payrace.harness.explore.plan): of
                      the reference service, or of a team's ASGI app (--app module:factory)
    payrace load      the Locust suite against the reference service it starts, or a running
                      service described by a target profile (payrace.harness.load.launch)
    payrace gateway   a fake Razorpay on loopback, for a target started by hand
    payrace bench     what the service and the harness cost here (payrace.harness.bench.run)
    payrace chaos     every fault of the nemesis on for_update and naive, >= 2,000 payments
                      each (payrace.harness.runner.chaos); exits as `race` does

Reports go to reports/<run>/: history.jsonl, summary.json, junit.xml, report.html.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, cast

import asyncpg
import httpx
import psycopg
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from payrace.harness.errors import UsageError
from payrace.harness.infra import env, loop
from payrace.harness.infra.provider import ProviderError
from payrace.harness.model import gates as gates_model
from payrace.harness.model.nemesis import described as nemesis_forms
from payrace.harness.model.verdict import (
    DECLARED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    RunOutcome,
    against_declared,
    found_word,
)
from payrace.harness.reports import chaos as chaos_report
from payrace.harness.reports.compare import build_markdown as compare_markdown
from payrace.harness.reports.compare import render_table as render_compare_table
from payrace.harness.reports.compare import write_html as write_compare_html
from payrace.harness.reports.console import render_console, render_reports_line
from payrace.harness.reports.writers import claim_run_dir, write_all
from payrace.harness.runner import chaos
from payrace.harness.runner.compare import COMPARE_MODES, DEFAULT_MODES
from payrace.harness.runner.compare import merge as compare_merge
from payrace.harness.runner.config import Gate, Mode, RunConfig
from payrace.harness.runner.run import run, write_history
from payrace.redact import redact

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # Help texts say "[/prefix]" and "[target].base_url": plain text, not rich markup.
    rich_markup_mode=None,
    help="Prove on a real PostgreSQL that a payment is captured exactly once.",
)
console = Console(stderr=False)
err = Console(stderr=True)
if not console.is_terminal:
    # CI logs and pipes have no width; rich would squeeze the tables to 80 columns.
    console.width = max(console.width, 150)


QUIET_HELP = "no progress display; the results and the reports line still print"


def _version(value: bool) -> None:
    if value:
        console.print(f"payrace {version('payrace')}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def main_options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Prove on a real PostgreSQL that a payment is captured exactly once."""


# Typer renders help as rich markup: a literal "[" is written "\\[".
GATE_HELP = (
    "\\[strategy:]metric OP threshold, repeatable; the threshold a number "
    "(lock_p99_ms<=100), K*metric (<=3*hold_p99_ms) or K*baseline (<=1.5*baseline)"
)
BASELINE_HELP = "an earlier run's summary.json (or --write-baseline file) for '*baseline' gates"
WRITE_BASELINE_HELP = "write this run's figures here as the next --baseline (when valid)"


def _fail(message: str) -> typer.Exit:
    # escape: messages name profile keys such as [target].base_url, which rich takes for markup
    err.print(f"[bold red]payrace:[/] {escape(redact(message))}")
    return typer.Exit(EXIT_ERROR)


def _from_env(ctx: typer.Context, name: str) -> bool:
    """The option's value came from its environment variable, not the command line."""
    return getattr(ctx.get_parameter_source(name), "name", None) == "ENVIRONMENT"


def _split(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _progress(quiet: bool) -> Progress:
    """One bar per task, the same look for every command that runs trials."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    )


def _collect(config: RunConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Run with a progress bar; return the summary, histories attached."""
    progress = _progress(quiet)
    tasks = {
        s: progress.add_task(f"{s} · {config.mode}", total=config.trials) for s in config.strategies
    }
    with progress:
        return loop.run(
            run(
                config,
                announce=lambda line: None if quiet else console.print(line, highlight=False),
                on_trial=lambda s: progress.advance(tasks[s]),
            )
        )


def _write(summary: dict[str, Any], out_dir: Path) -> Path:
    """The reports in a run directory of their own (never another run's); its path."""
    run_dir = claim_run_dir(out_dir, summary["run_id"])
    summary["run_id"] = run_dir.name
    write_history(summary, run_dir / "history.jsonl")
    write_all(summary, run_dir)
    return run_dir


def execute(config: RunConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Run with a progress bar; write the reports; return the summary."""
    summary = _collect(config, quiet=quiet)
    _write(summary, config.out_dir)
    return summary


def _guarded(config: RunConfig, quiet: bool = False) -> dict[str, Any]:
    with _exit_on_errors():
        return _collect(config, quiet=quiet)


@contextlib.contextmanager
def _exit_on_errors() -> Iterator[None]:
    """A usage, provider or infrastructure error is exit 2 with its message; Ctrl-C 130."""
    try:
        yield
    except UsageError as exc:
        raise _fail(str(exc)) from None
    except ProviderError as exc:
        raise _fail(str(exc)) from None
    except (OSError, TimeoutError, RuntimeError, httpx.HTTPError, asyncpg.PostgresError,
            asyncpg.InterfaceError, psycopg.Error) as exc:  # fmt: skip
        raise _fail(f"infrastructure error: {type(exc).__name__}: {exc}") from None
    except KeyboardInterrupt:
        # Every context manager on the way out has stopped what it started by now.
        err.print("payrace: interrupted; PostgreSQL, the gateway and the service were stopped")
        raise typer.Exit(EXIT_INTERRUPTED) from None


RUN_HELP = "\n".join(
    [
        "Fire interleaved client callbacks and webhooks; judge with the harness's own oracle.",
        "",
        "\b",
        "Faults while the trials run, for example:",
        "  --nemesis gateway-errors:0.2,gateway-latency:50,kill-backends:0.5",
        "fails 20% of gateway captures, adds 50 ms to each, and kills one backend",
        "of the target's database inside a transaction every 0.5 s. Every fault:",
        *nemesis_forms(),
        "restart-postgres needs the PostgreSQL payrace starts (no --dsn),",
        "restart-service --target http; they and kill-after-capture act on what",
        "payrace started, so not on a running --target URL.",
    ]
)


@app.command("run", help=RUN_HELP)
def run_command(
    ctx: typer.Context,
    strategy: Annotated[
        list[str],
        typer.Option(
            "--strategy",
            "-s",
            help="a strategy name (naive, for_update, nowait, ...: docs/strategies.md) or "
            "package.module:Name; repeat or comma-separate; default for_update",
        ),
    ] = [],  # noqa: B006
    trials: Annotated[int, typer.Option(help="trials (payments) per strategy")] = 100,
    mode: Annotated[str, typer.Option(help="forced | aligned | jitter")] = "forced",
    target: Annotated[
        str, typer.Option(help="inproc | http | http(s)://host:port\\[/prefix]")
    ] = "inproc",
    profile: Annotated[
        Path | None,
        typer.Option(help="your service's target profile (TOML, docs/profile.md)"),
    ] = None,
    dsn: Annotated[
        str | None,
        typer.Option(
            envvar=env.DSN,
            help="PostgreSQL server to use (a fresh database is created and dropped)",
        ),
    ] = None,
    seed: Annotated[int, typer.Option()] = 1,
    webhooks: Annotated[
        int, typer.Option(help="webhooks per trial besides the client callback")
    ] = 1,
    concurrency: Annotated[int, typer.Option(help="trials in flight at once")] = 4,
    jitter_ms: Annotated[float, typer.Option(help="max random offset in jitter mode")] = 5.0,
    hold_ms: Annotated[
        float,
        typer.Option(help="forced mode, --force pause: hold locks this long before commit"),
    ] = 0.0,
    force: Annotated[
        str | None,
        typer.Option(
            help="forced mode: locks (payrace holds the trial's rows and gateway captures; "
            "nothing needed from the target; default for --target URL) | pause (the target's "
            "pause handshake; default for the reference service)"
        ),
    ] = None,
    isolation: Annotated[
        str, typer.Option(help="READ COMMITTED | REPEATABLE READ | SERIALIZABLE")
    ] = "READ COMMITTED",
    webhook_dedupe: Annotated[
        bool,
        typer.Option(
            help="the reference service records each webhook's event id under a unique key "
            "and answers a redelivery as a duplicate; --no-webhook-dedupe processes every "
            "delivery (docs/strategies.md)"
        ),
    ] = True,
    gate: Annotated[list[str], typer.Option(help=GATE_HELP)] = [],  # noqa: B006
    baseline: Annotated[Path | None, typer.Option(help=BASELINE_HELP)] = None,
    write_baseline: Annotated[Path | None, typer.Option(help=WRITE_BASELINE_HELP)] = None,
    out: Annotated[Path, typer.Option(help="reports directory")] = Path("reports"),
    durable: Annotated[bool, typer.Option(help="keep fsync/synchronous_commit on")] = False,
    target_dsn: Annotated[
        str | None,
        typer.Option(envvar=env.TARGET_DSN, help="with --target URL: the target's database"),
    ] = None,
    gateway_url: Annotated[
        str | None, typer.Option(help="with --target URL: its fake gateway")
    ] = None,
    oracle_config: Annotated[
        Path | None, typer.Option(help="TOML naming your own tables and statuses")
    ] = None,
    event: Annotated[
        str,
        typer.Option(help="the racing webhook: payment.captured | payment.authorized | order.paid"),
    ] = "payment.captured",
    nemesis: Annotated[
        str | None,
        typer.Option(
            help="faults during the trials, name:value comma-separated (every fault below)"
        ),
    ] = None,
    expect: Annotated[
        str | None,
        typer.Option(help="with --target URL: what your service should be, valid | violated"),
    ] = None,
    settle_s: Annotated[
        float | None,
        typer.Option(
            help="seconds the oracle may wait at the end for the deadlock count to settle "
            "(default 2; 15 for --target URL, whose pool stays open)"
        ),
    ] = None,
    reconcile_s: Annotated[
        float | None,
        typer.Option(
            help="seconds the target may take after the trials to reconcile captures the "
            "gateway made that its database does not show, before the verdict (waits only "
            "while one is pending; default 10, 60 for --target URL; 0: judge at once)"
        ),
    ] = None,
    callback_reloads: Annotated[
        int,
        typer.Option(
            help="send a client callback answered 5xx (or not at all) again this many times, "
            "as a customer reloading the return page (0..10)"
        ),
    ] = 0,
    quiet: Annotated[bool, typer.Option(help=QUIET_HELP)] = False,
) -> None:
    # The help is RUN_HELP: it lists every fault of the nemesis registry.
    running = profile is not None or target.startswith(("http://", "https://"))
    if _from_env(ctx, "target_dsn") and not running:
        target_dsn = None  # names a running target's database; this run starts its own target
    try:
        gates = [Gate.parse(g) for g in gate]
        if strategy and not _split(strategy):  # --strategy '' must not quietly mean the default
            raise UsageError(
                "--strategy names no strategy; choose from naive, for_update, advisory (or "
                "leave --strategy out for for_update)"
            )
        config = RunConfig(
            strategies=_split(strategy),
            trials=trials,
            mode=mode,  # type: ignore[arg-type]  # validated by RunConfig.validate
            target=target,
            profile=profile,
            dsn=dsn,
            seed=seed,
            webhooks=webhooks,
            concurrency=concurrency,
            jitter_ms=jitter_ms,
            hold_ms=hold_ms,
            force=force,  # type: ignore[arg-type]  # validated by RunConfig.validate
            isolation=isolation,
            webhook_dedupe=webhook_dedupe,
            gates=gates,
            baseline=baseline,
            write_baseline=write_baseline,
            out_dir=out,
            durable=durable,
            target_dsn=target_dsn,
            gateway_url=gateway_url,
            oracle_config=oracle_config,
            first_event=event,
            nemesis=nemesis,
            expect=expect,
            settle_s=settle_s,
            reconcile_s=reconcile_s,
            callback_reloads=callback_reloads,
            command=shlex.join(["payrace", *sys.argv[1:]]),
        )
        config.validate()
    except UsageError as exc:
        raise _fail(str(exc)) from None
    summary = _guarded(config, quiet)
    run_dir = _write(summary, config.out_dir)
    render_console(summary, console)
    if write_baseline is not None:
        console.print(gates_model.write_baseline(summary, write_baseline), highlight=False)
    render_reports_line(console, run_dir)
    raise typer.Exit(summary["exit_code"])


def _each_mode(
    strategies: list[str],
    modes: Sequence[str],
    run_id: str,
    *,
    trials: int,
    dsn: str | None,
    seed: int,
    out: Path,
    durable: bool,
    command: str,
    quiet: bool,
) -> list[tuple[str, dict[str, Any]]]:
    """The same strategies raced once per mode (race, compare), each run's summary by mode."""
    summaries: list[tuple[str, dict[str, Any]]] = []
    for mode in modes:
        config = RunConfig(
            strategies=strategies,
            trials=trials,
            mode=cast(Mode, mode),
            dsn=dsn,
            seed=seed,
            out_dir=out,
            durable=durable,
            command=command,
            run_id=f"{run_id}-{mode}",
        )
        summaries.append((mode, _guarded(config, quiet)))
    return summaries


@app.command("race")
def race_command(
    trials: Annotated[int, typer.Option(help="trials per strategy and mode")] = 200,
    dsn: Annotated[str | None, typer.Option(envvar=env.DSN)] = None,
    out: Annotated[Path, typer.Option()] = Path("reports"),
    seed: Annotated[int, typer.Option()] = 1,
    durable: Annotated[bool, typer.Option(help="keep fsync/synchronous_commit on")] = False,
    quiet: Annotated[bool, typer.Option(help=QUIET_HELP)] = False,
) -> None:
    """Every strategy in forced and aligned modes, against its declared verdict."""
    modes: tuple[Mode, ...] = ("forced", "aligned")
    command = shlex.join(["payrace", *sys.argv[1:]])
    run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-race"
    summaries = _each_mode(list(DECLARED), modes, run_id, trials=trials, dsn=dsn, seed=seed,
                           out=out, durable=durable, command=command, quiet=quiet)  # fmt: skip
    summary = _race_summary(run_id, summaries)
    run_dir = _write(summary, out)
    table = Table(title="payrace race: verdicts against what each strategy is declared to be")
    for col in ("strategy", "mode", "declared", "found", "trials", "double captures",
                "double invoice updates", "lock p99 ms", "as declared"):  # fmt: skip
        numeric = col in ("trials", "double captures", "double invoice updates", "lock p99 ms")
        table.add_column(col, justify="right" if numeric else "left")
    for result in summary["strategies"].values():
        checks = result["checks"]
        table.add_row(
            result["strategy"],
            result["mode"],
            result["expected"],
            found_word(result["valid"]),
            str(result["trials"]),
            str(checks.get("single_capture_write", {}).get("count", "?")),
            str(checks.get("single_invoice_paid", {}).get("count", "?")),
            f"{result['latency_ms'].get('lock', {}).get('all', {}).get('p99', 0):.2f}",
            "[green]yes[/]" if result["as_declared"] else "[bold red]NO[/]",
        )
    console.print(table)
    outcome = RunOutcome.of(summary)
    for reason in outcome.reasons:
        err.print(f"[bold red]{escape(reason)}[/]")
    console.print(f"verdict: {outcome.line()}", highlight=False)
    render_reports_line(console, run_dir)
    raise typer.Exit(outcome.exit_code)


def _race_summary(run_id: str, summaries: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One summary for the whole race, a strategy per (strategy, mode) named
    `<strategy>.<mode>`, judged against the declarations: what every report of the race
    says, and what `payrace race` exits with."""
    first = summaries[0][1]
    strategies: dict[str, dict[str, Any]] = {}
    for mode, summary in summaries:
        for name, result in summary["strategies"].items():
            strategies[f"{name}.{mode}"] = {"strategy": name, "mode": mode, **result}
    merged = {
        **first,
        "run_id": run_id,
        "duration_s": round(sum(s["duration_s"] for _, s in summaries), 3),
        "mode": "+".join(mode for mode, _ in summaries),
        "strategies": strategies,
        "gates": [],
    }
    return against_declared(strategies).stamp(merged)


@app.command("chaos")
def chaos_command(
    payments: Annotated[
        int, typer.Option(help="payments per strategy over the whole campaign (split by fault)")
    ] = chaos.MIN_PAYMENTS,
    readme: Annotated[
        Path | None,
        typer.Option(help="rewrite the table between this file's payrace-chaos markers"),
    ] = None,
    dsn: Annotated[str | None, typer.Option(envvar=env.DSN)] = None,
    out: Annotated[Path, typer.Option()] = Path("reports"),
    seed: Annotated[int, typer.Option()] = 1,
    durable: Annotated[bool, typer.Option(help="keep fsync/synchronous_commit on")] = False,
    quiet: Annotated[bool, typer.Option(help=QUIET_HELP)] = False,
) -> None:
    """Every fault of the nemesis, one run each, on for_update (every invariant must hold) and
    naive (must be caught); exit 0 iff both are as declared under every fault."""
    command = shlex.join(["payrace", *sys.argv[1:]])
    run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-chaos"
    try:
        if payments < 1 or payments > 1_000_000:
            raise UsageError("--payments must be between 1 and 1000000")
        if readme is not None:
            chaos_report.check_readme(readme)
        base = RunConfig(dsn=dsn, seed=seed, out_dir=out, durable=durable, command=command,
                         run_id=run_id)  # fmt: skip
        steps = chaos.plan(base, payments)
    except UsageError as exc:
        raise _fail(str(exc)) from None
    progress = _progress(quiet)
    tasks = {
        (step.fault, s): progress.add_task(f"{s} · {step.config.nemesis}", total=step.config.trials)
        for step in steps
        for s in step.config.strategies
    }
    runs: list[tuple[chaos.Step, dict[str, Any]]] = []
    with _exit_on_errors(), progress:
        for step in steps:

            def advance(strategy: str, fault: str = step.fault) -> None:
                progress.advance(tasks[(fault, strategy)])

            runs.append((step, loop.run(run(step.config, on_trial=advance,
                                               announce=lambda line: None))))  # fmt: skip
    summary = chaos.merge(run_id, runs)
    summary["command"] = redact(command)
    run_dir = _write(summary, out)
    for step, _ in runs:
        # What a step's run wrote of its own (the log of a service it started) goes inside the
        # campaign's directory: one directory per campaign in reports/.
        written = out / step.config.run_id
        if written.is_dir() and written != run_dir:
            (run_dir / "faults").mkdir(exist_ok=True)
            shutil.move(written, run_dir / "faults" / step.fault)
    (run_dir / "chaos.md").write_text(chaos_report.markdown(summary) + "\n", encoding="utf-8")
    chaos_report.render_table(summary, console)
    if readme is not None:
        chaos_report.rewrite_readme(readme, summary)
        console.print(f"table written to {readme}", highlight=False)
    outcome = RunOutcome.of(summary)
    for reason in outcome.reasons:
        err.print(f"[bold red]{escape(reason)}[/]")
    console.print(f"verdict: {outcome.line()}", highlight=False)
    render_reports_line(console, run_dir)
    raise typer.Exit(outcome.exit_code)


@app.command("compare")
def compare_command(
    strategy: Annotated[
        list[str],
        typer.Option(
            "--strategy",
            "-s",
            help="strategies to compare, names or package.module:Name (repeat or "
            "comma-separate); default every built-in one",
        ),
    ] = [],  # noqa: B006
    mode: Annotated[
        list[str],
        typer.Option(
            help="forced, aligned, explore, load or all (repeat or comma-separate); "
            "default forced and aligned"
        ),
    ] = [],  # noqa: B006
    trials: Annotated[int, typer.Option(help="forced, aligned: trials per strategy")] = 200,
    pct: Annotated[
        int, typer.Option(help="explore: PCT runs of the callback and two webhooks")
    ] = 50,
    users: Annotated[int, typer.Option("-u", "--users", help="load: Locust users")] = 10,
    spawn_rate: Annotated[float, typer.Option("-r", "--spawn-rate", help="load")] = 20.0,
    run_time: Annotated[str, typer.Option("-t", "--run-time", help="load: per strategy")] = "20s",
    dsn: Annotated[str | None, typer.Option(envvar=env.DSN)] = None,
    out: Annotated[Path, typer.Option()] = Path("reports"),
    seed: Annotated[int, typer.Option()] = 1,
    durable: Annotated[bool, typer.Option(help="keep fsync/synchronous_commit on")] = False,
    quiet: Annotated[bool, typer.Option(help=QUIET_HELP)] = False,
) -> None:
    """The same seeded workload for each strategy, side by side: one table, compare.html,
    and which to pick when. Exit 0 iff every strategy is what it is declared to be."""
    from payrace.harness.runner.compare import load_mode

    modes = _split(mode) or list(DEFAULT_MODES)
    if "all" in modes:
        modes = list(COMPARE_MODES)
    wrong = [m for m in modes if m not in COMPARE_MODES]
    if wrong:
        raise _fail(f"--mode {', '.join(wrong)}: compare runs {', '.join(COMPARE_MODES)} (or all)")
    if not 1 <= pct <= 100_000:
        raise _fail(f"--pct {pct}: give 1 to 100000 PCT runs")
    from payrace.service.strategies import UnknownStrategy, names, resolve

    strategies = _split(strategy) or names()
    try:
        for name in strategies:
            resolve(name)
    except UnknownStrategy as exc:
        raise _fail(str(exc)) from None
    command = shlex.join(["payrace", *sys.argv[1:]])
    # Claimed first: the load runs' own reports go inside it, beside compare.html.
    run_dir = claim_run_dir(out, f"{datetime.now(UTC):%Y%m%d-%H%M%S}-compare")
    run_id = run_dir.name

    def say(line: str) -> None:
        if not quiet:
            console.print(line, markup=False, highlight=False)

    summaries: list[tuple[str, dict[str, Any]]] = []
    for each in modes:
        if each in ("forced", "aligned"):
            summaries += _each_mode(strategies, [each], run_id, trials=trials, dsn=dsn,
                                    seed=seed, out=out, durable=durable, command=command,
                                    quiet=quiet)  # fmt: skip
        elif each == "explore":
            summaries.append((each, _explore_all(strategies, dsn, durable, seed, pct, say)))
        else:

            def one_load(name: str, where: Path) -> int:
                from payrace.harness.load.launch import load_main

                code = load_main(Console(quiet=True), quiet=True, strategy=name, users=users,
                                 spawn_rate=spawn_rate, run_time=run_time, processes=1,
                                 workers=None, dsn=dsn, locustfile="race_pairs",
                                 out_dir=where, extra_args=[], durable=durable)  # fmt: skip
                say(f"load · {name}: exit {code} ({where})")
                return code

            try:
                summaries.append((each, load_mode(strategies, run_dir / "load", run=one_load)))
            except RuntimeError as exc:
                raise _fail(f"{exc}; see its locust.log and service.log") from None
    summary = compare_merge(run_id, summaries)
    summary["command"] = command
    summary["seed"] = seed
    summary["settings"] = {"trials": trials, "pct": pct, "users": users,
                           "spawn_rate": spawn_rate, "run_time": run_time}  # fmt: skip
    write_history(summary, run_dir / "history.jsonl")
    write_all(summary, run_dir)
    write_compare_html(summary, run_dir / "compare.html")
    (run_dir / "compare.md").write_text(compare_markdown(summary), encoding="utf-8")
    render_compare_table(summary, console)
    for reason in RunOutcome.of(summary).reasons:
        err.print(f"[bold red]{escape(reason)}[/]")
    render_reports_line(console, run_dir)
    raise typer.Exit(summary["exit_code"])


def _explore_all(
    strategies: list[str],
    dsn: str | None,
    durable: bool,
    seed: int,
    pct: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """compare's explore mode on a database of its own (runner.compare.explore_mode)."""
    from payrace.harness.infra.provider import provide_postgres
    from payrace.harness.runner.compare import explore_mode

    try:
        with provide_postgres(dsn, durable=durable, announce=lambda line: None) as db:
            return loop.run(
                explore_mode(db, strategies, seed=seed, pct_runs=pct,
                             on_strategy=lambda name: say(f"explore · {name}: done"))
            )  # fmt: skip
    except (UsageError, ProviderError, ValueError) as exc:
        raise _fail(str(exc)) from None


@app.command("matrix")
def matrix_command(
    strategy: Annotated[
        list[str],
        typer.Option(
            "--strategy",
            "-s",
            help="strategies, names or package.module:Name (repeat or comma-separate); "
            "default every built-in one",
        ),
    ] = [],  # noqa: B006
    isolation: Annotated[
        list[str],
        typer.Option(help="levels (repeat or comma-separate); default all three"),
    ] = [],  # noqa: B006
    requests: Annotated[
        str,
        typer.Option(
            help="the race explored in each cell; the default is the pair in which both "
            "requests call the gateway's capture"
        ),
    ] = "client,payment.authorized",
    dsn: Annotated[str | None, typer.Option(envvar=env.DSN)] = None,
    out: Annotated[Path, typer.Option()] = Path("reports"),
    seed: Annotated[int, typer.Option()] = 1,
    durable: Annotated[bool, typer.Option(help="keep fsync/synchronous_commit on")] = False,
    quiet: Annotated[bool, typer.Option(help=QUIET_HELP)] = False,
) -> None:
    """The isolation matrix: every schedule of one race for each strategy at each isolation
    level, database-side and gateway-side double captures side by side (matrix.html).
    Exit 0 iff every declared cell is as declared."""
    from payrace.harness.explore import matrix
    from payrace.harness.explore.scenario import ScenarioError, parse_requests
    from payrace.harness.infra.provider import provide_postgres
    from payrace.harness.reports import matrix as matrix_report
    from payrace.postgres import normalise_isolation
    from payrace.service.strategies import UnknownStrategy, names, resolve

    try:
        strategies = _split(strategy) or names()
        for name in strategies:
            resolve(name)
        levels = [normalise_isolation(level) for level in _split(isolation)] or list(matrix.LEVELS)
        races = _split([requests])
        parse_requests(races)
    except (UnknownStrategy, ScenarioError, ValueError) as exc:
        raise _fail(str(exc)) from None
    command = shlex.join(["payrace", *sys.argv[1:]])
    run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-matrix"
    started = time.perf_counter()

    def said(cell: matrix.Cell) -> None:
        if not quiet:
            console.print(f"{cell.key}: {matrix_report.cell_text(cell.to_json())}", markup=False)

    try:
        with provide_postgres(dsn, durable=durable, announce=lambda line: None) as db:
            cells = loop.run(
                matrix.explore_matrix(db, strategies, levels, races, seed=seed, on_cell=said)
            )
            database = {"route": db.route, "server_version": db.server_version,
                        "fast": db.fast, "describe": db.describe()}  # fmt: skip
    except (UsageError, ProviderError) as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        err.print("payrace: interrupted; PostgreSQL and the gateway were stopped")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    summary = matrix.summary(cells, run_id=run_id, command=command, requests=races,
                             database=database, started=started)  # fmt: skip
    run_dir = claim_run_dir(out, run_id)
    summary["run_id"] = run_dir.name
    matrix_report.write(summary, run_dir)
    matrix_report.render_table(summary, console)
    console.print(f"reports: {run_dir / 'matrix.html'}, matrix.md, summary.json", markup=False)
    raise typer.Exit(summary["exit_code"])


@app.command("explore")
def explore_command(
    strategy: Annotated[
        str | None, typer.Option(help="the reference service's flow (default for_update)")
    ] = None,
    requests: Annotated[
        str, typer.Option(help="comma list, e.g. client,webhook,webhook")
    ] = "client,webhook",
    isolation: Annotated[
        str | None, typer.Option(help="the reference service's level (default READ COMMITTED)")
    ] = None,
    pct: Annotated[int | None, typer.Option(help="PCT runs (3+ requests)")] = None,
    depth: Annotated[int, typer.Option(help="PCT bug depth d")] = 2,
    seed: Annotated[int, typer.Option()] = 1,
    replay: Annotated[str | None, typer.Option(help="rerun exactly this schedule id")] = None,
    scenario: Annotated[Path | None, typer.Option(help="TOML scenario file")] = None,
    app_spec: Annotated[
        str | None,
        typer.Option(
            "--app",
            help="module:factory building your ASGI app, driven in-process at its "
            "`await payrace.pause(...)` points (with --profile)",
        ),
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(help="with --app: your service's target profile (TOML, docs/profile.md)"),
    ] = None,
    target_dsn: Annotated[
        str | None,
        typer.Option(
            help="with --app: the database your app already uses (default: a fresh one, "
            "handed to the app as PAYRACE_TARGET_DSN)"
        ),
    ] = None,
    dsn: Annotated[str | None, typer.Option(envvar=env.DSN)] = None,
    out: Annotated[Path, typer.Option()] = Path("reports"),
    durable: Annotated[bool, typer.Option(help="keep fsync/synchronous_commit on")] = False,
    quiet: Annotated[bool, typer.Option(help=QUIET_HELP)] = False,
) -> None:
    """Every schedule of the pause points of concurrent requests, judged by the oracle."""
    from payrace.harness.explore.plan import explore_main

    code = explore_main(
        strategy=strategy,
        requests=_split([requests]),
        isolation=isolation,
        pct_runs=pct,
        depth=depth,
        seed=seed,
        replay=replay,
        scenario=scenario,
        dsn=dsn,
        out_dir=out,
        console=console,
        durable=durable,
        app=app_spec,
        profile=profile,
        target_dsn=target_dsn,
        quiet=quiet,
    )
    raise typer.Exit(code)


@app.command("load", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def load_command(
    ctx: typer.Context,
    strategy: Annotated[
        str | None, typer.Option(help="the reference service's flow (default for_update)")
    ] = None,
    users: Annotated[int, typer.Option("-u", "--users")] = 20,
    spawn_rate: Annotated[float, typer.Option("-r", "--spawn-rate")] = 10.0,
    run_time: Annotated[str, typer.Option("-t", "--run-time")] = "30s",
    processes: Annotated[int, typer.Option(help="Locust --processes")] = 1,
    workers: Annotated[
        int | None, typer.Option(help="uvicorn workers of the reference service (default 1)")
    ] = None,
    dsn: Annotated[str | None, typer.Option(envvar=env.DSN)] = None,
    locustfile: Annotated[
        str, typer.Option(help="race_pairs | webhook_storm | mixed, a path, or a comma list")
    ] = "race_pairs",
    out: Annotated[Path, typer.Option()] = Path("reports"),
    durable: Annotated[bool, typer.Option(help="keep fsync/synchronous_commit on")] = False,
    profile: Annotated[
        Path | None,
        typer.Option(help="race your running service: its target profile (docs/profile.md)"),
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="with --profile: overrides its [target].base_url")
    ] = None,
    target_dsn: Annotated[
        str | None,
        typer.Option(envvar=env.TARGET_DSN, help="with --profile: the target's database"),
    ] = None,
    gateway_url: Annotated[
        str | None, typer.Option(help="with --profile: its fake gateway")
    ] = None,
    expect: Annotated[
        str | None, typer.Option(help="what the target should be, valid | violated")
    ] = None,
    settle_s: Annotated[
        float | None,
        typer.Option(
            help="seconds the oracle may wait at the end for the deadlock count to settle "
            "(default 2; 15 with --profile, whose pool stays open)"
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option(help="Locust's own output to locust.log only; the results still print")
    ] = False,
    gate: Annotated[list[str], typer.Option(help=GATE_HELP)] = [],  # noqa: B006
    baseline: Annotated[Path | None, typer.Option(help=BASELINE_HELP)] = None,
    write_baseline: Annotated[Path | None, typer.Option(help=WRITE_BASELINE_HELP)] = None,
    worker_command: Annotated[
        bool,
        typer.Option(
            "--worker-command",
            help="print how another machine joins as a light Locust worker (its install and "
            "its locust command), then exit",
        ),
    ] = False,
) -> None:
    """Run Locust headless against the reference service it starts (PostgreSQL, the fake gateway, the service), or against your running service (--profile); judge."""  # noqa: E501
    from payrace.harness.load.launch import load_main, resolve_locustfile

    if worker_command:
        from payrace.harness.load.worker import worker_recipe

        try:
            files = [Path(f) for f in resolve_locustfile(locustfile).split(",")]
        except UsageError as exc:
            raise _fail(str(exc)) from None
        # Plain print: the recipe is shell, and rich would read [keys] as markup.
        print(worker_recipe(files, gateway_url=gateway_url, profile=profile))
        raise typer.Exit(0)

    # Each variable only where it means something: PAYRACE_DSN names a server to provision on,
    # which a running target (--profile) does not need; PAYRACE_TARGET_DSN names a running
    # target's database, which the reference service payrace starts does not have.
    if profile is not None and _from_env(ctx, "dsn"):
        dsn = None
    if profile is None and _from_env(ctx, "target_dsn"):
        target_dsn = None
    code = load_main(
        quiet=quiet,
        strategy=strategy,
        users=users,
        spawn_rate=spawn_rate,
        run_time=run_time,
        processes=processes,
        workers=workers,
        dsn=dsn,
        locustfile=locustfile,
        out_dir=out,
        console=console,
        extra_args=list(ctx.args),
        durable=durable,
        profile=profile,
        target=target,
        target_dsn=target_dsn,
        gateway_url=gateway_url,
        expect=expect,
        settle_s=settle_s,
        gates=gate,
        baseline=baseline,
        write_baseline=write_baseline,
    )
    raise typer.Exit(code)


@app.command("bench")
def bench_command(
    quick: Annotated[
        bool, typer.Option(help="seconds, not minutes: one strategy, short windows (tests)")
    ] = False,
    strategy: Annotated[
        list[str] | None, typer.Option("--strategy", "-s", help="repeatable (default: all)")
    ] = None,
    seconds: Annotated[
        float | None, typer.Option(help="seconds of HTTP load per strategy and worker count")
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option(
            help="service windows per strategy, each followed by pgbench again; the ratio "
            "is of the medians (a shared machine moves between runs) [default: 3; --quick 1]"
        ),
    ] = None,
    dsn: Annotated[str | None, typer.Option(envvar=env.DSN)] = None,
    out: Annotated[Path, typer.Option()] = Path("reports"),
) -> None:
    """What the service and the harness cost on this machine: pgbench's ceiling for the
    capture's own SQL, the service over HTTP against it, the harness's rates
    (reports/bench/<run>/bench.json and bench.md)."""
    from payrace.harness.bench.run import BenchConfig, bench_main
    from payrace.service.capture import STRATEGIES

    chosen = tuple(_split(strategy or []))
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown:
        err.print(
            f"[bold red]payrace:[/] unknown strategy {escape(', '.join(unknown))}; "
            f"choose from {', '.join(STRATEGIES)}"
        )
        raise typer.Exit(EXIT_ERROR)
    if seconds is not None and not 0.5 <= seconds <= 600:
        err.print("[bold red]payrace:[/] --seconds must be between 0.5 and 600")
        raise typer.Exit(EXIT_ERROR)
    if rounds is not None and not 1 <= rounds <= 20:
        err.print("[bold red]payrace:[/] --rounds must be between 1 and 20")
        raise typer.Exit(EXIT_ERROR)
    changes: dict[str, Any] = {"out": out, "dsn": dsn}
    if rounds is not None:
        changes["rounds"] = rounds
    if chosen:
        changes["strategies"] = chosen
    if seconds is not None:
        changes["service_seconds"] = seconds
    config = BenchConfig.quick(**changes) if quick else BenchConfig(**changes)
    try:
        bench_main(config, lambda line: err.print(escape(line)))
    except ProviderError as exc:
        raise _fail(str(exc)) from None
    console.print(f"bench: {config.run_dir / 'bench.md'} and bench.json")


@app.command("gateway")
def gateway_command(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 9411,
    profile: Annotated[
        Path | None, typer.Option(help="accept your service's test keys, from its profile")
    ] = None,
    quiet: Annotated[
        bool, typer.Option(help="only the line with the gateway's address and keys")
    ] = False,
) -> None:
    """Serve a fake Razorpay until Ctrl-C (for `payrace run --target URL --gateway-url`)."""
    import time

    from payrace.harness.gateway.fake import FakeRazorpay
    from payrace.harness.gateway.server import GatewayServer
    from payrace.harness.model.profile import Profile

    if not 0 <= port <= 65535:
        raise _fail(f"--port must be between 0 and 65535 (0: any free port), got {port}")
    try:
        chosen = Profile.load(profile) if profile is not None else Profile.reference()
    except UsageError as exc:
        raise _fail(str(exc)) from None
    keys = chosen.keys
    stack = contextlib.ExitStack()
    try:
        server = stack.enter_context(GatewayServer(FakeRazorpay(keys), host=host, port=port))
    except OSError as exc:
        raise _fail(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port "
            "(0 picks a free one) or stop what listens there"
        ) from None
    with stack:
        if profile is None:
            said = f"key secret {keys.key_secret}, webhook secret {keys.webhook_secret}"
        else:  # a team's secrets are never printed: say where they came from
            said = ", ".join(
                f"{name.replace('_', ' ')} from {chosen.describe_key(name)}"
                for name in ("key_secret", "webhook_secret")
            )
        console.print(
            f"fake Razorpay at {server.url} (key id {keys.key_id}, {said}); Ctrl-C stops it"
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            if not quiet:
                console.print("stopping the fake gateway")


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (a CI runner cancelling the job, `kill`) unwinds like Ctrl-C, so every
    # context manager stops what it started instead of leaving PostgreSQL or uvicorn behind.
    # Re-raised as SIGINT, asyncio.run cancels its main task cleanly; raising here instead
    # would land in whatever frame runs and strand the other tasks.
    signal.raise_signal(signal.SIGINT)


def main() -> None:
    # A shell starts background jobs with SIGINT ignored; payrace wants it either way, since
    # asyncio.run only turns SIGINT into a clean cancellation when the default handler is set.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    app()


if __name__ == "__main__":
    main()
