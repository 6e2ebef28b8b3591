"""DAGs the batch operator tests run with dag.test(): SQL task -> batch operator -> branch."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, task

try:
    from airflow.sdk import CronDataIntervalTimetable
except ImportError:  # Airflow 3.1
    from airflow.timetables.interval import CronDataIntervalTimetable

from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator

START = pendulum.datetime(2026, 1, 1, tz="UTC")
DAILY_SQL = (
    "SELECT customer_id, tokens, used_at FROM usage "
    "WHERE datetime(used_at) >= datetime('{{ data_interval_start }}') "
    "AND datetime(used_at) < datetime('{{ data_interval_end }}')"
)


def branch_on(outcome_success):
    @task.branch
    def choose(success: bool) -> str:
        return "billed" if success else "alert"

    choose(outcome_success) >> [EmptyOperator(task_id="billed"), EmptyOperator(task_id="alert")]


with DAG(
    "t_batch_daily",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=START,
    catchup=False,
) as daily_dag:
    usage = SQLExecuteQueryOperator(task_id="usage", conn_id="usage_db", sql=DAILY_SQL)
    bill = StripeMeterEventBatchOperator(
        task_id="bill",
        event_name="ai_tokens_used",
        rows=usage.output,
        ledger_conn_id="ledger_db",
        max_rps=200,
        concurrency=8,
    )
    branch_on(bill.output["success"])

with DAG("t_batch_window", schedule=None, start_date=START, params={"days": 40}) as window_dag:
    bill = StripeMeterEventBatchOperator(
        task_id="bill",
        event_name="ai_tokens_used",
        sql="SELECT customer_id, tokens, used_at FROM usage "
        "WHERE datetime(used_at) >= datetime('now', '-{{ params.days }} days')",
        sql_conn_id="usage_db",
        max_rps=200,
    )
    branch_on(bill.output["success"])

with DAG("t_batch_faults", schedule=None, start_date=START) as faults_dag:
    StripeMeterEventBatchOperator(
        task_id="bill",
        event_name="ai_tokens_used",
        sql="SELECT customer_id, tokens, used_at FROM usage",
        sql_conn_id="usage_db",
        max_rps=120,
        concurrency=12,
        retries=1,
        retry_delay=timedelta(seconds=0),
    )

with DAG("t_batch_stream", schedule=None, start_date=START) as stream_dag:
    StripeMeterEventBatchOperator(
        task_id="bill",
        event_name="ai_tokens_used",
        sql="SELECT customer_id, tokens, used_at FROM usage",
        sql_conn_id="usage_db",
        api="v2_stream",
        max_rps=50,
        # Yesterday counts as fresh (sent without a look at Stripe) at any hour the suite runs.
        identifier_window=timedelta(hours=48),
    )

with DAG("t_batch_postgres", schedule=None, start_date=START) as postgres_dag:
    StripeMeterEventBatchOperator(
        task_id="bill",
        event_name="ai_tokens_used",
        sql="SELECT customer_id, tokens, used_at FROM usage WHERE used_at >= %(since)s",
        parameters={"since": "{{ (data_interval_end - macros.timedelta(days=30)).isoformat() }}"},
        sql_conn_id="usage_pg",
        chunk_size=500,
        max_rps=200,
    )

with DAG("t_batch_postgres_rows", schedule=None, start_date=START) as postgres_rows_dag:
    usage = SQLExecuteQueryOperator(
        task_id="usage",
        conn_id="usage_pg",
        sql="SELECT customer_id, tokens, used_at FROM usage WHERE used_at >= now() - interval '30 days'",
    )
    StripeMeterEventBatchOperator(
        task_id="bill", event_name="ai_tokens_used", rows=usage.output, ledger_conn_id="usage_pg", max_rps=200
    )

with DAG("t_batch_many_meters", schedule=None, start_date=START, params={"rows": []}) as many_dag:

    @task
    def usage_rows(params: dict | None = None) -> list:
        assert params is not None
        return params["rows"]

    StripeMeterEventBatchOperator(task_id="bill", rows=usage_rows(), ledger_conn_id="ledger_db", max_rps=200)

# The same query aggregated in the database (the default for sql=) and on the worker, and a
# query that cannot be aggregated in SQL (naive timestamps read in another zone) forced to.
for dag_id, where, zone in (
    ("t_batch_in_database", "database", "UTC"),
    ("t_batch_on_worker", "worker", "UTC"),
    ("t_batch_database_refused", "database", "Europe/Paris"),
):
    with DAG(dag_id, schedule=None, start_date=START):
        StripeMeterEventBatchOperator(
            task_id="bill",
            event_name="ai_tokens_used",
            sql="SELECT customer_id, tokens, used_at FROM usage WHERE customer_id <> ?",
            parameters=["cus_excluded"],
            sql_conn_id="usage_db",
            aggregate_in=where,
            naive_timezone=zone,
            max_rps=200,
            retries=2,
        )
