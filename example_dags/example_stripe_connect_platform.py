"""A Connect platform bills every connected account's usage from one usage table, each night.

One mapped task instance per connected account (Airflow's dynamic task mapping, so the accounts
spread over the workers): each acts for its account (Stripe's ``Stripe-Account`` header), reads
only that account's rows, and has its own meter, marks, look-ups and meter Asset. An account the
platform's key can no longer reach fails its own instance, named by the account in the UI and in
the error, while the others bill as usual.

Triggered by hand (no logical date), it bills the last whole UTC day before the trigger.
The usage table lives in SQLite here (connection ``usage_db``); any common-sql database works.
"""

from __future__ import annotations

import pendulum
from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator
from airflow.sdk import DAG, task

try:
    from airflow.sdk import CronDataIntervalTimetable
except ImportError:  # Airflow 3.1
    from airflow.timetables.interval import CronDataIntervalTimetable

from airflow_provider_stripe_meter.macros import BILLING_MACROS
from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator

# [START howto_connect_platform_dag]
WINDOW = (
    "datetime(used_at) >= datetime('{{ billing_window().start }}') "
    "AND datetime(used_at) < datetime('{{ billing_window().end }}')"
)

with DAG(
    dag_id="example_stripe_connect_platform",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    user_defined_macros=BILLING_MACROS,
    tags=["example", "stripe", "connect"],
) as dag:
    accounts = SQLExecuteQueryOperator(
        task_id="connected_accounts",
        conn_id="usage_db",
        sql=f"SELECT DISTINCT account FROM platform_usage WHERE {WINDOW} ORDER BY account",
    )

    @task
    def account_ids(rows: list[list[str]]) -> list[str]:
        return [row[0] for row in rows]

    StripeMeterEventBatchOperator.partial(
        task_id="bill",
        event_name="ai_tokens_used",
        sql_conn_id="usage_db",
        sql=f"SELECT customer_id, tokens, used_at FROM platform_usage WHERE account = :account AND {WINDOW}",
        # Each instance reads its own account's rows, and is named by its account in the UI.
        parameters={"account": "{{ task.stripe_account }}"},
        map_index_template="{{ task.stripe_account }}",
    ).expand(stripe_account=account_ids(accounts.output))
# [END howto_connect_platform_dag]
