"""The capture, twice, side by side: as first shipped (SHOP_VARIANT=buggy) and fixed.

    Charge            what a capture reads: the charge and its purchase
    read_charge()     that read; with lock=True, SELECT ... FOR UPDATE OF the charge
    settle_buggy()    read, check, capture, write: a second request reads between this one's
                      read and its commit, also sees 'created', and settles the bill again
    settle_fixed()    the same steps with the charge locked by the read: a second request
                      waits there, then sees 'captured' and returns early
    FLOWS             the two by SHOP_VARIANT

The client callback and every webhook call the variant's flow. `capture` is the gateway
call the callback and payment.authorized make between the check and the writes (None for
payment.captured and order.paid: Razorpay has captured already). Both flows write charge ->
bill -> purchase, one order for every request, so the fixed flow cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from psycopg import Connection


class Charge(NamedTuple):
    id: int
    state: str  # created | captured
    purchase_id: int
    razorpay_order_id: str
    amount: int
    currency: str


Capture = Callable[[Charge], None]
Settle = Callable[[Connection, int, str, Capture | None], bool]

_READ = """
SELECT c.id, c.state, c.purchase_id, p.razorpay_order_id, p.amount, p.currency
FROM shop.charges c JOIN shop.purchases p ON p.id = c.purchase_id
WHERE c.id = %s"""


class UnknownCharge(LookupError):
    pass


def read_charge(conn: Connection, charge_id: int, *, lock: bool = False) -> Charge | None:
    # OF c: the charge row is the one lock; the purchase row is locked later, when written.
    row = conn.execute(_READ + (" FOR UPDATE OF c" if lock else ""), (charge_id,)).fetchone()
    return Charge(*row) if row is not None else None


def settle_buggy(
    conn: Connection, charge_id: int, payment_id: str, capture: Capture | None
) -> bool:
    """True when this request settled the charge, False when it found it captured."""
    with conn.transaction():
        charge = read_charge(conn, charge_id)  # a plain read: nothing stops a second reader
        if charge is None:
            raise UnknownCharge(charge_id)
        if charge.state == "captured":  # looks idempotent; both racers pass it
            return False
        if capture is not None:
            capture(charge)
        _write(conn, charge, payment_id)
        return True


def settle_fixed(
    conn: Connection, charge_id: int, payment_id: str, capture: Capture | None
) -> bool:
    """True when this request settled the charge, False when it found it captured."""
    with conn.transaction():
        charge = read_charge(conn, charge_id, lock=True)  # a second request waits here ...
        if charge is None:
            raise UnknownCharge(charge_id)
        if charge.state == "captured":  # ... and, once the first commits, returns here
            return False
        if capture is not None:
            capture(charge)
        _write(conn, charge, payment_id)
        return True


def _write(conn: Connection, charge: Charge, payment_id: str) -> None:
    """Charge, then bill, then purchase: the one lock order of every capture."""
    conn.execute(
        "UPDATE shop.charges SET state = 'captured', razorpay_payment_id = %s,"
        " updated_at = now() WHERE id = %s",
        (payment_id, charge.id),
    )
    conn.execute(
        "UPDATE shop.bills SET state = 'settled', settled_at = now() WHERE purchase_id = %s",
        (charge.purchase_id,),
    )
    conn.execute("UPDATE shop.purchases SET state = 'paid' WHERE id = %s", (charge.purchase_id,))


FLOWS: dict[str, Settle] = {"buggy": settle_buggy, "fixed": settle_fixed}
