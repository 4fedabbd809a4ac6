"""Teams' own schemas, unlike the reference service's. Shared by the oracle's tests (audited
for real) and the config's tests (read from TOML).

TEAM_SCHEMA / TEAM_TOML     other table and column names, a schema-qualified table, a quoted
                            column, orders linked through payments
SHOP_SCHEMA / SHOP_TOML     invoices that hang off orders (shop.receipt.cart_no is a foreign
                            key to the orders table), linked with [invoices] order_column
"""

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

SHOP_SCHEMA = """
CREATE SCHEMA shop;
CREATE TABLE shop.cart (cart_no bigint PRIMARY KEY, phase text NOT NULL);
CREATE TABLE shop.charge (
    charge_no bigint PRIMARY KEY, cart_no bigint NOT NULL REFERENCES shop.cart,
    rzp_id text UNIQUE, phase text NOT NULL);
CREATE TABLE shop.receipt (
    receipt_no bigint PRIMARY KEY, cart_no bigint NOT NULL REFERENCES shop.cart,
    phase text NOT NULL, paid_at timestamptz);
"""

SHOP_TOML = """
payment_order_column = "cart_no"
gateway_payment_column = "rzp_id"

[payments]
table = "shop.charge"
id_column = "charge_no"
status_column = "phase"
done_value = "captured"

[invoices]
table = "shop.receipt"
id_column = "receipt_no"
status_column = "phase"
done_value = "paid"
order_column = "cart_no"

[orders]
table = "shop.cart"
id_column = "cart_no"
status_column = "phase"
done_value = "paid"
"""
