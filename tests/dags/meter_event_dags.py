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

#: Every kind of bad input, each rendered from a template when the task runs (task id: inputs).
BAD_INPUTS = {
    "empty_event_name": {"event_name": "{{ '' }}"},
    "blank_event_name": {"event_name": "{{ '   ' }}"},
    "long_event_name": {"event_name": "{{ 'e' * 101 }}"},
    "padded_event_name": {"event_name": "{{ ' ai_tokens_used' }}"},
    "empty_customer": {"customer_id": "{{ '' }}"},
    "not_a_customer": {"customer_id": "{{ 'user_42' }}"},
    "decimal_value": {"value": "{{ '12.5' }}"},
    "empty_value": {"value": "{{ '' }}"},
    "word_value": {"value": "{{ 'lots' }}"},
    "sixteen_digits": {"value": "{{ '1' * 16 }}"},
    "long_identifier": {"identifier": "{{ 'i' * 101 }}"},
    "timestamp_too_old": {"timestamp": "{{ (macros.time.time() - 36 * 86400) | int }}"},
    "timestamp_in_future": {"timestamp": "{{ (macros.time.time() + 3600) | int }}"},
    "timestamp_not_a_time": {"timestamp": "{{ 'yesterday' }}"},
    "timestamp_negative": {"timestamp": "{{ '-5' }}"},
}

with DAG("t_meter_event_bad_inputs", schedule=None, start_date=START) as bad_inputs_dag:

    @task.branch
    def route(success: bool, task_id: str) -> str:
        return f"{task_id}_ok" if success else f"{task_id}_not_recorded"

    # A fixed event name makes the meter's Asset the task's own outlet (not the alias).
    fixed = {"fixed_meter_bad_customer": {"event_name": "ai_tokens_used", "customer_id": "user_7"}}
    for task_id, bad in {**BAD_INPUTS, **fixed}.items():
        inputs = {
            "event_name": "{{ 'ai_tokens_used' }}",
            "customer_id": "cus_bad_inputs",
            "value": "7",
            **bad,
        }
        record = StripeMeterEventOperator(task_id=task_id, **inputs)
        route.override(task_id=f"route_{task_id}")(record.output["success"], task_id) >> [
            EmptyOperator(task_id=f"{task_id}_ok"),
            EmptyOperator(task_id=f"{task_id}_not_recorded"),
        ]
