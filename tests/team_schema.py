"""A team's own schema, unlike the reference service's: other table and column names, a
schema-qualified table, a quoted column, orders linked through payments. Shared by the
oracle's tests (audited for real) and the config's tests (read from TOML)."""

TEAM_SCHEMA = """
CREATE SCHEMA billing;
CREATE TABLE billing.purchase (purchase_no bigint PRIMARY KEY, state text NOT NULL);
CREATE TABLE billing.charge (
    charge_no bigint PRIMARY KEY, purchase_no bigint REFERENCES billing.purchase,
    rzp_id text UNIQUE, state text NOT NULL, touched_at timestamptz);
CREATE TABLE billing.bill (bill_no bigint PRIMARY KEY, charge_no bigint REFERENCES billing.charge,
    "Bill State" text NOT NULL);
"""

TEAM_TOML = """
payment_order_column = "purchase_no"
gateway_payment_column = "rzp_id"

[payments]
table = "billing.charge"
id_column = "charge_no"
status_column = "state"
done_value = "settled"
ignore_columns = ["touched_at"]

[invoices]
table = "billing.bill"
id_column = "bill_no"
status_column = "Bill State"
done_value = "cleared"
payment_column = "charge_no"

[orders]
table = "billing.purchase"
id_column = "purchase_no"
status_column = "state"
done_value = "complete"
"""
