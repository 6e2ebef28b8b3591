"""OpenLineage: the usage table is the input, the Stripe meter the output; nothing without the provider."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pendulum
import pytest

from tests.conftest import DAGS_FOLDER, SECRET_KEY, add_rows, at, dag_bag, run_dag, spawn_dag

pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("airflow_db")]


def lineage_of(dag_run, task_id):
    """What the OpenLineage listener extracts for a finished task of ``dag_run``."""
    pytest.importorskip("airflow.providers.openlineage")
    from airflow.providers.openlineage.extractors.manager import ExtractorManager
    from airflow.utils.state import TaskInstanceState

    task = dag_bag(str(DAGS_FOLDER)).get_dag(dag_run.dag_id).get_task(task_id)
    ti = dag_run.get_task_instance(task_id)
    return ExtractorManager().extract_metadata(dag_run, task, TaskInstanceState.SUCCESS, ti)


def names(datasets):
    return [(d.namespace, d.name) for d in datasets]


def _fill(usage_pg):
    now = datetime.now(timezone.utc)
    with usage_pg.cursor() as cur:
        cur.executemany(
            "INSERT INTO usage VALUES (%s, %s, %s)",
            [("cus_a", 5, now - timedelta(hours=30)), ("cus_b", 7, now - timedelta(hours=30))],
        )


@pytest.mark.postgres
def test_the_batch_operators_query_is_its_input_and_the_meter_its_output(secret_server, usage_pg):
    _fill(usage_pg)
    dag_run = run_dag("t_batch_postgres", logical_date=pendulum.now("UTC"))
    port = usage_pg.info.port

    lineage = lineage_of(dag_run, "bill")

    assert names(lineage.inputs) == [(f"postgres://127.0.0.1:{port}", f"{usage_pg.info.dbname}.public.usage")]
    assert names(lineage.outputs) == [("stripe://platform", "meters/ai_tokens_used")]
    # The SQL parser also read the table's columns from the database.
    schema = lineage.inputs[0].facets["schema"]
    assert [f.name for f in schema.fields] == ["customer_id", "tokens", "used_at"]


@pytest.mark.postgres
def test_rows_from_an_upstream_query_name_that_querys_table(secret_server, usage_pg):
    _fill(usage_pg)
    dag_run = run_dag("t_batch_postgres_rows")
    assert secret_server.ledger.totals() == {"cus_a": 5, "cus_b": 7}

    lineage = lineage_of(dag_run, "bill")

    assert names(lineage.inputs) == [
        (f"postgres://127.0.0.1:{usage_pg.info.port}", f"{usage_pg.info.dbname}.public.usage")
    ]
    assert names(lineage.outputs) == [("stripe://platform", "meters/ai_tokens_used")]


def test_the_sensor_names_the_meter_and_a_connected_account(secret_server, usage_db, monkeypatch):
    secret_server.add_account("acct_1Lineage", meters=["ai_tokens_used"])
    monkeypatch.setenv(
        "AIRFLOW_CONN_STRIPE_DEFAULT",
        secret_server.connection_json(SECRET_KEY, stripe_account="acct_1Lineage"),
    )
    add_rows(usage_db, [("cus_a", 5, at(-1, 10))])
    dag_run = run_dag("t_reconcile_rescheduled")

    lineage = lineage_of(dag_run, "reconcile")

    assert names(lineage.outputs) == [("stripe://acct_1Lineage", "meters/ai_tokens_used")]
    # SQLite's hook gives OpenLineage no database facts, so its table cannot be named.
    assert lineage.inputs == []


def test_each_mapped_instance_emits_its_own_accounts_meter(usage_db, monkeypatch, tmp_path):
    # The OpenLineage listener itself, as a worker runs it, writing its events to a file. Airflow
    # registers the listener once per process, so the DAG runs in a process of its own.
    pytest.importorskip("airflow.providers.openlineage")
    from airflow_provider_stripe_meter.testing import LocalStripeServer
    from tests.operators.test_mapping import ACCOUNTS, add_account_rows, rows_for

    emitted = tmp_path / "openlineage.jsonl"
    transport = {"type": "file", "log_file_path": str(emitted), "append": True}
    monkeypatch.setenv("AIRFLOW__OPENLINEAGE__TRANSPORT", json.dumps(transport))
    with LocalStripeServer(meters=["ai_tokens_used"], accounts=ACCOUNTS, api_keys=[SECRET_KEY]) as server:
        monkeypatch.setenv("AIRFLOW_CONN_STRIPE_DEFAULT", server.connection_json(SECRET_KEY))
        with sqlite3.connect(usage_db) as con:
            con.execute(
                "CREATE TABLE connect_usage (account TEXT, customer_id TEXT, tokens INTEGER, used_at TEXT)"
            )
        add_account_rows(usage_db, rows_for(ACCOUNTS, -1))
        assert spawn_dag("t_mapped_accounts").wait(timeout=120) == 0
        assert {a: len(server.account(a).accepted()) for a in ACCOUNTS} == dict.fromkeys(ACCOUNTS, 3)

    completed = [
        event
        for event in map(json.loads, emitted.read_text().splitlines())
        if event["eventType"] == "COMPLETE" and event["job"]["name"] == "t_mapped_accounts.bill"
    ]
    outputs = sorted([(o["namespace"], o["name"]) for o in event["outputs"]] for event in completed)
    # One event per instance, each naming only the meter of the account it billed.
    assert outputs == [[(f"stripe://{account}", "meters/ai_tokens_used")] for account in ACCOUNTS]


def test_the_meters_asset_converts_to_the_same_dataset():
    pytest.importorskip("airflow.providers.openlineage")
    from airflow.providers.openlineage.utils.utils import translate_airflow_asset
    from airflow.sdk import Asset

    dataset = translate_airflow_asset(Asset("stripe://acct_1A/meters/ai%20tokens"), None)

    assert (dataset.namespace, dataset.name) == ("stripe://acct_1A", "meters/ai tokens")


def test_without_the_provider_there_are_no_facets():
    code = (
        "import sys\n"
        "sys.modules['airflow.providers.openlineage.extractors'] = None  # as if not installed\n"
        "from airflow_provider_stripe_meter.operators import meter_event_batch as m\n"
        "op = m.StripeMeterEventBatchOperator(task_id='b', event_name='e', sql='SELECT 1', sql_conn_id='x')\n"
        "print(op.get_openlineage_facets_on_complete(None))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None", out.stderr[-2000:]
