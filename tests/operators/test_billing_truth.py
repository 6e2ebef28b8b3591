"""Stripe's figure per (meter, customer, day) equals the source's, whatever the history of runs.

Real Airflow (dag.test()) and the real stripe SDK against the local server, which keeps
identifiers for a realistic 24 hours; tests move its clock past that instead of waiting.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict

import pendulum
import pytest

from airflow_provider_stripe_meter.testing import LocalStripeServer
from tests.conftest import SECRET_KEY, add_rows, advance, at, day, run_dag, task_states, xcoms

pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("airflow_db")]
DAY = 86400


def serve(monkeypatch, meters: dict[str, dict]) -> LocalStripeServer:
    server = LocalStripeServer(api_keys=[SECRET_KEY], validate_spec=True, identifier_window=DAY).start()
    for name, settings in meters.items():
        server.ledger.add_meter(name, **settings)
    monkeypatch.setenv(
        "AIRFLOW_CONN_STRIPE_DEFAULT", server.connection_json(SECRET_KEY, max_network_retries=1)
    )
    return server


@pytest.fixture
def stop_after():
    servers = []
    yield servers.append
    for server in servers:
        server.stop()
        assert server.spec_violations == [], server.spec_violations
        assert server.request_violations == [], server.request_violations


def source_figures(rows, formula="sum"):
    """Per (customer, day ISO): the meter's formula over the source rows (rows in source order)."""
    grouped = defaultdict(list)
    for customer, value, used_at, *_ in rows:
        grouped[(customer, used_at[:10])].append((used_at, value))
    if formula == "count":
        return {key: len(values) for key, values in grouped.items()}
    if formula == "last":
        # The latest row; of equal times, the later one in source order.
        return {
            key: max(enumerate(values), key=lambda iv: (iv[1][0], iv[0]))[1][1]
            for key, values in grouped.items()
        }
    return {key: sum(v for _, v in values) for key, values in grouped.items()}


def db_rows(path):
    with sqlite3.connect(path) as con:
        return con.execute("SELECT customer_id, tokens, used_at FROM usage ORDER BY rowid").fetchall()


@pytest.mark.parametrize("window", [None, "day"], ids=["raw-meter", "pre-aggregated-meter"])
def test_backfill_three_times_across_the_identifier_window_bills_each_day_exactly(
    monkeypatch, usage_db, stop_after, window
):
    server = serve(monkeypatch, {"ai_tokens_used": {"event_time_window": window}})
    stop_after(server)
    add_rows(
        usage_db, [(f"cus_{c:02d}", 10 * c + d, at(-d, 3_600 + c)) for c in range(12) for d in range(1, 8)]
    )
    conf = {"from_date": day(-7), "to_date": day(0)}

    def run_backfill():
        dag_run = run_dag("example_stripe_usage_backfill", run_conf=conf)
        assert task_states(dag_run)["bill_range"] == "success"
        assert server.ledger.figures("ai_tokens_used") == source_figures(db_rows(usage_db))
        return xcoms(dag_run, "bill_range")

    first = run_backfill()
    assert (first["sent"], first["already_recorded"]) == (84, 0)
    events_after_first = len(server.ledger.accepted())

    advance(server, 25 * 3600)  # Stripe has forgotten every identifier of the first run
    second = run_backfill()
    # The ledger says what the first run sent: nothing is read from Stripe, nothing re-sent.
    assert (second["sent"], second["already_recorded"], second["summary_requests"]) == (0, 84, 0)
    assert len(server.ledger.accepted()) == events_after_first  # nothing re-sent

    late = [("cus_00", 5, at(-1, 50_000)), ("cus_03", 7, at(-6, 60_000)), ("cus_new", 9, at(-4, 100))]
    add_rows(usage_db, late)
    advance(server, 25 * 3600)
    third = run_backfill()
    assert (third["sent"], third["already_recorded"]) == (3, 82)
    assert third["actions"]["top_up"] == 2
    assert third["actions"]["send"] == 1
    assert len(server.ledger.accepted()) == events_after_first + 3


def test_late_rows_while_stripe_still_remembers_the_first_run_are_billed_once(
    monkeypatch, usage_db, stop_after
):
    server = serve(monkeypatch, {"ai_tokens_used": {}})
    stop_after(server)
    add_rows(usage_db, [(f"cus_{c}", 100 + c, at(-d, 7_200)) for c in range(5) for d in (1, 3)])
    conf = {"from_date": day(-7), "to_date": day(0)}
    run_dag("example_stripe_usage_backfill", run_conf=conf)
    add_rows(usage_db, [("cus_1", 11, at(-1, 9_000)), ("cus_2", 22, at(-3, 9_000))])

    for _ in range(2):
        dag_run = run_dag("example_stripe_usage_backfill", run_conf=conf)
        assert server.ledger.figures("ai_tokens_used") == source_figures(db_rows(usage_db))

    identifiers = {e.identifier for e in server.ledger.accepted()}
    meter = server.ledger.meter_for("ai_tokens_used").id
    # Each difference is its day's second event in the ledger, and its identifier says so.
    assert f"sm:ai_tokens_used:cus_1:{day(-1)}:2:{meter}" in identifiers
    assert f"sm:ai_tokens_used:cus_2:{day(-3)}:2:{meter}" in identifiers
    assert len(identifiers) == 12
    assert xcoms(dag_run, "bill_range")["already_recorded"] == 10


def test_count_and_last_meters_are_billed_by_their_own_formula(monkeypatch, stop_after):
    meters = {"api_calls": {"formula": "count"}, "seats": {"formula": "last"}, "ai_tokens_used": {}}
    server = serve(monkeypatch, meters)
    stop_after(server)
    rows = []
    for c in range(4):
        for d in (1, 2):
            rows += [[f"cus_{c}", 1, at(-d, 600 * k + c), "api_calls"] for k in range(3 + c)]
            rows += [[f"cus_{c}", 10 + k, at(-d, 900 * k), "seats"] for k in (2, 0, 1)]  # latest is 12
            rows += [[f"cus_{c}", 7, at(-d, 60), "ai_tokens_used"]]

    def run_and_check(all_rows):
        dag_run = run_dag("t_truth_rows", run_conf={"rows": all_rows})
        assert task_states(dag_run)["bill"] == "success"
        for name, meter in meters.items():
            mine = [r for r in all_rows if r[3] == name]
            assert server.ledger.figures(name) == source_figures(mine, meter.get("formula", "sum")), name
        return xcoms(dag_run, "bill")

    outcome = run_and_check(rows)
    assert outcome["totals"]["api_calls"]["value"] == sum(3 + c for c in range(4)) * 2
    assert outcome["totals"]["seats"]["value"] == 12 * 8
    # Late rows: two more calls for cus_0 yesterday, and a later seat count.
    rows += [["cus_0", 1, at(-1, 20_000), "api_calls"], ["cus_0", 1, at(-1, 20_001), "api_calls"]]
    rows += [["cus_1", 3, at(-1, 30_000), "seats"]]
    outcome = run_and_check(rows)
    assert (outcome["sent"], outcome["over"]) == (2, 0)  # a lower latest seat count is not "over"
    calls = [e for e in server.ledger.accepted("api_calls") if e.payload["stripe_customer_id"] == "cus_0"]
    assert len(calls) == 3 + 3 + 2  # one event a row, each once


def test_a_meter_that_cannot_be_billed_exactly_is_refused_before_anything_is_sent(monkeypatch, stop_after):
    server = serve(monkeypatch, {"api_calls": {"formula": "count", "event_time_window": "day"}})
    stop_after(server)

    dag_run = run_dag("t_truth_rows", run_conf={"rows": [["cus_a", 1, at(-1, 5), "api_calls"]]})

    [ti] = [t for t in dag_run.get_task_instances() if t.task_id == "bill"]
    assert (str(ti.state), ti.try_number) == ("failed", 1)
    assert server.stats["v1_meter_event"] == 0


def test_a_retry_after_a_failed_try_sends_only_what_stripe_does_not_hold(monkeypatch, usage_db, stop_after):
    server = serve(monkeypatch, {"ai_tokens_used": {}})
    stop_after(server)
    add_rows(usage_db, [(f"cus_{c:02d}", c + 1, at(-1, c)) for c in range(30)])
    # Stripe goes down after 10 events for 5 s, far longer than the task's outage_timeout (0.5 s):
    # 2 s was once ridden out under load (the first try succeeded); the retry comes 6 s later.
    server.outage(5.0, path_prefix="/v1/billing/meter_events", after_requests=10)

    dag_run = run_dag("t_truth_resume")

    [ti] = dag_run.get_task_instances()
    assert (str(ti.state), ti.try_number) == ("success", 2)
    assert server.ledger.figures("ai_tokens_used") == source_figures(db_rows(usage_db))
    assert len(server.ledger.accepted()) == 30
    outcome = xcoms(dag_run, "bill")
    # The first try left the events the outage stopped pending in the ledger; the retry sent
    # them under the same identifiers (Stripe held none of them), read nothing from Stripe,
    # and sent nothing Stripe held.
    assert outcome["summary_requests"] == 0
    assert (outcome["sent"], outcome["already_recorded"]) == (0, 30)
    assert 0 < outcome["ledger"]["settled"] <= 20
    assert server.stats["duplicates_rejected"] == 0


@pytest.mark.parametrize(
    ("dag_id", "seconds"), [("t_truth_outage", 8.0), ("t_truth_outage_stream", 8.0)], ids=["v1", "v2-stream"]
)
def test_an_outage_after_a_third_is_ridden_out(monkeypatch, usage_db, stop_after, dag_id, seconds):
    # 8 s of real outage takes the probes' waits through 1, 2 and 4 s; the cap on those waits
    # (15 s) and what outage_timeout does past it are tested on the deliverer itself, in
    # virtual time (tests/utils/test_delivery.py).
    server = serve(monkeypatch, {"ai_tokens_used": {}})
    stop_after(server)
    # v1: 150 customers, the outage after a third of them (each v1 event is a request of its own).
    customers = 300 if dag_id.endswith("stream") else 150
    add_rows(usage_db, [(f"cus_{c:03d}", c + 1, at(-1, c)) for c in range(customers)])
    stream = dag_id.endswith("stream")
    path = "/v2/billing/meter_event_stream" if stream else "/v1/billing/meter_events"
    server.outage(seconds, path_prefix=path, after_requests=1 if stream else 50)

    dag_run = run_dag(dag_id)

    [ti] = dag_run.get_task_instances()
    assert (str(ti.state), ti.try_number) == ("success", 1)
    assert server.outages_started == 1
    assert server.ledger.figures("ai_tokens_used") == source_figures(db_rows(usage_db))
    identifiers = [e.identifier for e in server.ledger.accepted()]
    assert len(identifiers) == len(set(identifiers)) == customers
    outcome = xcoms(dag_run, "bill")
    assert outcome["outages"] >= 1
    assert outcome["sent"] == customers


def test_the_stream_bills_exactly_across_reruns_late_rows_and_the_identifier_window(monkeypatch, stop_after):
    server = serve(monkeypatch, {"ai_tokens_used": {}})
    stop_after(server)
    rows = [[f"cus_{c:03d}", 5, at(-d, c), "ai_tokens_used"] for c in range(150) for d in (1, 4)]
    first = xcoms(run_dag("t_truth_rows_stream", run_conf={"rows": rows}), "bill")
    assert server.ledger.figures("ai_tokens_used") == source_figures(rows)
    assert first["sent"] == 300
    rows += [["cus_007", 2, at(-1, 9_000), "ai_tokens_used"]]  # a late row for a fresh day

    for _ in range(2):
        dag_run = run_dag("t_truth_rows_stream", run_conf={"rows": rows})
        assert server.ledger.figures("ai_tokens_used") == source_figures(rows)
    outcome = xcoms(dag_run, "bill")
    assert (outcome["sent"], outcome["already_recorded"]) == (0, 300)

    advance(server, 25 * 3600)  # Stripe forgets every identifier; the stream would drop nothing
    rows += [["cus_100", 3, at(-4, 9_000), "ai_tokens_used"]]  # and a late row for an old day
    dag_run = run_dag("t_truth_rows_stream", run_conf={"rows": rows})
    assert server.ledger.figures("ai_tokens_used") == source_figures(rows)
    outcome = xcoms(dag_run, "bill")
    assert (outcome["sent"], outcome["already_recorded"]) == (1, 299)
    # Every identifier the ledger gives is new to Stripe, so the stream carries every event.
    assert {e.api for e in server.ledger.accepted()} == {"v2_stream"}
    assert len(server.ledger.accepted()) == 302


def test_dry_run_says_what_a_real_run_would_do_and_sends_nothing(monkeypatch, stop_after, ledger_db):
    server = serve(monkeypatch, {"ai_tokens_used": {}})
    server.ledger.customers = {"cus_a", "cus_b", "cus_c", "cus_d"}
    stop_after(server)
    rows = [["cus_a", 10, at(-3, 5), "ai_tokens_used"], ["cus_b", 20, at(-3, 5), "ai_tokens_used"]]
    rows += [["cus_c", 30, at(-3, 5), "ai_tokens_used"]]
    run_dag("t_truth_rows", run_conf={"rows": rows})
    requests_before = server.stats["v1_meter_event"]
    changed = [
        ["cus_a", 10, at(-3, 5), "ai_tokens_used"],  # unchanged
        ["cus_b", 20, at(-3, 5), "ai_tokens_used"],
        ["cus_b", 4, at(-3, 99), "ai_tokens_used"],  # late row
        ["cus_c", 25, at(-3, 5), "ai_tokens_used"],  # the source shrank
        ["cus_d", 8, at(-2, 5), "ai_tokens_used"],  # a new day
        ["cus_ghost", 1, at(-3, 5), "ai_tokens_used"],  # Stripe does not know this customer
    ]

    dag_run = run_dag("t_truth_rows_dry", run_conf={"rows": changed})

    assert server.stats["v1_meter_event"] == requests_before
    outcome = xcoms(dag_run, "bill")
    plan = {line["customer_id"]: line for line in outcome["plan"]}
    assert {c: plan[c]["action"] for c in plan} == {
        "cus_a": "leave_alone",
        "cus_b": "top_up",
        "cus_c": "correct",
        "cus_d": "send",
        # Stripe would take an unknown customer's events and drop them: held, and said so.
        "cus_ghost": "leave_alone",
    }
    assert (plan["cus_b"]["value_sent"], plan["cus_c"]["value_sent"], plan["cus_d"]["value_sent"]) == (
        4,
        -5,
        8,
    )
    assert outcome["actions"] == {"send": 1, "top_up": 1, "leave_alone": 2, "correct": 1, "report": 0}
    assert outcome["totals"]["ai_tokens_used"]["to_send"] == 7
    assert outcome["invoices"]["customer_unknown"] == {"customer_days": 1, "value": 1}
    assert outcome["dry_run"] is True
    with sqlite3.connect(ledger_db) as con:  # a dry run writes nothing to the ledger either
        assert con.execute("SELECT count(*) FROM stripe_meter_ledger").fetchone() == (3,)


def test_a_shrunk_source_is_corrected_with_a_negative_event(monkeypatch, stop_after):
    server = serve(monkeypatch, {"ai_tokens_used": {}})
    stop_after(server)
    run_dag("t_truth_rows", run_conf={"rows": [["cus_a", 50, at(-2, 5), "ai_tokens_used"]]})
    shrunk = [["cus_a", 35, at(-2, 5), "ai_tokens_used"]]  # the row was corrected in the warehouse

    dag_run = run_dag("t_truth_rows", run_conf={"rows": shrunk})

    outcome = xcoms(dag_run, "bill")
    assert (outcome["over"], outcome["actions"]["correct"], outcome["success"]) == (0, 1, True)
    assert server.ledger.figures("ai_tokens_used") == {("cus_a", day(-2)): 35}
    assert [int(e.payload["value"]) for e in server.ledger.accepted()] == [50, -15]
    again = xcoms(run_dag("t_truth_rows", run_conf={"rows": shrunk}), "bill")
    assert (again["events_sent"], again["success"]) == (0, True)


def test_usage_older_than_35_days_is_billed_once_at_the_oldest_instant_on_request(monkeypatch, stop_after):
    server = serve(monkeypatch, {"ai_tokens_used": {}})
    stop_after(server)
    landing = pendulum.now("UTC").subtract(days=35).add(hours=1, seconds=60)
    rows = [
        ["cus_a", 40, at(-40, 5), "ai_tokens_used"],
        ["cus_b", 3, at(-38, 5), "ai_tokens_used"],
        ["cus_a", 6, at(-2, 5), "ai_tokens_used"],
        # In the window, on the day the late usage will land on: its figure must stay its own.
        ["cus_a", 2, landing.add(seconds=30).strftime("%Y-%m-%d %H:%M:%S"), "ai_tokens_used"],
    ]

    skipped = xcoms(run_dag("t_truth_rows", run_conf={"rows": rows}), "bill")
    assert (skipped["skipped_too_old"], skipped["billed_late"]) == (2, 0)
    started = pendulum.now("UTC").int_timestamp
    dag_run = run_dag("t_truth_rows_late", run_conf={"rows": rows})
    ended = pendulum.now("UTC").int_timestamp

    outcome = xcoms(dag_run, "bill")
    assert (outcome["billed_late"], outcome["billed_late_rows"], outcome["billed_late_value"]) == (2, 2, 43)
    assert (outcome["skipped_too_old"], outcome["success"]) == (0, True)
    meter = server.ledger.meter_for("ai_tokens_used").id
    # Events of days older than Stripe's window: the day is the identifier's fourth part.
    late = {e.identifier: e for e in server.ledger.accepted() if e.identifier.split(":")[3] < day(-35)}
    # The ledger keeps each old day as its own customer-day; the events carry the oldest
    # instant Stripe takes (35 days less safety_margin) as the run read its source.
    assert set(late) == {
        f"sm:ai_tokens_used:cus_a:{day(-40)}:1:{meter}",
        f"sm:ai_tokens_used:cus_b:{day(-38)}:1:{meter}",
    }
    oldest = 35 * DAY - 3600
    assert all(started - oldest - 5 <= e.timestamp <= ended - oldest for e in late.values())

    rows.append(["cus_a", 5, at(-40, 99), "ai_tokens_used"])  # a late row for the old day
    outcome = xcoms(run_dag("t_truth_rows_late", run_conf={"rows": rows}), "bill")
    assert (outcome["billed_late"], outcome["billed_late_before"], outcome["billed_late_value"]) == (1, 1, 5)
    assert f"sm:ai_tokens_used:cus_a:{day(-40)}:2:{meter}" in {e.identifier for e in server.ledger.accepted()}

    advance(server, 25 * 3600)  # Stripe forgets the identifiers; the operator still knows
    events_before = len(server.ledger.accepted())
    outcome = xcoms(run_dag("t_truth_rows_late", run_conf={"rows": rows}), "bill")
    assert len(server.ledger.accepted()) == events_before
    assert (outcome["billed_late"], outcome["billed_late_before"], outcome["over"]) == (0, 2, 0)
    assert outcome["success"] is True
    assert server.ledger.totals() == {"cus_a": 40 + 5 + 6 + 2, "cus_b": 3}
