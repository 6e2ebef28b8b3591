"""Bill yesterday's AI token usage every night at 00:00 UTC, exactly once, and branch on the outcome.

Triggered by hand (no logical date), it bills the last whole UTC day before the trigger.

The usage table lives in SQLite here (connection ``usage_db``); any common-sql database works.
"""

from __future__ import annotations

# [START howto_daily_usage_dag]
import pendulum
from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, task

try:
    from airflow.sdk import CronDataIntervalTimetable
except ImportError:  # Airflow 3.1
    from airflow.timetables.interval import CronDataIntervalTimetable

from airflow_provider_stripe_meter.macros import BILLING_MACROS
from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator

with DAG(
    dag_id="example_stripe_daily_usage",
    # A data-interval timetable: the run at 00:00 UTC covers the previous UTC day.
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # billing_window(): whole UTC days, also for a manual run (which has no data interval).
    user_defined_macros=BILLING_MACROS,
    tags=["example", "stripe"],
) as dag:
    # Any common-sql connection: PostgreSQL, Snowflake, BigQuery, SQLite (here). The window's
    # bounds render as '2026-01-01 00:00:00+00:00'; compare them as your warehouse compares
    # timestamps (a timestamptz column in PostgreSQL takes them as they are).
    usage = SQLExecuteQueryOperator(
        task_id="usage",
        conn_id="usage_db",
        sql="SELECT customer_id, tokens, used_at FROM usage "
        "WHERE used_at >= '{{ billing_window().start }}' AND used_at < '{{ billing_window().end }}'",
    )
    bill = StripeMeterEventBatchOperator(
        task_id="bill",
        event_name="ai_tokens_used",
        # Every row of the query goes through XCom (a row of Airflow's metadata database): fine
        # for thousands of rows. For more, give the operator the query itself (sql=, sql_conn_id=):
        # it streams the rows in chunks and keeps only counts and samples in XCom.
        rows=usage.output,
        # The ledger of every event sent: a table in a database the team owns.
        ledger_conn_id="usage_db",
        # An invalid row or usage held (an invoice already final, a customer Stripe does not
        # know) bills the rest and returns success=False with the task green, for the branch
        # below; fail_on_error=True fails the task (red) instead.
    )

    # success is False unless every customer-day of the source is billed; the task log's line
    # then starts "NOT A SUCCESS:" with the reasons.
    @task.branch
    def billed(success: bool) -> str:
        return "all_billed" if success else "alert_billing_team"

    all_billed = EmptyOperator(task_id="all_billed")
    alert = EmptyOperator(task_id="alert_billing_team")
    done = EmptyOperator(task_id="done", trigger_rule="none_failed_min_one_success")
    billed(bill.output["success"]) >> [all_billed, alert] >> done
# [END howto_daily_usage_dag]
