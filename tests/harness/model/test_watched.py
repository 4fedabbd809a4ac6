"""model.watched: a team's schema described in TOML, read back exactly, every mistake named."""

from __future__ import annotations

from pathlib import Path

import pytest
from team_schema import TEAM_TOML

from payrace.harness.model.watched import OracleConfig, OracleError

REFERENCE = OracleConfig.reference()


def test_from_toml_round_trips(tmp_path: Path) -> None:
    team = tmp_path / "team.toml"
    team.write_text(TEAM_TOML)
    for config in (REFERENCE, OracleConfig.from_toml(team)):
        path = tmp_path / "oracle.toml"
        path.write_text(config.to_toml())
        assert OracleConfig.from_toml(path) == config
    assert OracleConfig.from_toml(team).invoices.status_column == "Bill State"


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
        ('payment_column = "charge_no"\n', "", r"invoices\.payment_column is required"),
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
