"""DAGs the operator tests run with dag.test()."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, task

from airflow_provider_stripe_meter.operators.meter_event import StripeMeterEventOperator

START = pendulum.datetime(2026, 1, 1, tz="UTC")
PARAMS = {"event_name": "ai_tokens_used", "customer_id": "cus_test_1", "value": "42", "timestamp": ""}

with DAG("t_meter_event_branch", schedule=None, start_date=START, params=PARAMS) as branch_dag:
    record = StripeMeterEventOperator(
        task_id="record",
        event_name="{{ params.event_name }}",
        customer_id="{{ params.customer_id }}",
        value="{{ params.value }}",
        timestamp="{{ params.timestamp }}",
    )

    @task.branch
    def choose(success: bool) -> str:
        return "on_success" if success else "on_failure"

    choose(record.output["success"]) >> [
        EmptyOperator(task_id="on_success"),
        EmptyOperator(task_id="on_failure"),
    ]

with DAG("t_meter_event_retry", schedule=None, start_date=START, params=PARAMS) as retry_dag:
    StripeMeterEventOperator(
        task_id="record",
        event_name="{{ params.event_name }}",
        customer_id="{{ params.customer_id }}",
        value="{{ params.value }}",
        retries=3,
        retry_delay=timedelta(seconds=0),
    )

with DAG("t_meter_event_fail_on_error", schedule=None, start_date=START, params=PARAMS) as strict_dag:
    StripeMeterEventOperator(
        task_id="record",
        event_name="{{ params.event_name }}",
        customer_id="{{ params.customer_id }}",
        value="{{ params.value }}",
        fail_on_error=True,
    ) >> EmptyOperator(task_id="after")

with DAG("t_meter_event_no_preflight", schedule=None, start_date=START, params=PARAMS) as raw_dag:
    record = StripeMeterEventOperator(
        task_id="record",
        event_name="{{ params.event_name }}",
        customer_id="{{ params.customer_id }}",
        value="{{ params.value }}",
        customer_payload_key="stripe_customer_id",
        preflight=False,
        stripe_account="{{ params.get('account') or '' }}",
    )

    @task.branch
    def choose_raw(success: bool) -> str:
        return "on_success" if success else "on_failure"

    choose_raw(record.output["success"]) >> [
        EmptyOperator(task_id="on_success"),
        EmptyOperator(task_id="on_failure"),
    ]
