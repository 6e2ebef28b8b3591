"""Check Stripe's summaries against the source from the triggerer: no worker held while Stripe settles.

The reconcile sensor reads the source on a worker, then defers: the triggerer polls Stripe's
meter summaries asynchronously until they agree or the settle time is over, and the task resumes
with the same report as in reschedule mode. Needs a triggerer (``airflow triggerer``), as every
deferrable operator does.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param, task

from airflow_provider_stripe_meter.macros import BILLING_MACROS
from airflow_provider_stripe_meter.sensors.meter_reconcile import StripeMeterReconcileSensor

USAGE_SQL = (
    "SELECT customer_id, tokens, used_at FROM usage "
    "WHERE datetime(used_at) >= datetime('{{ billing_window(3).start }}') "
    "AND datetime(used_at) < datetime('{{ billing_window(3).end }}')"
)

with DAG(
    dag_id="example_stripe_reconcile_deferrable",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"settle_seconds": Param(3600, type="integer", minimum=0)},
    # Whole UTC days whatever the logical date, and for manual runs (no logical date at all).
    user_defined_macros=BILLING_MACROS,
    tags=["example", "stripe"],
) as dag:
    # [START howto_reconcile_deferrable]
    reconcile = StripeMeterReconcileSensor(
        task_id="reconcile",
        event_name="ai_tokens_used",
        sql=USAGE_SQL,
        sql_conn_id="usage_db",
        # Wait in the triggerer: a poll of Stripe's summaries every 5 minutes, up to an hour.
        deferrable=True,
        poke_interval=300,
        settle_timeout="{{ params.settle_seconds }}",
    )
    # [END howto_reconcile_deferrable]

    @task.branch
    def route(success: bool) -> str:
        return "all_billed" if success else "alert_billing_team"

    route(reconcile.output["success"]) >> [
        EmptyOperator(task_id="all_billed"),
        EmptyOperator(task_id="alert_billing_team"),
    ]
