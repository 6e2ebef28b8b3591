"""Close billing periods on time: every hour, bill the usage so far, then check each open invoice.

A customer's billing period ends at its subscription's anchor, any time of day; its invoice then
stays a draft for the account's finalization grace period (1 hour by default) and is locked. This
DAG runs hourly, so usage before a period's end reaches the closing invoice inside the grace
period, and the invoice check compares every draft and upcoming invoice with the source before
it locks, naming the deadline of each one that differs.

The usage table lives in SQLite here (connection ``usage_db``, also the ledger's database); any
common-sql database works. A manual run (no logical date) covers the same window up to the trigger.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, task

from airflow_provider_stripe_meter.operators.invoice_check import StripeMeterInvoiceCheckOperator
from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator

# Yesterday and today so far (UTC): a period that ended since the last run is billed now, and a
# day straddling a period's end is billed in two parts, each on its own invoice.
USAGE_SO_FAR = (
    "SELECT customer_id, tokens, used_at FROM usage "
    "WHERE used_at >= '{{ (dag_run.run_after - macros.timedelta(days=1)).strftime('%Y-%m-%d') }}' "
    "AND used_at < '{{ dag_run.run_after.strftime('%Y-%m-%d %H:%M:%S') }}'"
)

# The invoice check compares whole periods: it reads every row of the periods still open or in
# their grace period (a monthly period and its grace fit in the last 40 days).
OPEN_PERIODS = (
    "SELECT customer_id, tokens, used_at FROM usage "
    "WHERE used_at >= '{{ (dag_run.run_after - macros.timedelta(days=40)).strftime('%Y-%m-%d') }}' "
    "AND used_at < '{{ dag_run.run_after.strftime('%Y-%m-%d %H:%M:%S') }}'"
)

# [START howto_close_periods]
with DAG(
    dag_id="example_stripe_close_periods",
    schedule="5 * * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["example", "stripe"],
) as dag:
    bill = StripeMeterEventBatchOperator(
        task_id="bill",
        event_name="ai_tokens_used",
        sql=USAGE_SO_FAR,
        sql_conn_id="usage_db",
        # "hold" (the default): usage whose invoice is already final, whose subscription ended,
        # or with no subscription is not sent, and is counted under its own outcome.
        billing_periods="hold",
    )
    check = StripeMeterInvoiceCheckOperator(
        task_id="check_invoices", event_name="ai_tokens_used", sql=OPEN_PERIODS, sql_conn_id="usage_db"
    )

    @task.branch
    def invoices_right(billed: bool, invoices: bool) -> str:
        return "invoices_match" if billed and invoices else "alert_billing_team"

    done = EmptyOperator(task_id="done", trigger_rule="none_failed_min_one_success")
    bill >> check
    (
        invoices_right(bill.output["success"], check.output["success"])
        >> [EmptyOperator(task_id="invoices_match"), EmptyOperator(task_id="alert_billing_team")]
        >> done
    )
# [END howto_close_periods]
