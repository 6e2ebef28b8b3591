"""The example DAGs run as people run them: triggered by hand with no logical date, and scheduled.

Airflow 3's Trigger button creates a run without a logical date (``dag.test(logical_date=None)``
makes the same kind of run): no ``data_interval_*`` in its templates. Every example bills whole
UTC days either way, and takes no alert branch after a complete billing.
"""

from __future__ import annotations

import pytest

from tests.conftest import add_rows, at, run_dag, task_states, today, xcoms

pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("airflow_db")]


@pytest.fixture
def usage(usage_db):
    """Usage of three whole past days, plus rows of today and of four days ago that no window holds."""
    rows = [(f"cus_{c}", 10 * c + d, at(-d, 3_600 * c + 59)) for c in range(1, 5) for d in (1, 2, 3)]
    rows += [("cus_1", 1, at(-1, 86_399)), ("cus_2", 2, at(-3, 0))]  # the first and last second
    add_rows(usage_db, [*rows, ("cus_1", 1_000, at(0, 1)), ("cus_3", 2_000, at(-4, 86_399))])
    return rows


def figures_of(rows, days):
    wanted = {today().add(days=-d).to_date_string() for d in days}
    out: dict[tuple[str, str], int] = {}
    for customer, value, used_at in rows:
        if used_at[:10] in wanted:
            out[(customer, used_at[:10])] = out.get((customer, used_at[:10]), 0) + value
    return out


def test_a_manual_run_of_the_nightly_dag_bills_the_last_whole_day(secret_server, usage):
    dag_run = run_dag("example_stripe_daily_usage", logical_date=None)

    assert dag_run.logical_date is None
    states = task_states(dag_run)
    assert (states["bill"], states["all_billed"], states["alert_billing_team"]) == (
        "success",
        "success",
        "skipped",
    )
    assert secret_server.ledger.figures("ai_tokens_used") == figures_of(usage, [1])


def test_a_manual_run_of_the_meter_event_dag_records_at_the_trigger_time(secret_server):
    secret_server.ledger.add_meter("support_minutes")
    dag_run = run_dag("example_stripe_meter_event", logical_date=None, run_conf={"minutes": 7})

    assert task_states(dag_run)["on_recorded"] == "success"
    [event] = secret_server.ledger.accepted()
    assert (event.event_name, event.payload["value"]) == ("support_minutes", "7")
    assert abs(event.timestamp - dag_run.run_after.timestamp()) < 1


@pytest.mark.parametrize(
    "logical_date",
    [None, "midday"],
    ids=["manual-no-logical-date", "logical-date-inside-a-day"],
)
def test_the_reconcile_dags_compare_whole_days_and_raise_no_false_alarm(secret_server, usage, logical_date):
    moment = None if logical_date is None else today().add(hours=13, minutes=7)
    conf = {"settle_seconds": 0}

    checked = run_dag("example_stripe_reconcile", logical_date=moment, run_conf=conf)

    states = task_states(checked)
    assert (states["bill"], states["reconcile"], states["all_billed"]) == ("success", "success", "success")
    assert states["alert_billing_team"] == "skipped"
    counts = xcoms(checked, "reconcile")["counts"]
    assert counts["over"] == counts["missing"] == counts["short"] == 0
    assert counts["ok"] == len(figures_of(usage, [1, 2, 3]))
    assert secret_server.ledger.figures("ai_tokens_used") == figures_of(usage, [1, 2, 3])

    deferred = run_dag("example_stripe_reconcile_deferrable", logical_date=moment, run_conf=conf)

    states = task_states(deferred)
    assert (states["reconcile"], states["all_billed"], states["alert_billing_team"]) == (
        "success",
        "success",
        "skipped",
    )


def test_a_manual_run_of_the_asset_scheduled_dag_has_nothing_to_finalize(secret_server):
    dag_run = run_dag("example_stripe_after_billing", logical_date=None)

    assert task_states(dag_run)["finalize_invoices"] == "success"
    assert xcoms(dag_run, "finalize_invoices")["return_value"] == []


def test_a_manual_run_of_the_backfill_bills_its_default_range(secret_server, usage):
    dag_run = run_dag("example_stripe_usage_backfill", logical_date=None)

    assert dag_run.logical_date is None
    assert task_states(dag_run)["bill_range"] == "success"
