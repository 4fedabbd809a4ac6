"""model.watched: a team's schema described in TOML, read back exactly, every mistake named."""

from __future__ import annotations

from pathlib import Path

import pytest
from team_schema import SHOP_TOML, TEAM_TOML

from payrace.harness.model.watched import OracleConfig, OracleError, WatchedTable

REFERENCE = OracleConfig.reference()


def test_from_toml_round_trips(tmp_path: Path) -> None:
    team, shop = tmp_path / "team.toml", tmp_path / "shop.toml"
    team.write_text(TEAM_TOML)
    shop.write_text(SHOP_TOML)
    for config in (REFERENCE, OracleConfig.from_toml(team), OracleConfig.from_toml(shop)):
        path = tmp_path / "oracle.toml"
        path.write_text(config.to_toml())
        assert OracleConfig.from_toml(path) == config
    assert OracleConfig.from_toml(team).invoices.status_column == "Bill State"
    invoices = OracleConfig.from_toml(shop).invoices
    assert (invoices.payment_column, invoices.order_column) == (None, "cart_no")
    assert 'order_column = "cart_no"' in OracleConfig.from_toml(shop).to_toml()


def test_from_toml_reads_tool_payrace_oracle_of_a_pyproject(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    body = REFERENCE.to_toml().replace("[payments]", "[tool.payrace.oracle.payments]")
    body = body.replace("[invoices]", "[tool.payrace.oracle.invoices]")
    body = body.replace("[orders]", "[tool.payrace.oracle.orders]")
    links, tables = body.split("\n\n", 1)
    path.write_text(f'[project]\nname = "shop"\n\n[tool.payrace.oracle]\n{links}\n\n{tables}')
    assert OracleConfig.from_toml(path) == REFERENCE
    path.write_text('[project]\nname = "shop"\n')
    with pytest.raises(OracleError, match=r"pyproject\.toml: no \[tool\.payrace\.oracle\] table"):
        OracleConfig.from_toml(path)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('done_value = "settled"\n', "", r"\[payments\]: missing key 'done_value'"),
        ('status_column = "state"\ndone', 'status_colum = "state"\ndone', r"\['status_colum'\]"),
        ("[orders]", "[order]", r"unknown key\(s\) \['order'\]"),
        ('done_value = "cleared"', "done_value = 3", r"'done_value' must be a non-empty string"),
        (
            'payment_column = "charge_no"\n',
            "",
            r"oracle\.toml: invoices: set exactly one of invoices\.payment_column .* or "
            r"invoices\.order_column .*; got neither",
        ),
        (
            'payment_column = "charge_no"\n',
            'payment_column = "charge_no"\norder_column = "charge_no"\n',
            r"invoices\.payment_column .* invoices\.order_column .*; got both",
        ),
        (
            'id_column = "purchase_no"\n',
            'id_column = "purchase_no"\norder_column = "purchase_no"\n',
            r"orders\.order_column: only \[invoices\] takes order_column",
        ),
        ('["touched_at"]', '"touched_at"', r"\[payments\]: 'ignore_columns' must be a list"),
        ("[payments]", "[payments", r"not valid TOML"),
    ],
)
def test_from_toml_says_which_key_is_wrong(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    assert old in TEAM_TOML
    path = tmp_path / "oracle.toml"
    path.write_text(TEAM_TOML.replace(old, new, 1))
    with pytest.raises(OracleError, match=message):
        OracleConfig.from_toml(path)


def test_from_toml_names_a_missing_table(tmp_path: Path) -> None:
    path = tmp_path / "oracle.toml"
    path.write_text(TEAM_TOML.split("[orders]")[0])
    with pytest.raises(OracleError, match=r"oracle\.toml: missing table \[orders\]"):
        OracleConfig.from_toml(path)


def test_from_toml_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(OracleError, match=r"cannot read oracle config .*nope\.toml"):
        OracleConfig.from_toml(tmp_path / "nope.toml")


def test_exactly_one_invoice_link_is_checked_when_built_in_code() -> None:
    invoice = WatchedTable("invoices", "paid", payment_column="payment_id", order_column="o")
    with pytest.raises(OracleError, match=r"payment_column.*order_column.*got both"):
        OracleConfig(REFERENCE.payments, invoice, REFERENCE.orders)
    linked = WatchedTable("invoices", "paid", order_column="order_id")
    assert OracleConfig(REFERENCE.payments, linked, REFERENCE.orders).invoices == linked
