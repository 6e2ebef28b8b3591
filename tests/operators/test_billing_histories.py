"""Billing truth through real Airflow, where the wiring matters: workers killed with SIGKILL, two
runs at once in separate processes, meters switched off mid-run, answers lost over real HTTP, a
lost ledger adopted. The billing core's histories (hourly beside nightly runs, figures that go
back, summaries that trail, every formula) run in-process in ``tests/billing/test_ledger_run.py``.

Real Airflow (dag.test(), and a separate process for the runs that are killed), the real stripe
SDK and the local server. After every run the test compares Stripe's settled figures (the
server's ledger, by the meter's formula) with the source, and checks the run's ``success``.
"""

from __future__ import annotations

import os
import signal
from collections import defaultdict

import pytest

from airflow_provider_stripe_meter.testing import LocalStripeServer
from tests.conftest import (
    SECRET_KEY,
    at,
    run_dag,
    share_clock,
    spawn_dag,
    task_states,
    xcoms,
)
from tests.operators.test_billing_truth import source_figures

pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("airflow_db")]
DAY = 86400
HOUR = 3600


@pytest.fixture
def serve(monkeypatch):
    """Start a local server with given meters (24-hour identifier window); checked and stopped after."""
    servers: list[LocalStripeServer] = []

    def start(meters: dict[str, dict], *, summary_lag: float = 0.0, **conn_extra) -> LocalStripeServer:
        server = LocalStripeServer(
            api_keys=[SECRET_KEY], validate_spec=True, identifier_window=DAY, summary_lag=summary_lag
        ).start()
        servers.append(server)
        for name, settings in meters.items():
            server.ledger.add_meter(name, **settings)
        monkeypatch.setenv(
            "AIRFLOW_CONN_STRIPE_DEFAULT",
            server.connection_json(SECRET_KEY, max_network_retries=1, **conn_extra),
        )
        return server

    yield start
    for server in servers:
        server.stop()
        assert server.spec_violations == [], server.spec_violations
        assert server.request_violations == [], server.request_violations


def bill(rows, dag_id="t_truth_rows"):
    """Run the rows DAG; return (bill task state, its outcome)."""
    dag_run = run_dag(dag_id, run_conf={"rows": rows})
    outcome = xcoms(dag_run, "bill")
    return task_states(dag_run)["bill"], outcome.get("return_value", outcome.get("outcome", outcome))


def stamp(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def late_totals(rows):
    """Per customer: the sum of the rows (late usage lands on another day; its total is what counts)."""
    totals: dict[str, int] = defaultdict(int)
    for customer, value, *_ in rows:
        totals[customer] += value
    return dict(totals)


# -- 1. hourly "day so far" runs beside the nightly run, across midnight ---------------------------


# -- 2. a worker killed at any instant -------------------------------------------------------------


def kill_after(server, proc, events: int) -> None:
    """SIGKILL the process right after Stripe accepts its ``events``-th next event (its answer lost)."""
    server.ledger.after_accepted(events, lambda: os.kill(proc.pid, signal.SIGKILL))


def killed_run_landed(server) -> int:
    """What the killed run left in Stripe: its 41 events, and any requests already on their way
    when the kill landed (the server answers what it fully received, as Stripe does)."""
    landed = len(server.ledger.accepted())
    assert 41 <= landed < 60, landed
    return landed


@pytest.mark.parametrize("rerun", ["at_once", "after_the_window"])
def test_a_worker_killed_mid_delivery_then_rerun_bills_exactly(monkeypatch, serve, rerun):
    server = serve({"ai_tokens_used": {}}, summary_lag=1.0)
    clock = share_clock(monkeypatch, server)
    # A fresh day (sent blind) and an old one (looked up), 80 customers each.
    rows = [[f"cus_{c:03d}", 10 + c, at(-d, 60 + c), "ai_tokens_used"] for c in range(80) for d in (1, 5)]

    proc = spawn_dag("t_truth_rows", {"rows": rows})
    kill_after(server, proc, 41)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    landed = killed_run_landed(server)
    if rerun == "after_the_window":
        clock.advance(25 * HOUR)  # Stripe has forgotten every identifier the killed run used

    state, outcome = bill(rows)

    assert (state, outcome["success"]) == ("success", True)
    assert server.ledger.figures("ai_tokens_used") == source_figures(rows)
    # The killed run's events were pending in the ledger: all 160 settled before planning.
    assert outcome["ledger"]["settled"] == 160
    if rerun == "at_once":
        # Sent again under the same identifiers and the killed try's idempotency keys: Stripe
        # replayed its answers to those it held, and took the rest.
        assert (outcome["sent"], outcome["already_recorded"]) == (0, 160)
        assert server.stats["idempotent_replays"] >= landed
        assert server.stats["duplicates_rejected"] == 0
    else:
        # Past Stripe's identifier window: read from the summaries, the rest sent as new events.
        assert (outcome["sent"], outcome["already_recorded"]) == (160 - landed, landed)
    state, outcome = bill(rows)  # and once more: nothing to do
    assert (outcome["sent"], outcome["already_recorded"], outcome["success"]) == (0, 160, True)
    assert len(server.ledger.accepted()) == 160


@pytest.mark.parametrize("rerun", ["after_the_window", "at_once_after_a_slow_send"])
def test_a_worker_killed_while_billing_usage_older_than_35_days_then_rerun_bills_exactly(
    monkeypatch, serve, rerun
):
    slow = rerun == "at_once_after_a_slow_send"
    server = serve({"ai_tokens_used": {}}, summary_lag=3.0 if slow else 1.0)
    clock = share_clock(monkeypatch, server)
    rows = [[f"cus_{c:03d}", 1000 + 13 * c, at(-40 - c % 3, 600), "ai_tokens_used"] for c in range(150)]
    if slow:
        # Stripe is away for longer than its summaries lag, right after the pending entries are
        # written: the killed run's events land long after that write, and the re-run starts
        # before they show in the summaries.
        server.outage(5.0, path_prefix="/v1/billing/meter_events")

    proc = spawn_dag("t_truth_rows_late", {"rows": rows})
    kill_after(server, proc, 41)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    landed = killed_run_landed(server)
    if rerun == "after_the_window":
        clock.advance(25 * HOUR)

    state, outcome = bill(rows, "t_truth_rows_late")

    assert (state, outcome["success"]) == ("success", True)
    assert server.ledger.totals("ai_tokens_used") == late_totals(rows)
    assert outcome["ledger"]["settled"] == 150
    if rerun == "after_the_window":
        # Found in Stripe's summaries, not assumed: the landed ones billed before, the rest now.
        assert (outcome["billed_late"], outcome["billed_late_before"]) == (150 - landed, landed)
    else:
        # Sent again under their identifiers while Stripe still refuses copies.
        assert (outcome["billed_late"], outcome["billed_late_before"]) == (0, 150)
    clock.advance(25 * HOUR)
    state, outcome = bill(rows, "t_truth_rows_late")
    assert (outcome["billed_late"], outcome["billed_late_before"], outcome["success"]) == (0, 150, True)
    assert server.ledger.totals("ai_tokens_used") == late_totals(rows)


def test_late_billing_with_lost_answers_then_an_outage_then_a_rerun_after_the_window(monkeypatch, serve):
    server = serve({"ai_tokens_used": {}})
    clock = share_clock(monkeypatch, server)
    rows = [[f"cus_{c:02d}", 3000 + c, at(-45, 60 * c), "ai_tokens_used"] for c in range(30)]
    # Ten events land with their answers lost, then Stripe is down for longer than the task waits.
    server.inject_failures(10, after_write=True, path_prefix="/v1/billing/meter_events")
    server.outage(5.0, path_prefix="/v1/billing/meter_events", after_requests=14)

    state, _ = bill(rows, "t_truth_rows_late_fragile")
    assert state == "failed"  # retryable (delivery incomplete); this DAG has no retries
    landed = len(server.ledger.accepted())
    assert 0 < landed < 30
    clock.advance(25 * HOUR)

    state, outcome = bill(rows, "t_truth_rows_late")

    assert (state, outcome["success"]) == ("success", True)
    assert server.ledger.totals("ai_tokens_used") == late_totals(rows)
    assert outcome["billed_late"] + outcome["billed_late_before"] == 30


# -- 3. a figure that goes back to an earlier value -------------------------------------------------


# -- 4. summaries that trail Stripe's events ---------------------------------------------------------


# -- 5. success that Stripe does not confirm ----------------------------------------------------------


def test_a_meter_deactivated_mid_run_fails_the_run_and_the_rerun_bills_what_was_dropped(monkeypatch, serve):
    server = serve({"ai_tokens_used": {}})
    rows = [[f"cus_{c:03d}", 1 + c, at(-1, c), "ai_tokens_used"] for c in range(100)]
    server.ledger.after_accepted(31, lambda: server.ledger.deactivate("ai_tokens_used"))

    dag_run = run_dag("t_truth_rows", run_conf={"rows": rows})

    [ti] = [t for t in dag_run.get_task_instances() if t.task_id == "bill"]
    assert (str(ti.state), ti.try_number) == ("failed", 1)  # no retry spent on it
    outcome = xcoms(dag_run, "bill")["outcome"]
    assert (outcome["success"], outcome["unconfirmed"], outcome["sent"]) == (False, 100, 0)
    assert len(server.ledger.accepted()) == 31  # Stripe answered 200 to all and dropped 69

    server.ledger.reactivate("ai_tokens_used")
    state, outcome = bill(rows)

    assert (state, outcome["success"]) == ("success", True)
    assert (outcome["sent"], outcome["already_recorded"]) == (69, 31)
    assert server.ledger.figures("ai_tokens_used") == source_figures(rows)


def test_a_meter_switched_off_and_on_again_mid_run_is_not_a_success(monkeypatch, serve):
    server = serve({"ai_tokens_used": {}})
    rows = [[f"cus_{c:03d}", 1 + c, at(-1, c), "ai_tokens_used"] for c in range(60)]
    server.ledger.after_accepted(20, lambda: server.ledger.deactivate("ai_tokens_used"))
    server.ledger.after_accepted(30, lambda: server.ledger.reactivate("ai_tokens_used"))

    state, outcome = bill(rows)

    assert (state, outcome["success"]) == ("failed", False)  # active at the end, but 10 were dropped
    assert len(server.ledger.accepted()) == 50
    state, outcome = bill(rows)
    assert (state, outcome["success"], outcome["sent"]) == ("success", True, 10)
    assert server.ledger.figures("ai_tokens_used") == source_figures(rows)


@pytest.mark.parametrize(("dag_id", "confirmed"), [("t_truth_rows", 0), ("t_truth_rows_confirm", 5)])
def test_a_customer_stripe_does_not_know_on_a_blind_nightly_send(monkeypatch, serve, dag_id, confirmed):
    server = serve({"ai_tokens_used": {}})
    server.ledger.customers = {f"cus_{c}" for c in range(5)}
    rows = [[f"cus_{c}", 10, at(-1, 5), "ai_tokens_used"] for c in range(5)]
    rows.append(["cus_ghost", 7, at(-1, 5), "ai_tokens_used"])

    state, outcome = bill(rows, dag_id)

    # Whatever the run reads back, the customer is asked about first and its usage held, unsent.
    assert (state, outcome["success"], outcome["customer_unknown"]) == ("success", False, 1)
    assert (outcome["confirmed"], outcome["unverified"]) == (confirmed, 5 - confirmed)
    assert outcome["samples"]["customer_unknown"][0]["customer_id"] == "cus_ghost"
    assert {e.payload["stripe_customer_id"] for e in server.ledger.events} == {f"cus_{c}" for c in range(5)}


# -- 6. the ledger lost -----------------------------------------------------------------------------


def test_after_the_ledger_is_lost_an_adopting_run_bills_nothing_twice(monkeypatch, serve, ledger_db):
    server = serve({"ai_tokens_used": {}})
    clock = share_clock(monkeypatch, server)
    rows = [[f"cus_{c}", 10 + c, at(-1, 60), "ai_tokens_used"] for c in range(8)]
    rows += [[f"cus_{c}", 5, at(0, 0), "ai_tokens_used"] for c in range(8)]  # today, so far
    assert bill(rows)[1]["success"] is True
    clock.advance(25 * HOUR)  # Stripe forgets the identifiers
    ledger_db.unlink()  # and the ledger's database is lost

    state, outcome = bill(rows, "t_truth_rows_adopt")

    assert (state, outcome["success"]) == ("success", True)
    assert (outcome["summary_requests"], outcome["sent"], outcome["already_recorded"]) == (8, 0, 16)
    assert outcome["ledger"]["adopted"] == 16
    assert server.ledger.figures("ai_tokens_used") == source_figures(rows)
    # From then on, the ledger knows again: no summary is read.
    state, outcome = bill(rows)
    assert (outcome["summary_requests"], outcome["events_sent"]) == (0, 0)


# -- 7. what held before and must keep holding -------------------------------------------------------


def test_two_runs_at_once_over_overlapping_days_bill_each_day_once(monkeypatch, serve):
    server = serve({"ai_tokens_used": {}}, summary_lag=0.5)
    fresh = [[f"cus_{c:02d}", 40 + c, at(-1, 100 + c), "ai_tokens_used"] for c in range(40)]
    old = [[f"cus_{c:02d}", 70 + c, at(-6, 100 + c), "ai_tokens_used"] for c in range(40)]
    never = [[f"cus_{c:02d}", 9, at(-3, 100 + c), "ai_tokens_used"] for c in range(40)]
    # The nightly run and a backfill, started together over overlapping days, each day whole.
    first, second = fresh + old, old + never + fresh

    def at_once(sources):
        runs = [spawn_dag("t_truth_rows", {"rows": rows}) for rows in sources]
        assert [run.wait(timeout=180) for run in runs] == [0, 0]
        # The table's key lets one run write each day's next event: a day is never billed twice;
        # where both planned it at once, the run that lost stood back (its retry finishes it).
        held = server.ledger.figures("ai_tokens_used")
        union = list({tuple(r): r for rows in sources for r in rows}.values())
        wanted = source_figures(union)
        assert all(held.get(key, 0) <= figure for key, figure in wanted.items()), (held, wanted)

    at_once([first, second])
    state, outcome = bill(old + never + fresh)  # what a retry of the run that stood back does
    assert (state, outcome["success"]) == ("success", True)
    assert server.ledger.figures("ai_tokens_used") == source_figures(old + never + fresh)

    # Late rows for every kind of day, each run seeing the days it covers whole; both at once again.
    late_first = [
        [f"cus_{c:02d}", 5, at(-d, 5_000), "ai_tokens_used"] for c in range(0, 40, 3) for d in (1, 6)
    ]
    late_never = [[f"cus_{c:02d}", 5, at(-3, 5_000), "ai_tokens_used"] for c in range(0, 40, 3)]
    at_once([first + late_first, second + late_first + late_never])
    everything = old + never + fresh + late_first + late_never
    state, outcome = bill(everything)
    assert (state, outcome["success"]) == ("success", True)
    assert server.ledger.figures("ai_tokens_used") == source_figures(everything)
    state, outcome = bill(everything)
    assert (state, outcome["success"], outcome["events_sent"]) == ("success", True, 0)


def test_thirty_percent_of_answers_lost_after_the_write_bill_exactly(monkeypatch, serve):
    server = serve({"ai_tokens_used": {}, "seats": {"formula": "last"}})
    server.lose_answers(0.3, path_prefix="/v1/billing/meter_events", seed=7)
    rows = [[f"cus_{c:03d}", 100 + c, at(-d, 60), "ai_tokens_used"] for c in range(60) for d in (1, 4)]
    rows += [[f"cus_{c:03d}", 1 + c % 4, at(-2, 60), "seats"] for c in range(30)]

    for changed in (rows, [*rows, ["cus_001", 9, at(-4, 900), "ai_tokens_used"]]):
        state, outcome = bill(changed)
        assert (state, outcome["success"]) == ("success", True)
        assert server.ledger.figures("ai_tokens_used") == source_figures(
            [r for r in changed if r[3] == "ai_tokens_used"]
        )
        assert server.ledger.figures("seats") == source_figures([r for r in rows if r[3] == "seats"], "last")
    assert server.stats["injected_failures"] > 20
