"""What the oracle watches in a target's schema: the tables, their columns, their done status.

    OracleError    the oracle cannot do its job here; the message says what to change
    WatchedTable   one audited table: name, id / status columns, its "done" status, and how
                   its rows link to a payment (payment_column, or order_column for invoices)
    OracleConfig   payments, invoices, orders and how they link; reference() (the reference
                   service), from_toml() / to_toml() (a team's own schema, `--oracle-config`)

model.oracle installs its triggers and observes by this description; kept apart because a
user writes it (a TOML file checked before anything starts) and the oracle only reads it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from psycopg import sql


class OracleError(RuntimeError):
    """The oracle cannot be installed or read here; the message says what to change."""


@dataclass(frozen=True)
class WatchedTable:
    """One table the oracle audits.

    `table` may be schema-qualified ("billing.payments"). `payment_column` links a row to its
    payment id: None for the payments table itself (its id is the payment id) and usually for
    orders (mapped through payments.<payment_order_column> at observe time). Invoices name
    exactly one link: `payment_column` (a column holding the payment id) or `order_column`
    (a column holding the order id, when invoices hang off orders; mapped to the payment
    through payments.<payment_order_column>, as orders are).
    """

    table: str
    done_value: str
    payment_column: str | None = None
    order_column: str | None = None
    id_column: str = "id"
    status_column: str = "status"
    # Columns a target may update on a done row without writing it again (e.g. updated_at).
    ignore_columns: tuple[str, ...] = ()

    def identifier(self) -> sql.Identifier:
        # psycopg is imported here, not above: a Locust worker reads the profile (and so this
        # module) on a load machine with only Locust installed (load.worker).
        from psycopg import sql

        return sql.Identifier(*self.table.split(".", 1))


_LOGICAL = ("payments", "invoices", "orders")


@dataclass(frozen=True)
class OracleConfig:
    payments: WatchedTable
    invoices: WatchedTable
    orders: WatchedTable
    payment_order_column: str = "order_id"  # payments.<col> -> orders.id
    gateway_payment_column: str = "gateway_payment_id"  # payments.<col>: Razorpay's pay_…

    def __post_init__(self) -> None:
        links = (self.invoices.payment_column, self.invoices.order_column)
        if (links[0] is None) == (links[1] is None):
            got = "both" if links[0] is not None else "neither"
            raise OracleError(
                "invoices: set exactly one of invoices.payment_column (the column of the "
                "invoices table holding the payment id; the reference service's is "
                "'payment_id') or invoices.order_column (the column holding the order id, "
                f"when invoices hang off orders); got {got}"
            )
        for logical in ("payments", "orders"):
            if getattr(self, logical).order_column is not None:
                raise OracleError(
                    f"{logical}.order_column: only [invoices] takes order_column "
                    "(payments link to orders through payment_order_column)"
                )

    def watched(self) -> tuple[tuple[str, WatchedTable], ...]:
        return (("payments", self.payments), ("invoices", self.invoices), ("orders", self.orders))

    @classmethod
    def reference(cls) -> OracleConfig:
        """The reference service's schema (service/models.py)."""
        return cls(
            payments=WatchedTable("payments", "captured"),
            invoices=WatchedTable("invoices", "paid", payment_column="payment_id"),
            orders=WatchedTable("orders", "paid"),
        )

    @classmethod
    def from_toml(cls, path: Path) -> OracleConfig:
        """Read a team's schema description.

        The file holds `[payments]`, `[invoices]` and `[orders]` tables (each with `table`,
        `done_value` and optionally `id_column`, `status_column`, `payment_column`,
        `ignore_columns`; `[invoices]` has exactly one of `payment_column` and `order_column`)
        and optionally top-level `payment_order_column` / `gateway_payment_column`; in a
        pyproject.toml the same lives under `[tool.payrace.oracle]`. Unknown keys are errors,
        so a typo cannot silently fall back to a default.
        """
        try:
            doc: Mapping[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise OracleError(f"cannot read oracle config {path}: {exc}") from exc
        except UnicodeDecodeError:
            raise OracleError(
                f"cannot read oracle config {path}: it is not UTF-8 text; give a TOML file"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise OracleError(f"{path} is not valid TOML: {exc}") from exc
        where = str(path)
        if "tool" in doc or "project" in doc:  # a pyproject.toml
            tool = doc.get("tool")
            payrace = tool.get("payrace") if isinstance(tool, dict) else None
            if not isinstance(payrace, dict) or "oracle" not in payrace:
                raise OracleError(f"{where}: no [tool.payrace.oracle] table")
            doc = _table(payrace, "oracle", f"{where}: tool.payrace")
            where = f"{where}: tool.payrace.oracle"
        return cls._from_mapping(doc, where)

    @classmethod
    def _from_mapping(cls, doc: Mapping[str, Any], where: str) -> OracleConfig:
        links = ("payment_order_column", "gateway_payment_column")
        _no_unknown_keys(doc, (*_LOGICAL, *links), where)
        payments, invoices, orders = (
            _watched(_table(doc, name, where), f"{where}: [{name}]") for name in _LOGICAL
        )
        columns = {k: _string(doc, k, where) for k in links if k in doc}
        try:
            return cls(payments, invoices, orders, **columns)
        except OracleError as exc:
            raise OracleError(f"{where}: {exc}") from None

    def to_toml(self) -> str:
        """The TOML that from_toml() reads back into an equal config."""
        lines = [
            f"payment_order_column = {_toml_str(self.payment_order_column)}",
            f"gateway_payment_column = {_toml_str(self.gateway_payment_column)}",
        ]
        for name, wt in self.watched():
            lines += ["", f"[{name}]"]
            for f in fields(WatchedTable):
                value = getattr(wt, f.name)
                if isinstance(value, tuple):
                    lines.append(f"{f.name} = [{', '.join(_toml_str(v) for v in value)}]")
                elif value is not None:
                    lines.append(f"{f.name} = {_toml_str(value)}")
        return "\n".join(lines) + "\n"


def _toml_str(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _table(doc: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    if key not in doc:
        raise OracleError(f"{where}: missing table [{key}]")
    value = doc[key]
    if not isinstance(value, dict):
        raise OracleError(f"{where}: '{key}' must be a table, got {type(value).__name__}")
    return value


def _string(doc: Mapping[str, Any], key: str, where: str) -> str:
    value = doc[key]
    if not isinstance(value, str) or not value:
        raise OracleError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _no_unknown_keys(doc: Mapping[str, Any], known: Collection[str], where: str) -> None:
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise OracleError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")


def _watched(doc: Mapping[str, Any], where: str) -> WatchedTable:
    known = [f.name for f in fields(WatchedTable)]
    _no_unknown_keys(doc, known, where)
    for required in ("table", "done_value"):
        if required not in doc:
            raise OracleError(f"{where}: missing key '{required}'")
    ignore = doc.get("ignore_columns", [])
    if not isinstance(ignore, list) or not all(isinstance(c, str) and c for c in ignore):
        raise OracleError(
            f"{where}: 'ignore_columns' must be a list of column names, got {ignore!r}"
        )
    strings = {k: _string(doc, k, where) for k in known if k in doc and k != "ignore_columns"}
    return WatchedTable(**strings, ignore_columns=tuple(ignore))
