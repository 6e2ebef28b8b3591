"""StripeMeterEventBatchOperator end to end: SQL -> aggregate -> Stripe (local server) -> branch."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone

import pendulum
import pytest

from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator
from tests.conftest import add_rows, add_window_rows, at, run_dag, source_totals, task_states, today, xcoms

pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("airflow_db")]


def test_daily_run_bills_yesterday_once_and_a_rerun_adds_nothing(secret_server, usage_db, ledger_db):
    rows = [(f"cus_{n % 7}", 10 + n, at(-1, 300 * n)) for n in range(200)]
    rows += [("cus_today", 99, at(0, 60)), ("cus_0", 5, at(-2, 60))]  # outside the data interval
    add_rows(usage_db, rows)

    first = run_dag("t_batch_daily", logical_date=today())

    expected = source_totals(usage_db, f"used_at >= '{at(-1, 0)}' AND used_at < '{at(0, 0)}'")
    assert secret_server.ledger.totals() == expected
    outcome = xcoms(first, "bill")
    assert outcome["success"] is True
    assert (outcome["rows"], outcome["aggregates"], outcome["sent"]) == (200, 7, 7)
    assert outcome["totals"]["ai_tokens_used"]["value"] == sum(expected.values())
    events = secret_server.ledger.accepted()
    yesterday = today().add(days=-1).date()
    meter_id = secret_server.ledger.meter_for("ai_tokens_used").id
    # Each event is the first of its customer-day in the ledger, which names it.
    assert {e.identifier for e in events} == {
        f"sm:ai_tokens_used:{c}:{yesterday}:1:{meter_id}" for c in expected
    }
    with sqlite3.connect(ledger_db) as con:  # the ledger (ledger_conn_id)
        ledger = con.execute("SELECT customer_id, value, state FROM stripe_meter_ledger").fetchall()
    assert sorted(ledger) == sorted((c, v, "accepted") for c, v in expected.items())
    # Each event carries its latest row's time, inside yesterday.
    latest = {c: max(t for cc, _, t in rows[:200] if cc == c) for c in expected}
    assert {e.customer_id: e.timestamp for e in events} == {
        c: int(datetime.fromisoformat(t).replace(tzinfo=timezone.utc).timestamp()) for c, t in latest.items()
    }
    assert task_states(first)["billed"] == "success"
    # The whole result is the return value; only the headline keys are XComs of their own (each
    # a row of the metadata database), and `billed` branched on `bill.output["success"]`.
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator

    with create_session() as session:
        rows = session.query(XComModel).filter_by(dag_id=first.dag_id, run_id=first.run_id, task_id="bill")
        pushed = {row.key: XComModel.deserialize_value(row) for row in rows}
    own = set(StripeMeterEventBatchOperator.own_xcoms)
    assert set(pushed) - {"return_value"} - {k for k in pushed if k.startswith("_link_")} == own
    assert {k: pushed["return_value"][k] for k in own} == {k: pushed[k] for k in own}
    assert {"ledger", "totals", "samples", "actions"} <= set(pushed["return_value"])

    second = run_dag("t_batch_daily", logical_date=today())

    assert len(secret_server.ledger.accepted()) == 7
    again = xcoms(second, "bill")
    assert (again["sent"], again["already_recorded"], again["success"]) == (0, 7, True)
    assert secret_server.stats["concurrent_rejected"] == 0


def test_rows_outside_stripes_window_are_skipped_and_reported(secret_server, usage_db, capfd):
    add_window_rows(usage_db)

    dag_run = run_dag("t_batch_window", run_conf={"days": 40})

    outcome = xcoms(dag_run, "bill")
    assert (outcome["skipped_too_old"], outcome["invalid"], outcome["sent"]) == (2, 1, 1)
    assert outcome["success"] is False
    assert {s["customer_id"] for s in outcome["samples"]["skipped_too_old"]} == {"cus_old"}
    assert outcome["samples"]["invalid"][0]["field"] == "customer_id"
    assert secret_server.ledger.totals() == {"cus_new": 5}
    states = task_states(dag_run)
    assert (states["bill"], states["alert"], states["billed"]) == ("success", "success", "skipped")
    # The task is green, so its summary line says first that the run is not a success, and why.
    log = capfd.readouterr().out
    assert "NOT A SUCCESS: 1 invalid row (row " in log
    assert "customer_id 'user_9' must be a Stripe customer id" in log
    assert "; 2 rows older than Stripe's 35 days, skipped (row " in log
    assert "; Billed: rows 4 -> customer-days 1: sent 1," in log


def test_faults_and_rate_limits_still_bill_every_unit_exactly_once(secret_server, usage_db):
    rows = [(f"cus_{n % 60:03d}", n * 1_000 + 1, at(-(n // 300) - 1, n)) for n in range(900)]
    add_rows(usage_db, rows)
    secret_server.set_rate_limit(60, burst=10)
    # Scattered faults, not an outage (that is the outage tests' business): a few 503s, and one
    # answer in ten lost after Stripe wrote the event.
    secret_server.inject_failures(3, status=503, path_prefix="/v1/billing/meter_events")
    secret_server.lose_answers(0.1, path_prefix="/v1/billing/meter_events", seed=5)

    dag_run = run_dag("t_batch_faults")

    assert task_states(dag_run)["bill"] == "success"
    assert secret_server.ledger.totals() == source_totals(usage_db)
    identifiers = [e.identifier for e in secret_server.ledger.accepted()]
    assert len(identifiers) == len(set(identifiers)) == 180
    outcome = xcoms(dag_run, "bill")
    assert (outcome["sent"], outcome["already_recorded"]) == (180, 0)
    # Answers lost after the write: the retried request, under the same Idempotency-Key, got
    # Stripe's first answer replayed; no request met a duplicate answer (none was foreign).
    assert secret_server.stats["idempotent_replays"] >= 1
    assert secret_server.stats["duplicates_rejected"] == 0
    assert secret_server.stats["rate_limited"] > 0
    assert secret_server.stats["injected_failures"] > 3
    assert secret_server.stats["concurrent_rejected"] == 0


def test_a_batch_has_one_retry_layer_the_deliverers(secret_server, usage_db):
    # The connection lets the SDK retry once; a batch's events go out without SDK retries, so
    # each try is the deliverer's own (its backoff, its outage count), each a new request.
    add_rows(usage_db, [("cus_one", 5, at(-1, 60))])
    secret_server.inject_failures(2, status=503, path_prefix="/v1/billing/meter_events")

    dag_run = run_dag("t_batch_daily", logical_date=today())

    assert xcoms(dag_run, "bill")["success"] is True
    tries = [h for _, path, h in secret_server.request_log if path == "/v1/billing/meter_events"]
    # Three requests, each counted by the deliverer as its own try (an SDK retry inside a try
    # would be a request the deliverer did not count); all under the key of the try that wrote
    # the event's ledger row, so a retry of a write that landed gets Stripe's answer replayed.
    outcome = xcoms(dag_run, "bill")
    assert outcome["requests"] == len(tries) == 3
    [identifier] = [e.identifier for e in secret_server.ledger.accepted()]
    [key] = {h.get("Idempotency-Key") for h in tries}
    assert key.startswith(identifier + "/")
    assert secret_server.ledger.totals() == {"cus_one": 5}


def test_v2_stream_sends_100_events_a_request(secret_server, usage_db):
    add_rows(usage_db, [(f"cus_{n:04d}", n + 1, at(-1, n)) for n in range(250)])

    dag_run = run_dag("t_batch_stream")

    outcome = xcoms(dag_run, "bill")
    assert (outcome["sent"], outcome["requests"]) == (250, 3)
    assert secret_server.ledger.totals() == source_totals(usage_db)
    assert secret_server.stats["v2_session"] == 1
    assert {e.api for e in secret_server.ledger.accepted()} == {"v2_stream"}


def test_operator_arguments_are_checked_when_the_dag_is_parsed():
    with pytest.raises(ValueError, match="exactly one of rows"):
        StripeMeterEventBatchOperator(task_id="x", event_name="e")
    with pytest.raises(ValueError, match="sql_conn_id"):
        StripeMeterEventBatchOperator(task_id="x", event_name="e", sql="SELECT 1")
    with pytest.raises(ValueError, match="api must be one of"):
        StripeMeterEventBatchOperator(task_id="x", event_name="e", rows=[], api="v3")
    with pytest.raises(ValueError, match="event_name"):
        StripeMeterEventBatchOperator(task_id="x", event_name="e" * 101, rows=[])
    with pytest.raises(ValueError, match="ledger_conn_id is required with rows="):
        StripeMeterEventBatchOperator(task_id="x", event_name="e", rows=[])
    with pytest.raises(ValueError, match="ledger_table must be a table name"):
        StripeMeterEventBatchOperator(
            task_id="x", event_name="e", rows=[], ledger_conn_id="l", ledger_table="a;b"
        )


def test_empty_usage_bills_nothing_and_succeeds(secret_server, usage_db):
    add_rows(usage_db, [])
    dag_run = run_dag("t_batch_daily", logical_date=today())
    outcome = xcoms(dag_run, "bill")
    assert (outcome["rows"], outcome["aggregates"], outcome["success"]) == (0, 0, True)
    assert secret_server.stats["v1_meter_event"] == 0


@pytest.mark.postgres
def test_sql_path_streams_from_postgres(secret_server, usage_pg):
    now = datetime.now(timezone.utc)
    rows = [(f"cus_{n % 40:02d}", 1_000_000_000 + n, now - timedelta(hours=n % 240)) for n in range(3_000)]
    rows += [("cus_00", 1, now - timedelta(days=45))]  # filtered out by the query's own WHERE
    with usage_pg.cursor() as cur:
        cur.executemany("INSERT INTO usage VALUES (%s, %s, %s)", rows)
        cur.execute(
            "SELECT customer_id, SUM(tokens) FROM usage WHERE used_at >= now() - interval '30 days' "
            "GROUP BY customer_id"
        )
        expected = {customer: int(total) for customer, total in cur.fetchall()}

    dag_run = run_dag("t_batch_postgres", logical_date=pendulum.now("UTC"))

    outcome = xcoms(dag_run, "bill")
    assert outcome["rows"] == 3_000
    assert outcome["success"] is True
    # Summed in PostgreSQL (the default there), the query's own %(since)s parameter passed along.
    assert outcome["aggregated_in"] == "database", outcome["aggregated_because"]
    assert outcome["database"]["rows_checked"] == 0
    assert secret_server.ledger.totals() == expected
    days = {
        (e.customer_id, datetime.fromtimestamp(e.timestamp, timezone.utc).date())
        for e in secret_server.ledger.accepted()
    }
    assert len(days) == outcome["aggregates"] == len(secret_server.ledger.accepted())


@pytest.mark.postgres
def test_a_rerun_on_postgres_leaves_the_days_its_ledger_holds_in_the_database(secret_server, usage_pg):
    # The ledger lives beside the usage (no ledger_conn_id): PostgreSQL compares each day's
    # figures and digests with the ledger's, and only the days that differ come back.
    now = datetime.now(timezone.utc)
    rows = [(f"cus_{n % 40:02d}", 1_000 + n, now - timedelta(hours=n % 240)) for n in range(3_000)]
    with usage_pg.cursor() as cur:
        cur.executemany("INSERT INTO usage VALUES (%s, %s, %s)", rows)
    first = xcoms(run_dag("t_batch_postgres", logical_date=pendulum.now("UTC")), "bill")
    assert first["success"] is True
    assert first["database"]["unchanged"] == 0

    again = xcoms(run_dag("t_batch_postgres", logical_date=pendulum.now("UTC")), "bill")

    assert (again["events_sent"], again["success"]) == (0, True)
    assert again["already_recorded"] == again["aggregates"] == first["aggregates"]
    left = again["database"]["unchanged"]
    assert left > 0
    assert again["database"]["groups"] + left == first["aggregates"]
    assert again["totals"] == {
        **first["totals"],
        "ai_tokens_used": {**first["totals"]["ai_tokens_used"], "to_send": 0},
    }

    # A late row on a day billed before: that day comes back, and the row is billed.
    late = now - timedelta(hours=100)
    with usage_pg.cursor() as cur:
        cur.execute("INSERT INTO usage VALUES ('cus_07', 5, %s)", (late,))
        cur.execute(
            "SELECT customer_id, SUM(tokens) FROM usage WHERE used_at >= now() - interval '30 days' "
            "GROUP BY customer_id"
        )
        expected = {customer: int(total) for customer, total in cur.fetchall()}
    third = xcoms(run_dag("t_batch_postgres", logical_date=pendulum.now("UTC")), "bill")
    assert (third["events_sent"], third["success"]) == (1, True)
    assert third["database"]["unchanged"] < left
    assert secret_server.ledger.totals() == expected


def test_preflight_catches_an_unknown_event_name_before_anything_is_sent(secret_server):
    secret_server.ledger.add_meter("api_calls")
    rows = [["cus_a", 5, at(-1, 10), "ai_tokens_used"], ["cus_a", 2, at(-1, 20), "api_calls"]]

    dag_run = run_dag("t_batch_many_meters", run_conf={"rows": [*rows, ["cus_b", 1, at(-1, 30), "api_cals"]]})

    assert task_states(dag_run)["bill"] == "failed"
    assert secret_server.stats["v1_meter_event"] == 0

    dag_run = run_dag("t_batch_many_meters", run_conf={"rows": rows})

    common = {"formula": "sum", "event_time_window": None, "aggregates": 1, "customers": 1}
    assert xcoms(dag_run, "bill")["totals"] == {
        "ai_tokens_used": {**common, "value": 5, "recorded": 5, "to_send": 5},
        "api_calls": {**common, "value": 2, "recorded": 2, "to_send": 2},
    }
    assert secret_server.stats["v1_list_meters"] == 2  # once per task run, not per event


def test_top_up_with_nothing_to_correct_has_the_same_keys_as_one_that_sends(secret_server):
    from airflow_provider_stripe_meter.operators.meter_event_correction import StripeMeterTopUpOperator

    nothing = StripeMeterTopUpOperator(
        task_id="t", reconciliation=[], event_name="ai_tokens_used", ledger_conn_id="ledger_db"
    )
    empty = nothing.execute({})
    result = {"success": True, "sent": 1, "already_recorded": 0, "rejected": 0, "failed": 0, "samples": {}}
    full = StripeMeterTopUpOperator._outcome({**result, "ledger": {"settled": 0}}, False)
    assert set(empty) == set(full)
    assert (empty["success"], empty["samples"], empty["sent"]) == (True, {}, 0)


def test_billing_updates_the_meters_asset_and_queues_the_dag_scheduled_on_it(secret_server, usage_db):
    from airflow.models.asset import AssetDagRunQueue, AssetEvent, AssetModel
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    add_rows(usage_db, [(f"cus_{n % 3}", 10 + n, at(-1, 300 * n)) for n in range(30)])
    with create_session() as session:  # new DAGs start paused; a paused DAG is never queued
        session.query(DagModel).filter_by(dag_id="example_stripe_after_billing").update({"is_paused": False})

    dag_run = run_dag("t_batch_daily", logical_date=today())

    uri = "stripe://platform/meters/ai_tokens_used"
    with create_session() as session:
        asset = session.query(AssetModel).filter(AssetModel.uri == uri).one()
        [event] = (
            session.query(AssetEvent)
            .filter(AssetEvent.asset_id == asset.id, AssetEvent.source_run_id == dag_run.run_id)
            .all()
        )
        queued = {row.target_dag_id for row in session.query(AssetDagRunQueue).filter_by(asset_id=asset.id)}
        extra = dict(event.extra)
    assert extra["success"] is True
    assert extra["days"] == [today().add(days=-1).to_date_string()]
    assert (extra["customers"], extra["sent"]) == (3, 3)
    assert extra["totals"]["ai_tokens_used"] == {"value": sum(10 + n for n in range(30)), "recorded": 735}
    assert "example_stripe_after_billing" in queued


def test_a_templated_or_per_row_meter_has_the_meters_alias_and_a_dry_run_updates_none():
    fixed = StripeMeterEventBatchOperator(
        task_id="a", event_name="ai_tokens_used", rows=[], ledger_conn_id="l"
    )
    assert [o.uri for o in fixed.outlets] == ["stripe://platform/meters/ai_tokens_used"]
    connect = StripeMeterEventBatchOperator(
        task_id="b", event_name="e", rows=[], ledger_conn_id="l", stripe_account="acct_1"
    )
    assert [o.uri for o in connect.outlets] == ["stripe://acct_1/meters/e"]
    for kwargs in (
        {"event_name": "{{ params.e }}"},
        {"event_name": None},
        {"event_name": "e", "stripe_account": "{{ params.account }}"},
    ):
        outlets = StripeMeterEventBatchOperator(task_id="c", rows=[], ledger_conn_id="l", **kwargs).outlets
        assert [(type(o).__name__, o.name) for o in outlets] == [("AssetAlias", "stripe_meters")]
    dry = StripeMeterEventBatchOperator(
        task_id="d", rows=[], event_name="e", ledger_conn_id="l", dry_run=True
    )
    assert dry.outlets == []
