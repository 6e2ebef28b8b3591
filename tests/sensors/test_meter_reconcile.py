"""Reconciliation, late-row top-ups and cancellations end to end, against the local server."""

from __future__ import annotations

import sqlite3

import pendulum
import pytest

from tests.conftest import add_rows, advance, at, day, run_dag, source_totals, task_states, xcoms

pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("airflow_db", "fast_clock")]


@pytest.fixture
def fast_clock(monkeypatch):
    """The sensor's (and its trigger's) clock runs a second ahead more at every reading: settle_timeout
    passes in pokes."""
    import time

    from airflow_provider_stripe_meter.billing import reconcile

    readings = []

    def clock():
        readings.append(None)
        return time.time() + len(readings)

    monkeypatch.setattr(reconcile, "clock", clock)
    return readings


def lines_by_key(outcome):
    return {(line["customer_id"], line["day"]): line for line in outcome["lines"]}


def test_reconciliation_finds_an_unknown_customer_and_a_missing_day(secret_server, usage_db, fast_clock):
    secret_server.ledger.customers = {"cus_a", "cus_b"}
    add_rows(usage_db, [("cus_a", 5, at(-2, 10)), ("cus_a", 7, at(-1, 10)), ("cus_b", 3, at(-1, 20))])
    add_rows(usage_db, [("cus_ghost", 9, at(-1, 30))])
    run_dag("t_bill_day", run_conf={"day": day(-1)})  # the nightly run for yesterday only

    dag_run = run_dag("t_reconcile")

    outcome = xcoms(dag_run, "reconcile")
    lines = lines_by_key(outcome)
    assert lines[("cus_a", day(-2))]["status"] == "missing"
    assert lines[("cus_a", day(-2))]["expected"] == 5
    assert lines[("cus_a", day(-1))]["status"] == "ok"
    assert lines[("cus_b", day(-1))]["status"] == "ok"
    assert lines[("cus_ghost", day(-1))]["status"] == "customer_unknown"
    assert outcome["counts"] == {"ok": 2, "missing": 1, "short": 0, "over": 0, "customer_unknown": 1}
    assert outcome["success"] is False
    assert outcome["waited_seconds"] >= 3  # a mismatch is waited out as Stripe catching up first
    assert len(fast_clock) >= 3  # ... over several pokes
    states = task_states(dag_run)
    assert (states["top_up"], states["alert"], states["all_good"]) == ("success", "success", "skipped")
    # The missing day went out under the batch operator's own identifier for it.
    meter = secret_server.ledger.meter_for("ai_tokens_used").id
    assert f"sm:ai_tokens_used:cus_a:{day(-2)}:1:{meter}" in {
        e.identifier for e in secret_server.ledger.accepted()
    }
    assert secret_server.ledger.totals()["cus_a"] == 12


def test_late_rows_are_topped_up_exactly_however_often_the_flow_runs(secret_server, usage_db):
    secret_server.ledger.summary_lag = 1.5  # Stripe's summaries trail the events
    add_rows(usage_db, [("cus_a", 100, at(-1, 10)), ("cus_b", 40, at(-1, 20))])
    run_dag("t_bill_day", run_conf={"day": day(-1)})
    add_rows(usage_db, [("cus_a", 25, at(-1, 3_000)), ("cus_b", 2, at(-1, 4_000))])  # late rows

    for _ in range(3):
        run_dag("t_reconcile")
    assert secret_server.ledger.totals() == source_totals(usage_db) == {"cus_a": 125, "cus_b": 42}

    add_rows(usage_db, [("cus_a", 5, at(-1, 5_000))])  # later still
    advance(secret_server, 1.6)
    for _ in range(2):
        dag_run = run_dag("t_reconcile")
    assert secret_server.ledger.totals() == source_totals(usage_db) == {"cus_a": 130, "cus_b": 42}
    meter = secret_server.ledger.meter_for("ai_tokens_used").id
    identifiers = sorted(e.identifier for e in secret_server.ledger.accepted())
    # Top-ups are the days' next events in the ledger: a re-run, or a reconciliation that read
    # a summary that trailed, finds them there and sends nothing again.
    assert identifiers == sorted(
        f"sm:ai_tokens_used:{customer}:{day(-1)}:{seq}:{meter}"
        for customer, seq in [("cus_a", 1), ("cus_b", 1), ("cus_a", 2), ("cus_b", 2), ("cus_a", 3)]
    )
    advance(secret_server, 1.6)
    dag_run = run_dag("t_reconcile")
    assert xcoms(dag_run, "reconcile")["success"] is True
    assert task_states(dag_run)["all_good"] == "success"


def test_cancel_within_24_hours_removes_the_event_and_later_says_it_is_too_late(secret_server, usage_db):
    add_rows(usage_db, [("cus_a", 100, at(-1, 10)), ("cus_b", 40, at(-1, 20))])
    run_dag("t_bill_day", run_conf={"day": day(-1)})
    meter = secret_server.ledger.meter_for("ai_tokens_used").id
    dup = f"sm:ai_tokens_used:cus_a:{day(-1)}:1:{meter}"

    dag_run = run_dag("t_cancel", run_conf={"identifiers": [dup]})

    assert xcoms(dag_run, "cancel")["return_value"] == {"success": True, "cancelled": [dup], "errors": []}
    assert secret_server.ledger.totals() == {"cus_b": 40}
    with sqlite3.connect(usage_db) as con:  # the ledger knows: the next batch run bills it again
        assert con.execute(
            "SELECT state FROM stripe_meter_ledger WHERE identifier = ?", (dup,)
        ).fetchall() == [("cancelled",)]
    dag_run = run_dag("t_reconcile")
    cancelled_line = lines_by_key(xcoms(dag_run, "reconcile"))[("cus_a", day(-1))]
    assert (cancelled_line["status"], cancelled_line["recorded"]) == ("missing", 0)

    real_clock = secret_server.ledger.clock
    secret_server.ledger.clock = lambda: real_clock() + 86_400 + 60  # a day and a minute later
    late = f"sm:ai_tokens_used:cus_b:{day(-1)}:1:{meter}"
    dag_run = run_dag("t_cancel", run_conf={"identifiers": [late]})

    outcome = xcoms(dag_run, "cancel")
    assert outcome["success"] is False
    [error] = outcome["errors"]
    assert error["too_late"] is True
    assert "only within 24 hours" in error["message"]
    assert "correcting event" in error["message"]
    assert secret_server.ledger.totals()["cus_b"] == 40


def test_compared_days_have_their_own_names_apart_from_the_scheduling_dates():
    from airflow_provider_stripe_meter.sensors.meter_reconcile import StripeMeterReconcileSensor

    sensor = StripeMeterReconcileSensor(
        task_id="r", event_name="e", rows=[], first_day="2026-11-01", last_day="2026-11-02"
    )
    assert (sensor.first_day, sensor.last_day) == ("2026-11-01", "2026-11-02")
    # A datetime start_date is BaseOperator's scheduling argument, as for any operator.
    scheduled = StripeMeterReconcileSensor(
        task_id="s", event_name="e", rows=[], start_date=pendulum.datetime(2026, 1, 1, tz="UTC")
    )
    assert scheduled.first_day is None
    assert scheduled.start_date == pendulum.datetime(2026, 1, 1, tz="UTC")


def _report_without_timing(dag_run):
    report = xcoms(dag_run, "reconcile")["return_value"]
    return {k: v for k, v in report.items() if k != "waited_seconds"}


def test_a_deferred_sensor_waits_in_the_triggerer_and_reports_what_reschedule_mode_does(
    secret_server, usage_db, fast_clock
):
    secret_server.ledger.customers = {"cus_a", "cus_b"}
    add_rows(usage_db, [("cus_a", 5, at(-2, 10)), ("cus_a", 7, at(-1, 10)), ("cus_b", 3, at(-1, 20))])
    add_rows(usage_db, [("cus_ghost", 9, at(-1, 30))])
    run_dag("t_bill_day", run_conf={"day": day(-1)})

    rescheduled = run_dag("t_reconcile_rescheduled")
    requests_before = secret_server.stats["v1_summaries"]
    deferred = run_dag("t_reconcile_deferred")

    assert task_states(deferred) == {"reconcile": "success"}
    report = _report_without_timing(deferred)
    # The same report either way: the unknown customer's usage was held by the batch (nothing of it
    # in the ledger), and both audits name it.
    ghost = [lines_by_key(r)[("cus_ghost", day(-1))] for r in (xcoms(rescheduled, "reconcile"), report)]
    assert [(g["ledger"], g["cause"]) for g in ghost] == [(0, "customer_unknown"), (0, "customer_unknown")]

    def without_ledger(r):
        return {**r, "lines": [{k: v for k, v in line.items() if k != "ledger"} for line in r["lines"]]}

    assert without_ledger(report) == without_ledger(_report_without_timing(rescheduled))
    assert report["counts"] == {"ok": 2, "missing": 1, "short": 0, "over": 0, "customer_unknown": 1}
    assert xcoms(deferred, "reconcile")["waited_seconds"] >= 3  # the mismatch was waited out ...
    # ... by polling Stripe from the triggerer: three customers a poll, several polls.
    assert secret_server.stats["v1_summaries"] - requests_before >= 2 * 3
    [ti] = deferred.get_task_instances()
    assert ti.try_number == 1  # resumed from the trigger, not retried
    # The resumed task still links to the meter it checked.
    meter_id = secret_server.ledger.meter_for("ai_tokens_used").id
    link = xcoms(deferred, "reconcile")["_link_StripeMeterLink"]
    assert link == f"https://dashboard.stripe.com/test/meters/{meter_id}"


def test_a_deferred_sensor_finishes_as_soon_as_stripe_catches_up(secret_server, usage_db, monkeypatch):
    import time

    from airflow_provider_stripe_meter.billing import reconcile

    add_rows(usage_db, [("cus_a", 100, at(-1, 10)), ("cus_b", 40, at(-1, 20))])
    run_dag("t_bill_day", run_conf={"day": day(-1)})
    secret_server.ledger.summary_lag = 1_000  # Stripe's summaries trail the events ...
    readings = []

    def clock():
        # Real time (3 s to settle), except that Stripe catches up once the first poll is over:
        # the sensor reads the clock when it defers, the trigger after each poll.
        readings.append(None)
        if len(readings) == 2:
            advance(secret_server, 1_001)
        return time.time()

    monkeypatch.setattr(reconcile, "clock", clock)
    requests_before = secret_server.stats["v1_summaries"]

    dag_run = run_dag("t_reconcile_deferred")

    report = xcoms(dag_run, "reconcile")["return_value"]
    assert report["success"] is True
    assert report["counts"]["ok"] == 2
    assert report["expected"] == report["recorded"] == 140
    assert report["waited_seconds"] < 3  # done when Stripe caught up, not when the settle time ran out
    assert secret_server.stats["v1_summaries"] - requests_before == 2 * 2  # two polls, two customers


def _trigger(**overrides):
    from airflow_provider_stripe_meter.triggers.meter_reconcile import StripeMeterReconcileTrigger

    kwargs = {
        "stripe_conn_id": "stripe_default",
        "stripe_account": None,
        "event_name": "ai_tokens_used",
        "expectation": {
            "meter_id": overrides.pop("meter_id", "mtr_any"),
            "expected": [["cus_a", day(-1), 5, None]],
            "first": day(-1),
            "last": day(-1),
            "customers": ["cus_a"],
            "skipped_rows": {},
        },
        "started": 0.0,
        "settle_seconds": 3600.0,
        "poll_interval": 0.0,
        "max_rps": 100.0,
        **overrides,
    }
    # Built again from its serialized form, as the triggerer does.
    classpath, serialized = StripeMeterReconcileTrigger(**kwargs).serialize()
    assert classpath == "airflow_provider_stripe_meter.triggers.meter_reconcile.StripeMeterReconcileTrigger"
    return StripeMeterReconcileTrigger(**serialized)


def _first_event(trigger):
    import asyncio

    async def first():
        return await anext(trigger.run())

    return asyncio.run(first()).payload


def test_the_trigger_reports_a_refused_key_at_once_and_as_not_retryable(secret_server, monkeypatch):
    import json

    monkeypatch.setenv(
        "AIRFLOW_CONN_STRIPE_DEFAULT",
        json.dumps(
            {"conn_type": "stripe", "password": "sk_test_wrong", "extra": {"api_base": secret_server.url}}
        ),
    )

    event = _first_event(_trigger())

    assert event["status"] == "error"
    assert (event["retryable"], event["error"]) == (False, "StripeConfigurationError")
    assert "sk_test_wrong" not in json.dumps(event)


def test_stripe_down_past_the_settle_time_is_a_retryable_failure(secret_server, fast_clock):
    from airflow_provider_stripe_meter.billing import reconcile
    from airflow_provider_stripe_meter.exceptions import StripeTransientError
    from airflow_provider_stripe_meter.sensors.meter_reconcile import StripeMeterReconcileSensor

    meter_id = secret_server.ledger.meter_for("ai_tokens_used").id
    secret_server.outage(60)

    event = _first_event(_trigger(meter_id=meter_id, started=reconcile.clock(), settle_seconds=2.0))

    assert (event["status"], event["retryable"], event["error"]) == ("error", True, "StripeTransientError")
    assert secret_server.stats["outage_rejected"] >= 2  # polled again until the settle time was over
    sensor = StripeMeterReconcileSensor(task_id="r", event_name="ai_tokens_used", rows=[], deferrable=True)
    with pytest.raises(StripeTransientError, match="could not read Stripe"):
        sensor.execute_complete({}, event)  # a transient failure: Airflow's retries apply


@pytest.mark.parametrize("dag_id", ["t_backfill_reconcile", "t_backfill_reconcile_deferred"])
def test_usage_billed_late_onto_a_day_is_expected_there_not_reported_over(
    secret_server, usage_db, monkeypatch, dag_id
):
    from tests.conftest import share_clock, today

    # Noon: usage older than 35 days lands at the oldest instant Stripe takes, on day -35 at 12:01,
    # where these customers also have usage of their own later that day.
    share_clock(monkeypatch, secret_server).set(today().add(hours=12))
    rows = []
    for c in range(3):
        rows += [(f"cus_{c}", 100 + c, at(-40, 3600)), (f"cus_{c}", 10 + c, at(-35, 72_000))]
        rows += [(f"cus_{c}", 5, at(-2, 600))]
    add_rows(usage_db, rows)

    dag_run = run_dag(dag_id)

    bill, report = xcoms(dag_run, "bill"), xcoms(dag_run, "reconcile")
    assert (bill["billed_late"], bill["sent"]) == (3, 6)
    assert secret_server.ledger.figures("ai_tokens_used")[("cus_1", day(-35))] == 101 + 11
    # Stripe's day -35 holds each customer's own usage of that day and the late usage landed there.
    assert report["counts"] == {"ok": 6, "missing": 0, "short": 0, "over": 0, "customer_unknown": 0}
    assert (report["success"], report["billed_late"]) == (True, 100 + 101 + 102)
    assert lines_by_key(report)[("cus_1", day(-35))]["expected"] == 101 + 11


def test_an_unknown_customers_usage_is_held_reported_by_the_audit_and_billed_once_it_exists(
    secret_server, usage_db, fast_clock
):
    # The CRM sync trails Stripe: the nightly run has usage of a customer Stripe does not know yet.
    # Stripe would take its events and drop them, so the run holds them (customer_unknown); the
    # audit names the customer; the next run once it exists bills them.
    secret_server.ledger.customers = {"cus_a"}
    add_rows(usage_db, [("cus_a", 5, at(-1, 10)), ("cus_new", 9, at(-1, 30)), ("cus_new", 4, at(-1, 90))])
    first = xcoms(run_dag("t_bill_day", run_conf={"day": day(-1)}), "bill")
    assert (first["sent"], first["customer_unknown"], first["success"]) == (1, 1, False)
    assert secret_server.ledger.totals() == {"cus_a": 5}  # nothing of cus_new reached Stripe

    audit = xcoms(run_dag("t_reconcile_rescheduled", run_conf={"days": 3}), "reconcile")
    assert audit["counts"]["customer_unknown"] == 1
    unknown = lines_by_key(audit)[("cus_new", day(-1))]
    assert (unknown["ledger"], unknown["cause"]) == (0, "customer_unknown")
    # Nothing was dropped: Stripe's error reports hold nothing of it.
    assert not (audit["stripe_errors"] or {}).get("codes")
    assert "stripe_error" not in unknown
    with sqlite3.connect(usage_db) as con:
        states = dict(con.execute("SELECT customer_id, state FROM stripe_meter_ledger"))
    assert states == {"cus_a": "accepted"}

    secret_server.ledger.customers.add("cus_new")  # the CRM sync caught up
    again = xcoms(run_dag("t_bill_day", run_conf={"day": day(-1)}), "bill")
    assert (again["success"], again["sent"], again["already_recorded"]) == (True, 1, 1)
    assert secret_server.ledger.totals() == {"cus_a": 5, "cus_new": 13}
    audit = xcoms(run_dag("t_reconcile_rescheduled", run_conf={"days": 3}), "reconcile")
    assert audit["counts"] == {"ok": 2, "missing": 0, "short": 0, "over": 0, "customer_unknown": 0}
    assert audit["stripe_errors"] is None  # nothing differs: no error reports read
