"""DAGs the invoice tests run with dag.test(): usage billed into its customers' billing periods."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_stripe_meter.operators.invoice_check import StripeMeterInvoiceCheckOperator
from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator

START = pendulum.datetime(2026, 1, 1, tz="UTC")
#: The usage of [from, to): a nightly run passes a whole day, an hourly run the day so far.
WINDOW = (
    "SELECT customer_id, tokens, used_at FROM usage "
    "WHERE used_at >= '{{ params['from'] }}' AND used_at < '{{ params['to'] }}'"
)

for dag_id, periods in (("t_invoice_hold", "hold"), ("t_invoice_carry", "carry")):
    with DAG(
        dag_id, schedule=None, start_date=START, params={"from": "2026-01-01", "to": "2026-01-02"}
    ) as dag:
        StripeMeterEventBatchOperator(
            task_id="bill",
            event_name="ai_tokens_used",
            sql=WINDOW,
            sql_conn_id="usage_db",
            billing_periods=periods,
            max_rps=200,
        )
    globals()[dag_id] = dag

with DAG(
    "t_invoice_mapped", schedule=None, start_date=START, params={"from": "2026-01-01", "to": "2026-01-02"}
) as mapped_dag:
    # A Connect platform: one usage table, one mapped instance per connected account, each billed
    # into its own customers' periods on that account.
    StripeMeterEventBatchOperator.partial(
        task_id="bill",
        event_name="ai_tokens_used",
        sql=(
            "SELECT customer_id, tokens, used_at FROM connect_usage WHERE account = :account "
            "AND used_at >= '{{ params['from'] }}' AND used_at < '{{ params['to'] }}'"
        ),
        sql_conn_id="usage_db",
        parameters={"account": "{{ task.stripe_account }}"},
        map_index_template="{{ task.stripe_account }}",
        max_rps=200,
    ).expand(stripe_account=["acct_1North", "acct_1South"])

with DAG(
    "t_invoice_check", schedule=None, start_date=START, params={"from": "2026-01-01", "to": "2026-01-02"}
) as check_dag:
    StripeMeterInvoiceCheckOperator(
        task_id="check", event_name="ai_tokens_used", sql=WINDOW, sql_conn_id="usage_db"
    )
