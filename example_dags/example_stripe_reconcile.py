"""Close the loop: bill yesterday, check Stripe's summaries against the source, correct or alert.

A 200 from Stripe means *accepted*, not *billed*: unknown customers and late rows surface only
when Stripe's meter summaries are compared with the source, which this DAG does every night.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param, task

try:
    from airflow.sdk import CronDataIntervalTimetable
except ImportError:  # Airflow 3.1
    from airflow.timetables.interval import CronDataIntervalTimetable

from airflow_provider_stripe_meter.macros import BILLING_MACROS
from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator
from airflow_provider_stripe_meter.operators.meter_event_correction import StripeMeterTopUpOperator
from airflow_provider_stripe_meter.sensors.meter_reconcile import StripeMeterReconcileSensor

# The last 3 whole UTC days: yesterday, plus late rows for the two days before (a manual run:
# the 3 days before the day it was triggered on).
USAGE_SQL = (
    "SELECT customer_id, tokens, used_at FROM usage "
    "WHERE datetime(used_at) >= datetime('{{ billing_window(3).start }}') "
    "AND datetime(used_at) < datetime('{{ billing_window(3).end }}')"
)

with DAG(
    dag_id="example_stripe_reconcile",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"settle_seconds": Param(3600, type="integer", minimum=0)},
    # Whole UTC days whatever the logical date, and for manual runs (no logical date at all).
    user_defined_macros=BILLING_MACROS,
    tags=["example", "stripe"],
) as dag:
    # [START howto_reconcile]
    bill = StripeMeterEventBatchOperator(
        task_id="bill",
        event_name="ai_tokens_used",
        sql=USAGE_SQL,
        sql_conn_id="usage_db",
    )
    reconcile = StripeMeterReconcileSensor(
        task_id="reconcile",
        event_name="ai_tokens_used",
        sql=USAGE_SQL,
        sql_conn_id="usage_db",
        # Stripe's summaries are eventually consistent: re-check every 5 minutes for up to an
        # hour, giving the worker slot back in between (reschedule mode).
        poke_interval=300,
        settle_timeout="{{ params.settle_seconds }}",
    )

    @task.branch
    def route(counts: dict) -> list[str]:
        chosen = []
        if counts["missing"] or counts["short"]:
            chosen.append("top_up_late_usage")  # safe to automate: differences only, never twice
        if counts["over"] or counts["customer_unknown"]:
            chosen.append("alert_billing_team")  # needs a person: cancel, credit or fix the customer
        return chosen or ["all_billed"]

    top_up = StripeMeterTopUpOperator(
        task_id="top_up_late_usage",
        # The whole result: the top-up reads the full table when the sensor wrote one.
        reconciliation=reconcile.output,
        event_name="ai_tokens_used",
        # The batch operator's ledger: corrections are written there too, so none is sent twice.
        ledger_conn_id="usage_db",
    )
    bill >> reconcile
    route(reconcile.output["counts"]) >> [
        top_up,
        EmptyOperator(task_id="alert_billing_team"),
        EmptyOperator(task_id="all_billed"),
    ]
    # [END howto_reconcile]
