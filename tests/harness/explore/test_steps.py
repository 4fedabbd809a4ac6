"""explore.steps: the step table, the reduction's dependence relation, statements classified.

No database here. That the table matches what the service runs is checked while exploring
(the Scheduler's guard) in tests/harness/explore/test_plan.py's golden scenarios.
"""

from __future__ import annotations

from payrace.harness.explore.scenario import RequestSpec, parse_requests
from payrace.harness.explore.steps import (
    StepClass,
    dependent,
    describe_statement,
    opaque,
    predict,
    statement_class,
)

RC, RR, SR = "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"


def test_the_step_table_reads_the_capture_path() -> None:
    client, webhook, failed = parse_requests(["client", "webhook", "payment.failed"])
    S = StepClass

    def p(spec: RequestSpec, point: str | None, detail: str | None = None, iso: str = RC,
          lock: bool = True) -> StepClass:  # fmt: skip
        return predict(spec, point, detail, isolation=iso, lock_rows=lock)

    assert p(client, None) is S.LOCAL  # nothing shared happens before BEGIN...
    assert p(client, None, iso=RR) is S.READ  # ...except taking the snapshot
    assert p(client, "txn_begun") is S.WRITE  # FOR UPDATE
    assert p(client, "txn_begun", lock=False) is S.READ  # the incident's plain read
    assert p(client, "payment_read", "pending") is S.LOCAL
    assert p(client, "payment_read", "pending", iso=SR) is S.READ
    assert p(webhook, "payment_read", "pending") is S.WRITE  # records the event id
    assert p(client, "status_checked", "pending") is S.LOCAL  # on to gateway_called
    assert p(webhook, "status_checked", "pending") is S.WRITE  # update payment
    assert p(webhook, "status_checked", "repeat") is S.READ
    assert p(failed, "payment_written") is S.READ
    assert p(client, "order_written") is S.LOCAL
    assert p(client, "before_commit") is S.END
    assert p(client, "a_point_added_later") is S.END


def test_only_conflicting_steps_are_dependent() -> None:
    local, read, write, end = StepClass
    for level in (RC, RR, SR):
        assert not dependent(local, end, level)
        assert not dependent(read, read, level)
        assert dependent(write, write, level)
        assert dependent(read, end, level) and dependent(end, write, level)
    # MVCC: a plain read neither sees an uncommitted write nor waits for its lock...
    assert not dependent(read, write, RC) and not dependent(write, read, RR)
    # ...but at SERIALIZABLE the order decides which transaction SSI rolls back.
    assert dependent(read, write, SR)


def test_statements_are_classified_by_what_they_lock() -> None:
    assert statement_class("SELECT payments.id FROM payments WHERE id = $1") is StepClass.READ
    assert statement_class("SELECT * FROM payments WHERE id = $1 FOR UPDATE") is StepClass.WRITE
    assert statement_class("select 1 for no key update") is StepClass.WRITE
    assert statement_class("UPDATE payments SET status=$1") is StepClass.WRITE
    assert statement_class("INSERT INTO webhook_events (event_id) VALUES ($1)") is StepClass.WRITE
    assert (
        describe_statement("SELECT p.id FROM payments p WHERE p.id=$1 FOR UPDATE") == "lock payment"
    )
    assert describe_statement("UPDATE invoices SET status=$1") == "update invoice"
    assert describe_statement("INSERT INTO webhook_events (a) VALUES (1)") == "record event id"
    # An app's schema-qualified tables keep their schema.
    assert describe_statement("SELECT c.state FROM store.charges c FOR UPDATE OF c") == (
        "lock store.charges"
    )
    assert describe_statement("UPDATE store.invoices SET state = 'paid'") == "update store.invoices"


def test_an_apps_steps_are_opaque_so_every_interleaving_is_run() -> None:
    """Code payrace has not read may write, wait and commit anywhere: END at every point,
    so nothing is folded and no two steps are taken to commute."""
    [spec] = parse_requests(["client", "webhook"])[:1]
    for point in (None, "charge_read", "before_commit", "anything"):
        assert opaque(spec, point, "pending") is StepClass.END
    assert dependent(opaque(spec, None, None), opaque(spec, "x", None), "app")
