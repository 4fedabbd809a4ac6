"""The history of a run: one flat record per operation event, append-only, written as JSONL.

    Operation   type invoke | ok | fail | info, f, process, trial, payment, value, time, index
    History     invoke() then complete(); ops(); completions(); to_jsonl() / from_jsonl()
    classify()  HTTP status -> ok / fail / info

As in Jepsen, a completion whose outcome is unknown (a timeout, a dropped connection, a 5xx)
is `info` — "may or may not have happened" — never a silent success or a silent failure.
Times are monotonic nanoseconds since the history began; `server` holds what the target
said about itself (Server-Timing, received-at), kept apart from what the harness saw.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

OpType = Literal["invoke", "ok", "fail", "info"]


@dataclass(frozen=True)
class Operation:
    index: int
    type: OpType
    f: str  # what was asked: "verify", "webhook", "create_order", ...
    process: str  # who carried it within its trial: "client", "webhook-1", ...
    trial: int
    payment: int | None  # the service's internal payment id
    time: int  # ns since the history began (monotonic)
    value: dict[str, Any] = field(default_factory=dict)
    status: int | None = None  # HTTP status on completion
    error: str | None = None
    server: dict[str, Any] = field(default_factory=dict)  # Server-Timing, received-at, ...
    strategy: str | None = None  # which target strategy the op ran against (runs compare several)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Operation:
        return cls(**doc)


def classify(status: int | None) -> OpType:
    """2xx did happen, 4xx did not (the service rejected it and wrote nothing), anything
    else (5xx, no answer) is unknown."""
    if status is None:
        return "info"
    if 200 <= status < 300:
        return "ok"
    if 400 <= status < 500:
        return "fail"
    return "info"


class History:
    def __init__(self, ops: Iterable[Operation] = (), *, strategy: str | None = None) -> None:
        self._ops: list[Operation] = list(ops)
        self.strategy = strategy
        self._lock = threading.Lock()
        self._t0 = time.monotonic_ns()

    def now(self) -> int:
        return time.monotonic_ns() - self._t0

    def _append(self, **fields: Any) -> Operation:
        with self._lock:
            op = Operation(index=len(self._ops), time=self.now(), strategy=self.strategy, **fields)
            self._ops.append(op)
            return op

    def invoke(
        self, f: str, process: str, trial: int, payment: int | None, value: dict[str, Any]
    ) -> Operation:
        return self._append(
            type="invoke", f=f, process=process, trial=trial, payment=payment, value=value
        )

    def complete(
        self,
        invoke: Operation,
        type: OpType,
        *,
        value: dict[str, Any] | None = None,
        status: int | None = None,
        error: str | None = None,
        server: dict[str, Any] | None = None,
    ) -> Operation:
        return self._append(
            type=type,
            f=invoke.f,
            process=invoke.process,
            trial=invoke.trial,
            payment=invoke.payment,
            value=value or {},
            status=status,
            error=error,
            server=server or {},
        )

    def __iter__(self) -> Iterator[Operation]:
        return iter(list(self._ops))

    def __len__(self) -> int:
        return len(self._ops)

    def ops(self) -> list[Operation]:
        return list(self._ops)

    def completions(self) -> list[Operation]:
        return [op for op in self._ops if op.type != "invoke"]

    def to_jsonl(self, path: Path) -> None:
        with path.open("w", encoding="utf-8") as fh:
            for op in self._ops:
                fh.write(json.dumps(op.to_json(), separators=(",", ":")) + "\n")

    @classmethod
    def from_jsonl(cls, path: Path) -> History:
        with path.open(encoding="utf-8") as fh:
            return cls(Operation.from_json(json.loads(line)) for line in fh if line.strip())
