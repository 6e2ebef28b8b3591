"""Record one templated usage event in Stripe and branch on whether Stripe accepted it.

The event bills the minutes of a support call on its own meter (``support_minutes``): one
sender per meter and customer, as the guarantees assume; the AI tokens are billed by the
nightly batch (``example_stripe_daily_usage``) and nothing else.

Run it against the local server (no Stripe account needed) with ``./dev demo`` from the
README, or against Stripe with a ``stripe_default`` connection holding your API key. A manual
run (no logical date) records the event at the moment it was triggered.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param, task

from airflow_provider_stripe_meter.macros import BILLING_MACROS
from airflow_provider_stripe_meter.operators.meter_event import StripeMeterEventOperator

with DAG(
    dag_id="example_stripe_meter_event",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={
        "customer_id": Param("cus_demo_acme", type="string"),
        "minutes": Param(45, type="integer"),
    },
    user_defined_macros=BILLING_MACROS,
    tags=["example", "stripe"],
) as dag:

    @task
    def call_minutes(params: dict | None = None) -> int:
        """Stand-in for the query that measures usage: the minutes of one support call."""
        assert params is not None
        return int(params["minutes"])

    minutes = call_minutes()

    # [START howto_operator_stripe_meter_event]
    record = StripeMeterEventOperator(
        task_id="record_minutes",
        event_name="support_minutes",
        customer_id="{{ params.customer_id }}",
        value="{{ ti.xcom_pull(task_ids='call_minutes') }}",
        # Usage belongs to the run's data interval (a manual run: when it was triggered), not
        # to the moment the task happens to run.
        timestamp="{{ billing_window().as_of }}",
    )
    # [END howto_operator_stripe_meter_event]

    # [START howto_branch_on_success]
    @task.branch
    def recorded(success: bool) -> str:
        return "on_recorded" if success else "on_rejected"

    on_recorded = EmptyOperator(task_id="on_recorded")
    on_rejected = EmptyOperator(task_id="on_rejected")
    done = EmptyOperator(task_id="done", trigger_rule="none_failed_min_one_success")

    minutes >> record
    recorded(record.output["success"]) >> [on_recorded, on_rejected] >> done
    # [END howto_branch_on_success]
