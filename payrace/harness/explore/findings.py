"""What the explorer found: one record per schedule, their sum, and every way it is shown.

    EXIT_OK, EXIT_VIOLATED, EXIT_ERROR   0, 1, 2: as `payrace run`
    ScheduleRun     one executed schedule: id, choices, timeline, replies, waits, races,
                    verdict (valid / violated / unknown filled by Explorer.judge())
    ExploreResult   every schedule of one exploration and what it adds up to
    ├── violating(), waiting(), raced(), by_checker(), outcomes()
    ├── shortest_violation()  fewest timeline rows, then fewest switches
    ├── shown()         what to draw: the shortest violation, else a schedule that waited
    ├── mismatches(), problems(), expectations()
    │                   against the scenario's expectations; reasons not to trust the run
    ├── outcome(), exit_code()   the run's verdict (model.verdict.RunOutcome): judged against
    │                   the scenario's expectations when it has any, else the invariants
    ├── golden()        deterministic text (the golden files under tests/harness/explore/golden/)
    ├── replay_of()     the command that replays one schedule: `payrace explore --replay ID`
    ├── html_fragment() the shown schedule as an HTML timeline (payrace.harness.reports.timeline),
    │                   its id and the command that replays it
    ├── render()        the console
    └── summary()       summary.json in the shape harness.reports reads, mode "explore"

Only golden() must be byte-stable: it leaves out times, pids and row ids, and shows a
schedule in which PostgreSQL decided a race between two waiters only up to that step (what
followed was the server's choice). The console and summary.json show everything.
"""

from __future__ import annotations

import html
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from payrace.harness.explore.policies import PctBound
from payrace.harness.explore.scenario import RequestSpec, Scenario, ScheduleRef
from payrace.harness.explore.scheduler import Wait, answer_text
from payrace.harness.infra.machine import machine
from payrace.harness.model import checker
from payrace.harness.model.client import Reply
from payrace.harness.model.verdict import (
    DECLARED,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_VIOLATED,
    RunOutcome,
    verdict_of,
)
from payrace.harness.reports.timeline import TimelineEvent, render_html, render_text


@dataclass
class ScheduleRun:
    number: int
    ref: ScheduleRef
    payment_id: int
    gateway_payment_id: str
    name: str | None = None
    decisions: list[tuple[tuple[int, ...], int]] = field(default_factory=list)
    events: list[TimelineEvent] = field(default_factory=list)
    replies: dict[str, Reply] = field(default_factory=dict)
    waits: list[Wait] = field(default_factory=list)
    deadlocks: list[tuple[str, ...]] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    guard: list[str] = field(default_factory=list)
    error: str | None = None
    pruned: int = 0
    expect: str | None = None
    # (step, requests): one step released several waiters at once; who locked first was
    # PostgreSQL's choice, so what follows may differ between runs (see Scheduler.step).
    races: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)
    note: str | None = None
    points: tuple[str, ...] = ()  # the pause points its requests reached, first seen first
    # Filled by Explorer.judge():
    valid: checker.Validity = "unknown"
    violated: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.ref.id

    @property
    def choices(self) -> tuple[int, ...]:
        return self.ref.choices

    def switches(self) -> int:
        return sum(1 for a, b in zip(self.choices, self.choices[1:], strict=False) if a != b)

    def outcome(self) -> str:
        return " · ".join(f"{label} {answer_text(reply)}" for label, reply in self.replies.items())


@dataclass
class ExploreResult:
    title: str
    strategy: str
    isolation: str
    specs: tuple[RequestSpec, ...]
    mode: str
    runs: list[ScheduleRun]
    verdict: checker.Verdict
    duration_s: float
    complete: bool = True
    bound: PctBound | None = None
    confidence: float = 0.95
    scenario: Scenario | None = None
    notes: list[str] = field(default_factory=list)
    # A team's app (`--app module:factory`): the pause points its requests reached, the
    # command that replays one of its ids, and what its profile declares it to be.
    app: str | None = None
    points: tuple[str, ...] = ()
    replay_command: str = "payrace explore"
    declared: str | None = None

    @property
    def schedules_per_s(self) -> float:
        return len(self.runs) / self.duration_s if self.duration_s > 0 else 0.0

    def violating(self) -> list[ScheduleRun]:
        return [r for r in self.runs if r.valid is False]

    def waiting(self) -> list[ScheduleRun]:
        return [r for r in self.runs if r.waits]

    def by_checker(self, runs: Sequence[ScheduleRun] | None = None) -> dict[str, int]:
        counts = {name: 0 for name in self.verdict.results}
        for run in self.runs if runs is None else runs:
            for name in run.violated:
                counts[name] = counts.get(name, 0) + 1
        return counts

    def shortest_violation(self) -> ScheduleRun | None:
        """Fewest timeline rows, then fewest switches between requests (easiest to read);
        one that PostgreSQL's own race did not decide, when there is one."""
        runs = self.violating()
        if not runs:
            return None
        return min(runs, key=lambda r: (bool(r.races), len(r.events), r.switches(), r.number))

    def shown(self) -> tuple[str, ScheduleRun] | None:
        """The schedule worth drawing: the shortest violation, else the first that waited."""
        if (run := self.shortest_violation()) is not None:
            return "shortest violating schedule", run
        if waited := sorted(self.waiting(), key=lambda r: (bool(r.races), r.number)):
            run = waited[0]
            who = ", ".join(
                sorted({f"{w.label} waited for {'+'.join(w.blocked_by)}" for w in run.waits})
            )
            return f"a schedule where {who}", run
        return None

    def outcomes(
        self, runs: Sequence[ScheduleRun] | None = None
    ) -> list[tuple[str, tuple[str, ...], list[ScheduleRun]]]:
        groups: dict[tuple[str, tuple[str, ...]], list[ScheduleRun]] = {}
        for run in self.runs if runs is None else runs:
            groups.setdefault((run.outcome(), run.violated), []).append(run)
        return [(o, v, runs) for (o, v), runs in groups.items()]

    def mismatches(self) -> list[str]:
        """Where the result differs from what the scenario (or the schedules) expected."""
        problems = []
        for run in self.runs:
            if run.expect is not None and _word(run.valid) != run.expect:
                problems.append(
                    f"{run.name or run.id}: expected {run.expect}, got {_word(run.valid)}"
                )
        sc = self.scenario
        if sc is not None and sc.expect is not None and _word(self.verdict.valid) != sc.expect:
            problems.append(
                f"scenario {sc.name}: expected {sc.expect}, got {_word(self.verdict.valid)}"
            )
        if sc is not None and sc.expect_checks is not None:
            got = tuple(sorted(n for n, c in self.by_checker().items() if c))
            if got != sc.expect_checks:
                problems.append(
                    f"scenario {sc.name}: expected violations of {list(sc.expect_checks)}, "
                    f"got {list(got)}"
                )
        return problems

    def problems(self) -> list[str]:
        """Reasons the run itself cannot be trusted (exit 2)."""
        out = [f"schedule {r.id}: {g}" for r in self.runs for g in r.guard]
        if out:
            out.append(
                "the explorer's step table (payrace.harness.explore.steps.predict) "
                "no longer matches the capture path; update it before trusting collapsed schedules"
            )
        out += [f"schedule {r.name or r.id}: {r.error}" for r in self.runs if r.error]
        if self.app is not None and not self.points and self.runs:
            out.append(
                f"no request reached a pause point, so every schedule ran the requests one after "
                f'the other: place `await payrace.pause("name")` in {self.app}\'s request code '
                "where the order matters (after the read, before the writes)"
            )
        return out

    def expectations(self) -> bool:
        """Whether the scenario says what to expect: then it is judged against that."""
        return self.scenario is not None and bool(
            self.scenario.expect or self.scenario.expect_checks or any(r.expect for r in self.runs)
        )

    def outcome(self) -> RunOutcome:
        """The run's verdict, exit code and reasons, once, for the console and every report."""
        problems = self.problems()
        if self.expectations():
            mismatches = self.mismatches()
            if problems:
                return RunOutcome("error", EXIT_ERROR, "declared", (*problems, *mismatches))
            if mismatches:
                return RunOutcome("not_as_declared", EXIT_VIOLATED, "declared", tuple(mismatches))
            return RunOutcome("as_declared", EXIT_OK, "declared")
        if problems:
            return RunOutcome("error", EXIT_ERROR, "invariants", tuple(problems))
        verdict, code = verdict_of(self.verdict.valid)
        reasons = () if code == EXIT_OK else (f"{self.strategy}: {verdict}",)
        return RunOutcome(verdict, code, "invariants", reasons)

    def exit_code(self) -> int:
        return self.outcome().exit_code

    # -- renderings ------------------------------------------------------------------------

    def header(self) -> list[str]:
        requests = ", ".join(f"{s.label} ({s.describe()})" for s in self.specs)
        where = (
            f"app {self.strategy} · its own isolation level"
            if self.app is not None
            else f"strategy {self.strategy} · {self.isolation}"
        )
        lines = [f"{self.title}", f"{where} · requests {requests}"]
        if self.mode == "exhaustive":
            pruned = sum(r.pruned for r in self.runs)
            lines.append(
                f"mode exhaustive: {len(self.runs)} schedules "
                f"({'every schedule' if self.complete else 'INCOMPLETE'}; "
                f"{pruned} equivalent branch{'es' if pruned != 1 else ''} collapsed)"
            )
        elif self.mode == "pct" and self.bound is not None:
            lines.append(self.bound.describe(len(self.runs) - self.bound.n, self.confidence))
        else:
            lines.append(f"mode {self.mode}: {len(self.runs)} schedules")
        if self.app is not None:
            lines.append(f"pause points reached: {', '.join(self.points) or 'none'}")
        return lines

    def counts(self, runs: Sequence[ScheduleRun] | None = None) -> list[str]:
        runs = self.runs if runs is None else runs
        lines = [
            f"schedules: {len(runs)} · with a lock wait: {sum(1 for r in runs if r.waits)} · "
            f"deadlocks: {sum(1 for r in runs if r.deadlocks)} · stuck: "
            f"{sum(1 for r in runs if r.stuck)} · violating: "
            f"{sum(1 for r in runs if r.valid is False)}"
        ]
        for name, count in self.by_checker(runs).items():
            if count:
                lines.append(f"  {name}: {count} schedule(s)")
        return lines

    def raced(self) -> list[ScheduleRun]:
        return [r for r in self.runs if r.races]

    def golden(self) -> str:
        """Deterministic text (no times, pids or row ids): the golden files' content.

        A schedule in which PostgreSQL decided a race between waiters is shown up to that
        step only; what came after was the server's choice and may differ next time."""
        stable = [r for r in self.runs if not r.races]
        lines = [*self.header(), *self.counts(stable)]
        if raced := self.raced():
            lines.append(
                f"decided by a race inside PostgreSQL after a step of theirs: {len(raced)} "
                "more schedule(s), not counted above"
            )
        lines.append("outcomes:")
        for outcome, violated, runs in self.outcomes(stable):
            tail = f"  [{', '.join(violated)}]" if violated else ""
            lines.append(f"  {len(runs):>3} x {outcome}{tail}")
        lines.append("schedules:")
        for run in self.runs:
            label = f"{run.name}: " if run.name else ""
            if run.races:
                step, who = run.races[0]
                ref = replace(run.ref, choices=run.choices[:step])
                lines.append(f"  {label}{ref.id}…  race: {' and '.join(who)}")
                continue
            waits = "; ".join(
                f"{w.label} waited for {'+'.join(w.blocked_by)} ({w.what})" for w in run.waits
            )
            lines.append(
                f"  {label}{run.id}  {_word(run.valid)}" + (f"  waits: {waits}" if waits else "")
            )
        if (shown := self.shown()) is not None:
            what, run = shown
            lines += ["", f"{what}: {run.id}", render_text(run.events)]
        for problem in self.mismatches() + self.problems():
            lines.append(f"! {problem}")
        return "\n".join(lines) + "\n"

    def replay_of(self, run: ScheduleRun) -> str:
        """The command that replays `run` (an app's carries its --app and --profile)."""
        return f"{self.replay_command} --replay {shlex.quote(run.id)}"

    def _shown_json(self) -> dict[str, str] | None:
        if (shown := self.shown()) is None:
            return None
        what, run = shown
        return {"what": what, "schedule_id": run.id, "replay": self.replay_of(run)}

    def html_fragment(self) -> str:
        shown = self.shown()
        if shown is None:
            return '<p class="meta">no schedule violated a checker or waited for a lock</p>'
        what, run = shown
        title = f"<h3>{html.escape(what)}: <code>{html.escape(run.id)}</code></h3>"
        replay = (
            f'<p class="meta replay">replay it: <code>{html.escape(self.replay_of(run))}</code></p>'
        )
        return title + replay + render_html(run.events)

    def render(self, console: Console, out: Path | None = None) -> None:
        for line in self.header():
            console.print(Text(line))
        if self.scenario is not None and self.scenario.path is not None:
            console.print(Text(f"from {self.scenario.path}", style="dim"))
        table = Table(title="schedules by outcome")
        for column in ("schedules", "outcome", "violated checkers", "first id"):
            table.add_column(column, justify="right" if column == "schedules" else "left")
        for outcome, violated, runs in self.outcomes():
            table.add_row(
                str(len(runs)),
                outcome,
                Text(", ".join(violated) or "none", style="bold red" if violated else "green"),
                runs[0].id,
            )
        console.print(table)
        for line in self.counts():
            console.print(Text(line))
        if raced := self.raced():
            console.print(
                Text(
                    f"{len(raced)} schedule(s) released two waiters of one row with one commit: "
                    "which of them locked first was PostgreSQL's choice (marked <race>)",
                    style="yellow",
                )
            )
        if (shown := self.shown()) is not None:
            what, run = shown
            console.print(
                Panel(Text(render_text(run.events)), title=Text(f"{what}: {run.id}"), expand=False)
            )
            console.print(Text(f"replay it: {self.replay_of(run)}"))
        console.print(
            Text(
                f"{len(self.runs)} schedules in {self.duration_s:.2f} s "
                f"({self.schedules_per_s:.1f} schedules/s)"
            )
        )
        for note in self.notes:
            console.print(Text(note, style="yellow"))
        for problem in self.mismatches():
            console.print(Text(f"unexpected: {problem}", style="bold red"))
        for problem in self.problems():
            console.print(Text(problem, style="bold red"))
        said = self.outcome()
        style = "green" if said.passed else "bold red"
        console.print(Text(f"verdict: {said.line()}", style=style))
        if out is not None:
            console.print(Text(f"reports: {out}"))

    def summary(
        self, *, command: str, run_id: str, database: dict[str, Any], started_at: str
    ) -> dict[str, Any]:
        """summary.json in the shape harness.reports reads (contracts.md), mode "explore"."""
        shown = self.shortest_violation()
        first = None
        if shown is not None:
            first = {
                "trial": shown.number,
                "payment": shown.payment_id,
                "schedule_id": shown.id,
                "replay": self.replay_of(shown),
                "checks": list(shown.violated),
                "timeline": [e.to_json() for e in shown.events],
            }
        expected = (
            self.scenario.expect
            if self.scenario and self.scenario.expect
            else self.declared or DECLARED.get(self.strategy)
        )
        run = self.outcome()
        judged_as_declared = {"as_declared": not self.mismatches()} if self.expectations() else {}
        strategy = {
            **judged_as_declared,
            "expected": expected,
            "valid": self.verdict.valid,
            "trials": len(self.runs),
            "violating_trials": len(self.violating()),
            "trials_per_second": round(self.schedules_per_s, 2),
            "duration_s": round(self.duration_s, 3),
            "checks": {name: r.to_json() for name, r in self.verdict.results.items()},
            "latency_ms": {},
            "plots": {},
            "first_violation": first,
            "explore": {
                "mode": self.mode,
                "points": list(self.points),
                "isolation_level": self.isolation,
                "requests": [s.kind.token for s in self.specs],
                "complete": self.complete,
                "schedules": len(self.runs),
                "waiting": len(self.waiting()),
                "deadlocks": sum(1 for r in self.runs if r.deadlocks),
                "stuck": sum(1 for r in self.runs if r.stuck),
                "races": len(self.raced()),
                "violations_by_checker": self.by_checker(),
                "pct": None
                if self.bound is None
                else {
                    "n": self.bound.n,
                    "k": self.bound.k,
                    "d": self.bound.d,
                    "p": self.bound.p,
                    "runs_for_confidence": self.bound.runs_for(self.confidence),
                    "confidence": self.confidence,
                },
                "shown": self._shown_json(),
                "timeline_html": self.html_fragment(),
                "runs": [_run_json(r) for r in self.runs],
            },
        }
        return run.stamp(
            {
                "run_id": run_id,
                "command": command,
                "started_at": started_at,
                "duration_s": round(self.duration_s, 3),
                "machine": machine(),
                "database": database,
                "target": f"app {self.app}" if self.app is not None else "inproc",
                "mode": "explore",
                "trials": len(self.runs),
                "isolation_level": self.isolation,
                "strategies": {self.strategy: strategy},
                "gates": [],
            }
        )


def _word(valid: checker.Validity) -> str:
    if valid is True:
        return "valid"
    return "violated" if valid is False else "unknown"


def _run_json(run: ScheduleRun) -> dict[str, Any]:
    return {
        "number": run.number,
        "id": run.id,
        "name": run.name,
        "payment": run.payment_id,
        "valid": run.valid,
        "violated": list(run.violated),
        "unknown": list(run.unknown),
        "outcome": run.outcome(),
        "waits": [
            {"label": w.label, "blocked_by": list(w.blocked_by), "what": w.what} for w in run.waits
        ],
        "deadlocks": [list(c) for c in run.deadlocks],
        "stuck": run.stuck,
        "races": [{"step": step, "requests": list(who)} for step, who in run.races],
        "note": run.note,
        "error": run.error,
        "timeline": [e.to_json() for e in run.events],
    }


__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_VIOLATED", "ExploreResult", "ScheduleRun"]
