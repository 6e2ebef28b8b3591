"""Bill a range of past days in one run: what Stripe's 35-day window means for a backfill.

Trigger with ``{"from_date": "2026-10-15", "to_date": "2026-11-24"}``, as often as you like.
Every day in the range is looked up in Stripe's meter summaries first (one request per
customer), so a day the nightly DAG billed, or an earlier backfill, is left alone however long
ago that was; late rows are billed as the difference only, once. Rows older than 35 days (less
a one-hour safety margin) cannot be billed on their own day any more: they are skipped, counted
and listed in the ``samples`` XCom, and the run branches to ``report_unbillable_usage``
(``too_old="bill_at_oldest"`` would bill them at the oldest instant Stripe accepts instead).
Run it first with ``dry_run=True`` to see what it would do.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param, task

from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator

with DAG(
    dag_id="example_stripe_usage_backfill",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={
        "from_date": Param("2026-10-15", type="string", format="date"),
        "to_date": Param("2026-11-24", type="string", format="date"),
    },
    tags=["example", "stripe"],
) as dag:
    # [START howto_backfill_window]
    bill = StripeMeterEventBatchOperator(
        task_id="bill_range",
        event_name="ai_tokens_used",
        # The operator runs the query itself and streams the rows in chunks.
        sql="SELECT customer_id, tokens, used_at FROM usage "
        "WHERE date(used_at) >= date('{{ params.from_date }}') "
        "AND date(used_at) < date('{{ params.to_date }}')",
        sql_conn_id="usage_db",
    )

    @task.branch
    def check(success: bool) -> str:
        # success is False when any row was skipped (too old), invalid, rejected or failed.
        return "all_billed" if success else "report_unbillable_usage"

    # [END howto_backfill_window]

    check(bill.output["success"]) >> [
        EmptyOperator(task_id="all_billed"),
        EmptyOperator(task_id="report_unbillable_usage"),
    ]
