"""DAGs the billing-truth tests run with dag.test(): retries, outages, meter formulas, dry runs."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator

START = pendulum.datetime(2026, 1, 1, tz="UTC")
ALL_USAGE = "SELECT customer_id, tokens, used_at FROM usage"

with DAG("t_truth_resume", schedule=None, start_date=START) as resume_dag:
    # A first try cut off by an outage longer than outage_timeout fails; its retry resumes.
    StripeMeterEventBatchOperator(
        task_id="bill",
        event_name="ai_tokens_used",
        sql=ALL_USAGE,
        sql_conn_id="usage_db",
        max_rps=200,
        concurrency=4,
        outage_timeout=timedelta(seconds=0.5),
        retries=1,
        retry_delay=timedelta(seconds=6),
    )

with DAG("t_truth_outage", schedule=None, start_date=START, params={"api": "v1"}) as outage_dag:
    # Default delivery settings: a 60 s outage must not fail the task.
    StripeMeterEventBatchOperator(
        task_id="bill", event_name="ai_tokens_used", sql=ALL_USAGE, sql_conn_id="usage_db", max_rps=200
    )

with DAG("t_truth_outage_stream", schedule=None, start_date=START) as outage_stream_dag:
    StripeMeterEventBatchOperator(
        task_id="bill",
        event_name="ai_tokens_used",
        sql=ALL_USAGE,
        sql_conn_id="usage_db",
        api="v2_stream",
        max_rps=200,
        # Yesterday counts as fresh (sent without a look at Stripe) at any hour the suite runs.
        identifier_window=timedelta(hours=48),
    )


def rows_dag(dag_id: str, **options) -> DAG:
    """A DAG whose batch task bills the rows passed in the run's conf."""
    with DAG(dag_id, schedule=None, start_date=START, params={"rows": []}) as dag:

        @task
        def usage_rows(params: dict | None = None) -> list:
            assert params is not None
            return params["rows"]

        StripeMeterEventBatchOperator(
            task_id="bill", rows=usage_rows(), ledger_conn_id="ledger_db", max_rps=200, **options
        )
    return dag


rows_v1 = rows_dag("t_truth_rows")
rows_stream = rows_dag("t_truth_rows_stream", api="v2_stream", identifier_window=timedelta(hours=48))
rows_dry = rows_dag("t_truth_rows_dry", dry_run=True)
rows_late = rows_dag("t_truth_rows_late", too_old="bill_at_oldest")
rows_confirm = rows_dag("t_truth_rows_confirm", confirm="summaries")
# Late billing whose delivery gives up quickly in an outage (and is not retried by Airflow).
rows_late_fragile = rows_dag(
    "t_truth_rows_late_fragile", too_old="bill_at_oldest", outage_timeout=timedelta(seconds=0.5)
)
# After the ledger was lost: what Stripe holds is adopted from its summaries first.
rows_adopt = rows_dag("t_truth_rows_adopt", adopt=True)
