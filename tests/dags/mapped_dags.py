"""DAGs the mapping, Connect and footprint tests run with dag.test()."""

from __future__ import annotations

import pendulum
from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator
from airflow.sdk import DAG, task

from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator
from airflow_provider_stripe_meter.operators.meter_event_correction import StripeMeterTopUpOperator
from airflow_provider_stripe_meter.sensors.meter_reconcile import StripeMeterReconcileSensor

START = pendulum.datetime(2026, 1, 1, tz="UTC")
#: One usage table for every connected account: the ``account`` column says whose usage it is.
ACCOUNT_SQL = "SELECT customer_id, tokens, used_at FROM connect_usage WHERE account = :account"


@task
def accounts_in(rows: list[list[str]]) -> list[str]:
    """The connected accounts the usage table names (one mapped instance each)."""
    return [row[0] for row in rows]


with DAG("t_mapped_accounts", schedule=None, start_date=START) as accounts_dag:
    listed = SQLExecuteQueryOperator(
        task_id="accounts",
        conn_id="usage_db",
        sql="SELECT DISTINCT account FROM connect_usage ORDER BY account",
    )
    StripeMeterEventBatchOperator.partial(
        task_id="bill",
        event_name="ai_tokens_used",
        sql=ACCOUNT_SQL,
        sql_conn_id="usage_db",
        # Each instance reads its own account's rows.
        parameters={"account": "{{ task.stripe_account }}"},
        map_index_template="{{ task.stripe_account }}",
        max_rps=200,
    ).expand(stripe_account=accounts_in(listed.output))

with DAG("t_mapped_reconcile", schedule=None, start_date=START) as reconcile_dag:
    StripeMeterReconcileSensor.partial(
        task_id="reconcile",
        event_name="ai_tokens_used",
        sql=ACCOUNT_SQL,
        sql_conn_id="usage_db",
        parameters={"account": "{{ task.stripe_account }}"},
        settle_timeout=0,
        poke_interval=1,
        max_rps=200,
    ).expand(stripe_account=["acct_1North", "acct_1South", "acct_1West"])

with DAG("t_mapped_meters", schedule=None, start_date=START) as meters_dag:
    usage = SQLExecuteQueryOperator(
        task_id="usage", conn_id="usage_db", sql="SELECT customer_id, tokens, used_at FROM usage"
    )
    StripeMeterEventBatchOperator.partial(
        task_id="bill", rows=usage.output, ledger_conn_id="ledger_db", max_rps=200
    ).expand(event_name=["ai_tokens_used", "api_calls"])

# -- footprint: what lands in Airflow's metadata database at any number of customers ------------

USAGE_SQL = "SELECT customer_id, tokens, used_at FROM usage"

with DAG("t_footprint", schedule=None, start_date=START, params={"reports": "/tmp"}) as footprint_dag:
    bill = StripeMeterEventBatchOperator(
        task_id="bill",
        event_name="ai_tokens_used",
        sql=USAGE_SQL,
        sql_conn_id="usage_db",
        api="v2_stream",
        max_rps=4000,
        concurrency=16,
        report_path="file://{{ params.reports }}/bill.jsonl",
    )
    reconcile = StripeMeterReconcileSensor(
        task_id="reconcile",
        event_name="ai_tokens_used",
        sql=USAGE_SQL,
        sql_conn_id="usage_db",
        deferrable=True,
        settle_timeout=0,
        poke_interval=1,
        max_rps=4000,
        report_path="file://{{ params.reports }}/reconcile.jsonl",
    )
    bill >> reconcile

with DAG(
    "t_reconcile_bounded", schedule=None, start_date=START, params={"reports": "/tmp", "deferrable": False}
) as bounded_dag:
    for deferrable in (False, True):
        checked = StripeMeterReconcileSensor(
            task_id="reconcile_deferred" if deferrable else "reconcile",
            event_name="ai_tokens_used",
            sql=USAGE_SQL,
            sql_conn_id="usage_db",
            deferrable=deferrable,
            settle_timeout=0,
            poke_interval=1,
            max_rps=500,
            line_limit=5,
            report_path="file://{{ params.reports }}/{{ task.task_id }}.jsonl",
        )
    checked >> StripeMeterTopUpOperator(
        task_id="top_up",
        reconciliation=checked.output,
        event_name="ai_tokens_used",
        ledger_conn_id="usage_db",
        max_rps=500,
    )

with DAG(
    "t_top_up_given",
    schedule=None,
    start_date=START,
    params={"report": {}},
    render_template_as_native_obj=True,
) as top_up_given_dag:
    StripeMeterTopUpOperator(
        task_id="top_up",
        reconciliation="{{ params.report }}",
        event_name="ai_tokens_used",
        ledger_conn_id="ledger_db",
        max_rps=100,
    )
