"""DAGs the reconciliation and correction tests run with dag.test()."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, task

from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator
from airflow_provider_stripe_meter.operators.meter_event_correction import (
    StripeMeterEventCancelOperator,
    StripeMeterTopUpOperator,
)
from airflow_provider_stripe_meter.sensors.meter_reconcile import StripeMeterReconcileSensor

START = pendulum.datetime(2026, 1, 1, tz="UTC")
SOURCE_SQL = (
    "SELECT customer_id, tokens, used_at FROM usage "
    "WHERE date(used_at) >= date('now', '-{{ params.days }} days')"
)


def reconcile_sensor(**kwargs) -> StripeMeterReconcileSensor:
    """The sensor every reconcile test DAG runs: the last 3 days of the usage table."""
    return StripeMeterReconcileSensor(
        task_id="reconcile",
        event_name="ai_tokens_used",
        sql=SOURCE_SQL,
        sql_conn_id="usage_db",
        # The tests move the sensor's clock on instead of waiting (see fast_clock).
        poke_interval=0,
        settle_timeout=timedelta(seconds=3),
        max_rps=200,
        **kwargs,
    )


with DAG(
    "t_reconcile", schedule=None, start_date=START, params={"days": 3, "settle_seconds": 3}
) as reconcile_dag:
    reconcile = reconcile_sensor()

    @task.branch
    def route(counts: dict) -> list[str]:
        chosen = []
        if counts["missing"] or counts["short"]:
            chosen.append("top_up")
        if counts["over"] or counts["customer_unknown"]:
            chosen.append("alert")
        return chosen or ["all_good"]

    top_up = StripeMeterTopUpOperator(
        task_id="top_up",
        reconciliation=reconcile.output["lines"],
        event_name="ai_tokens_used",
        ledger_conn_id="usage_db",
        max_rps=200,
    )
    route(reconcile.output["counts"]) >> [
        top_up,
        EmptyOperator(task_id="alert"),
        EmptyOperator(task_id="all_good"),
    ]

for deferrable in (False, True):
    # The sensor alone, waiting in reschedule mode or in the triggerer: the same report either way.
    with DAG(
        "t_reconcile_deferred" if deferrable else "t_reconcile_rescheduled",
        schedule=None,
        start_date=START,
        params={"days": 3},
    ):
        reconcile_sensor(deferrable=deferrable)

with DAG("t_bill_day", schedule=None, start_date=START, params={"day": "2026-01-01"}) as bill_day_dag:
    StripeMeterEventBatchOperator(
        task_id="bill",
        event_name="ai_tokens_used",
        sql="SELECT customer_id, tokens, used_at FROM usage WHERE date(used_at) = date('{{ params.day }}')",
        sql_conn_id="usage_db",
        max_rps=200,
    )

with DAG(
    "t_cancel",
    schedule=None,
    start_date=START,
    params={"identifiers": []},
    render_template_as_native_obj=True,
) as cancel_dag:
    StripeMeterEventCancelOperator(
        task_id="cancel",
        event_name="ai_tokens_used",
        identifiers="{{ params.identifiers }}",
        ledger_conn_id="usage_db",
    )

for deferrable in (False, True):
    # A backfill that bills usage older than Stripe's window late, then the reconciliation of it.
    with DAG(
        "t_backfill_reconcile_deferred" if deferrable else "t_backfill_reconcile",
        schedule=None,
        start_date=START,
        params={"days": 45},
    ):
        backfill = StripeMeterEventBatchOperator(
            task_id="bill",
            event_name="ai_tokens_used",
            sql=SOURCE_SQL,
            sql_conn_id="usage_db",
            too_old="bill_at_oldest",
            max_rps=200,
        )
        backfill >> reconcile_sensor(deferrable=deferrable)
