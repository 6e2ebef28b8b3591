"""Deleted rows are corrections inside what a run covers: real Airflow, the real SDK, the local server."""

from __future__ import annotations

import sqlite3

import pendulum
import pytest

from airflow_provider_stripe_meter.exceptions import StripeParameterError
from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator
from tests.conftest import add_rows, at, run_dag, source_totals, today, xcoms

pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("airflow_db")]


def test_a_rerun_takes_off_a_deleted_newest_row_and_leaves_customers_it_does_not_read(
    secret_server, usage_db, ledger_db
):
    # The default coverage (billing_window()'s day) corrects the customers the query returned:
    # a customer with no rows left is left alone (a DAG sharded by customer shares the ledger);
    # declaring covers= says the query holds every customer.
    add_rows(
        usage_db,
        [
            ("cus_keep", 40, at(-1, 3600)),
            ("cus_refund", 100, at(-1, 7200)),
            ("cus_refund", 50, at(-1, 80000)),  # refunded: its row is deleted below
            ("cus_fraud", 70, at(-1, 9000)),  # a fraudulent account: all its usage is deleted
        ],
    )
    first = xcoms(run_dag("t_batch_daily", logical_date=today()), "bill")
    assert (first["success"], first["sent"]) == (True, 3)
    with sqlite3.connect(usage_db) as con:
        con.execute("DELETE FROM usage WHERE customer_id = 'cus_fraud' OR tokens = 50")

    rerun = xcoms(run_dag("t_batch_daily", logical_date=today()), "bill")

    assert rerun["success"] is True, rerun["samples"]
    where = f"used_at >= '{at(-1, 0)}' AND used_at < '{at(0, 0)}'"
    totals = secret_server.ledger.totals()
    assert source_totals(usage_db, where) == {"cus_keep": 40, "cus_refund": 100}
    assert {c: v for c, v in totals.items() if v} == {"cus_keep": 40, "cus_refund": 100, "cus_fraud": 70}
    assert rerun["covers"]["first_day"] == today().add(days=-1).date().isoformat()
    again = xcoms(run_dag("t_batch_daily", logical_date=today()), "bill")
    assert (again["sent"], again["success"]) == (0, True)


@pytest.mark.parametrize(
    ("covers", "message"),
    [
        (("2026-12-02", "2026-12-01"), "start must be before end"),
        (("yesterday", "today"), "ISO-8601"),
        ("everything", "a pair (start, end)"),
    ],
)
def test_a_bad_coverage_names_the_field_and_the_rule(covers, message):
    op = StripeMeterEventBatchOperator(
        task_id="bill", event_name="ai_tokens_used", rows=[], ledger_conn_id="ledger_db", covers=covers
    )
    context = {"data_interval_end": pendulum.datetime(2026, 12, 3, tz="UTC")}
    with pytest.raises(StripeParameterError, match="covers") as raised:
        op._coverage(context, [], int(pendulum.datetime(2026, 12, 3, 2, tz="UTC").timestamp()))
    assert message in str(raised.value)
