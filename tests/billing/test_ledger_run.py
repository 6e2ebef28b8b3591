"""The billing core against the ledger, in-process: the histories billing teams live, each
asserting Stripe's per-day figures (by the meter's formula, events Stripe dropped excluded) and
``success`` after every run. Stripe is the local server's ledger, called in-process; the ledger
is SQLite; one clock drives both."""

from __future__ import annotations

import contextlib
import sqlite3

import pytest

from airflow_provider_stripe_meter.testing.inprocess import Killed
from tests.billing.world import DAY, HOUR, World, iso, midnight


@pytest.fixture
def world(tmp_path, monkeypatch):
    def make(**kwargs):
        return World(tmp_path, monkeypatch, **kwargs)

    return make


def nightly_rows(w: World, customers: int, day: int = -1, per_customer: int = 1, base: int = 100) -> None:
    for c in range(customers):
        for r in range(per_customer):
            w.add(f"cus_{c:03d}", base + c + r, midnight(day, int(w.now)) + HOUR * (1 + r) + c)


def run_b_while_a_waits_to_deliver(w: World) -> tuple[dict, dict]:
    """Run A, which stops once it has planned (before it delivers) while run B bills the same
    days; A then delivers what it planned. Returns A's result and B's."""
    from airflow_provider_stripe_meter.billing.run import BillingRun

    original = BillingRun.deliver_planned
    started: list[BillingRun] = []

    def pause_first(self):
        if not started:
            started.append(self)
            w.run(run_id="B")
        original(self)

    BillingRun.deliver_planned = pause_first
    try:
        a = w.run(run_id="A")
    finally:
        BillingRun.deliver_planned = original
    return a, w.results[0]


def test_a_night_is_billed_once_and_a_rerun_sends_and_reads_nothing(world):
    w = world()
    nightly_rows(w, 5)
    first = w.run()
    assert (first["success"], first["sent"], first["events_sent"]) == (True, 5, 5)
    assert first["ledger"]["written"] == 5
    assert w.billed() == w.source()

    w.advance(6 * HOUR)
    again = w.run()
    assert (again["success"], again["sent"], again["already_recorded"], again["events_sent"]) == (
        True,
        0,
        5,
        0,
    )
    assert again["summary_requests"] == 0
    assert w.stripe.requests["summaries"] == 0
    assert w.billed() == w.source()


# -- the histories of the ledger issue ---------------------------------------------------------


def test_backfill_with_bill_at_oldest_36_days_after_the_nightly_run_bills_nothing_twice(world):
    w = world()
    nightly_rows(w, 30, per_customer=3)
    assert w.run()["success"]
    billed = w.billed()
    assert billed == w.source()

    w.advance(36 * DAY)
    backfill = w.run(too_old="bill_at_oldest", run_id="backfill")
    assert backfill["events_sent"] == 0
    assert (backfill["billed_late"], backfill["billed_late_before"]) == (0, 30)
    assert backfill["success"] is True
    assert w.billed() == billed


@pytest.mark.parametrize("rerun_after", [6 * 60, 100], ids=["cleared_6_min_later", "retried_100_s_later"])
def test_summaries_that_trail_by_10_minutes_do_not_make_a_rerun_send_again(world, rerun_after):
    w = world(summary_lag=600)
    nightly_rows(w, 20)
    assert w.run()["success"]
    w.advance(rerun_after)
    again = w.run(run_id="nightly-cleared")
    assert (again["success"], again["events_sent"]) == (True, 0)
    assert w.billed() == w.source()


def test_confirm_summaries_retry_after_a_lagging_read_back_confirms_without_sending_again(world):
    w = world(summary_lag=100)
    nightly_rows(w, 15)
    first = w.run_confirmed(summary_lag=60)
    # Read back 60 s after the last answer, Stripe's summaries (100 s behind) do not show it yet.
    assert (first["success"], first["unconfirmed"]) == (False, 15)
    w.advance(5 * 60)
    retry = w.run_confirmed(summary_lag=60, run_id="nightly-retry")
    assert (retry["success"], retry["events_sent"]) == (True, 0), retry["samples"]
    assert retry["ledger"]["settled"] == 15
    assert w.billed() == w.source()


def test_hourly_day_so_far_runs_beside_the_nightly_run_bill_each_day_once(world):
    w = world()
    # 25 customer-days over a day, rows every hour; hourly runs bill the day so far.
    for hour in range(24):
        for c in range(25):
            if (hour + c) % 3 == 0:
                w.add(f"cus_{c:03d}", 10 * hour + c + 1, midnight(0) + hour * HOUR + 60 + c)
    for hour in range(1, 25):
        w.now = midnight(0) + hour * HOUR + 30 * 60
        hourly = w.run(since=midnight(0), run_id=f"hourly-{hour}")
        assert hourly["success"], hourly["samples"]
        assert w.billed() == w.source(until=w.now)
    w.now = midnight(1) + 2 * HOUR
    nightly = w.run(since=midnight(0), until=midnight(1), run_id="nightly")
    assert (nightly["success"], nightly["events_sent"]) == (True, 0)
    assert w.billed() == w.source()


def test_count_meter_deactivated_mid_run_then_reactivated_is_exact_after_the_rerun(world):
    w = world(formula="count")
    nightly_rows(w, 40, per_customer=3)
    w.stripe_state.after_accepted(50, lambda: w.stripe_state.deactivate("ai_tokens_used"))
    first = w.run()
    assert first["success"] is False
    assert first["unconfirmed"] > 0
    w.stripe_state.reactivate("ai_tokens_used")
    w.advance(600)
    again = w.run(run_id="rerun")
    assert again["success"], again["samples"]
    assert again["ledger"]["settled"] == 120
    assert w.billed() == w.source()


def test_count_meter_customers_created_after_the_night_are_billed_by_the_rerun(world):
    known = [f"cus_{c:03d}" for c in range(7)]
    w = world(formula="count", customers=known)
    nightly_rows(w, 10, per_customer=2)
    # Stripe takes events of customers it does not know and drops them: only a read-back sees it.
    first = w.run_confirmed()
    assert first["success"] is False
    assert first["customer_unknown"] == 3
    for c in range(7, 10):
        w.stripe_state.customers.add(f"cus_{c:03d}")  # the CRM sync caught up
    w.advance(HOUR)
    again = w.run(run_id="rerun")
    assert (again["success"], again["sent"]) == (True, 3)
    assert w.billed() == w.source()


def test_count_day_that_shrinks_is_corrected_by_cancelling_and_later_rows_still_count(world):
    w = world(formula="count")
    nightly_rows(w, 10, per_customer=5)
    assert w.run()["success"]
    # Two rows of every customer were duplicates in the warehouse and are deleted.
    w.rows = [r for i, r in enumerate(w.rows) if i % 5 not in (1, 2)]
    w.advance(2 * HOUR)
    corrected = w.run(run_id="corrected")
    assert corrected["success"], corrected["samples"]
    assert corrected["ledger"]["cancelled"] == 20
    assert w.billed() == w.source()
    # New rows arrive for the day.
    for c in range(10):
        w.add(f"cus_{c:03d}", 1, midnight(-1) + 20 * HOUR + c)
    w.advance(2 * HOUR)
    late = w.run(run_id="late rows")
    assert (late["success"], late["events_sent"]) == (True, 10)
    assert w.billed() == w.source()


def test_bill_at_oldest_import_with_the_meter_deactivated_mid_run_loses_no_late_usage(world):
    w = world()
    for c in range(60):
        for d in (-45, -40):
            w.add(f"cus_{c:03d}", 1000 + c, midnight(d) + HOUR)
    w.stripe_state.after_accepted(40, lambda: w.stripe_state.deactivate("ai_tokens_used"))
    first = w.run(too_old="bill_at_oldest", run_id="import")
    assert first["success"] is False
    w.stripe_state.reactivate("ai_tokens_used")
    w.advance(600)
    again = w.run(too_old="bill_at_oldest", run_id="import-again")
    assert again["success"], again["samples"]
    totals = w.stripe_state.totals("ai_tokens_used")
    assert totals == {f"cus_{c:03d}": 2 * (1000 + c) for c in range(60)}


def test_last_meter_seats_down_to_zero_are_billed_as_zero(world):
    w = world(formula="last")
    for c in range(12):
        w.add(f"cus_{c:03d}", 5, midnight(-2) + HOUR)
        w.add(f"cus_{c:03d}", 0 if c % 2 else 4, midnight(-1) + HOUR)
    w.now = midnight(-1) + 2 * HOUR
    assert w.run(until=midnight(-1))["success"]
    w.now = midnight(0) + 2 * HOUR
    assert w.run(since=midnight(-1))["success"]
    assert w.billed() == w.source()
    # And over the billing period (both days), the last value is the newest day's.
    meter = w.meter
    for c in range(12):
        [summary] = w.stripe_state.summarize(meter, f"cus_{c:03d}", midnight(-2), midnight(0), None)
        assert summary["aggregated_value"] == (0 if c % 2 else 4)


@pytest.mark.parametrize("window", [None, "day"], ids=["last", "pre_aggregated_day"])
def test_hourly_run_retried_after_the_nightly_run_leaves_the_days_last_snapshot(world, window):
    w = world(formula="last", window=window)
    w.add("cus_a", 3, midnight(0) + 10 * HOUR)
    w.add("cus_a", 7, midnight(0) + 23 * HOUR)
    w.now = midnight(0) + 11 * HOUR
    assert w.run(since=midnight(0), run_id="hourly-11")["success"]
    w.now = midnight(1) + 2 * HOUR
    assert w.run(since=midnight(0), until=midnight(1), run_id="nightly")["success"]
    w.advance(HOUR)
    retry = w.run(since=midnight(0), until=midnight(0) + 11 * HOUR, run_id="hourly-11")
    assert (retry["success"], retry["events_sent"]) == (True, 0)
    assert w.billed() == {("cus_a", iso(midnight(0))): 7}


def test_the_oldest_day_of_a_backfill_is_never_corrected_away(world):
    w = world()
    oldest_day = midnight(-35)
    for c in range(20):
        for h in range(24):
            w.add(f"cus_{c:03d}", 100 + c, oldest_day + h * HOUR + 30 * 60)
    first = w.run(run_id="backfill")
    billed = w.billed()
    assert billed
    assert first["over"] == 0
    w.advance(6 * HOUR)  # six more hours of that day are now older than Stripe's 35 days
    again = w.run(run_id="backfill-rerun")
    assert (again["over"], again["events_sent"]) == (0, 0)
    assert w.billed() == billed


def test_refunds_a_day_that_nets_negative_is_billed_negative(world):
    w = world()
    w.add("cus_r", 100, midnight(-1) + HOUR)
    w.add("cus_r", -150, midnight(-1) + 2 * HOUR)
    w.add("cus_s", 80, midnight(-1) + HOUR)
    first = w.run()
    assert (first["success"], first["over"]) == (True, 0)
    assert w.billed() == {("cus_r", iso(midnight(-1))): -50, ("cus_s", iso(midnight(-1))): 80}
    w.add("cus_s", -30, midnight(-1) + 5 * HOUR)  # a refund recorded later
    w.advance(HOUR)
    assert w.run()["success"]
    assert w.billed() == w.source()


# -- the histories of earlier rounds, on the ledger --------------------------------------------


@pytest.mark.parametrize("api", ["v1", "v2_stream"])
@pytest.mark.parametrize("past_window", [False, True], ids=["rerun_soon", "rerun_after_25_hours"])
def test_killed_at_every_instant_then_rerun_is_exact(world, api, past_window):
    for kill_after in range(1, 12):
        w = world()
        nightly_rows(w, 6, per_customer=2)
        w.add("cus_000", 9, midnight(-3) + HOUR)
        w.stripe.kill_after(kill_after)
        with contextlib.suppress(Killed):
            w.run(api=api)
        w.stripe.kill_after(None)
        w.advance(25 * HOUR if past_window else 60)
        again = w.run(api=api, run_id="retry")
        assert again["success"], (kill_after, again["samples"])
        assert w.billed() == w.source(), kill_after
        assert not [r for r in w.ledger_rows() if r[4] == "pending"]


def test_answers_lost_after_stripe_took_the_event_bill_once(world):
    w = world()
    nightly_rows(w, 30)
    w.stripe.lose_answers(3)
    result = w.run()
    assert result["success"], result["samples"]
    assert w.billed() == w.source()


def test_late_rows_and_a_clock_past_the_identifier_window_are_billed_once(world):
    w = world()
    nightly_rows(w, 10)
    assert w.run()["success"]
    w.add("cus_001", 50, midnight(-1) + 20 * HOUR)
    w.advance(30 * DAY)
    late = w.run(run_id="a month later")
    assert (late["success"], late["sent"], late["events_sent"]) == (True, 1, 1)
    assert w.billed() == w.source()
    assert w.run(run_id="and again")["events_sent"] == 0


def test_two_runs_planning_the_same_days_at_once_bill_them_once(world):
    w = world()
    nightly_rows(w, 8)
    # Run A plans, then run B bills the same days, then A delivers what it planned.
    a, b = run_b_while_a_waits_to_deliver(w)
    assert (b["success"], b["sent"]) == (True, 8)
    assert (a["success"], a["failed"]) == (False, 8)
    assert w.billed() == w.source()
    retry = w.run(run_id="A-retry")
    assert (retry["success"], retry["events_sent"]) == (True, 0)


@pytest.mark.parametrize("formula", ["sum", "count", "last"])
def test_a_lost_ledger_is_rebuilt_from_stripes_summaries_by_adopt(world, formula):
    w = world(formula=formula)
    nightly_rows(w, 12, per_customer=3)
    assert w.run()["success"]
    w.db.unlink()  # the ledger's database is lost
    w.add("cus_001", 7, midnight(-1) + 20 * HOUR)  # and a late row arrived meanwhile
    w.advance(3 * DAY)
    adopted = w.run(adopt=True, run_id="adopt")
    assert adopted["success"], adopted["samples"]
    assert adopted["ledger"]["adopted"] == (36 if formula == "count" else 12)
    # 12 customers asked; then the one sent to read back (a recovery run checks what it sends).
    assert (adopted["sent"], adopted["summary_requests"]) == (1, 13)
    assert w.billed() == w.source()
    after = w.run(run_id="the next night")
    assert (after["events_sent"], after["summary_requests"]) == (0, 0)


def test_a_seat_count_that_flips_back_and_forth_is_billed_every_hour(world):
    w = world(formula="last")
    for hour, seats in enumerate([5, 3, 5, 3, 5], start=1):
        w.add("cus_team", seats, midnight(-2) + hour * HOUR)
        w.now = midnight(-2) + hour * HOUR + 600
        result = w.run(since=midnight(-2), run_id=f"hourly-{hour}")
        assert result["success"], result["samples"]
        assert w.billed() == {("cus_team", iso(midnight(-2))): seats}
    identifiers = [e.identifier for e in w.stripe_state.accepted()]
    assert len(identifiers) == len(set(identifiers)) == 5


def test_a_sum_day_corrected_in_place_down_and_up_lands_every_figure(world):
    w = world()
    w.add("cus_a", 100, midnight(-3) + 60)
    for late in (50, 0, 50, 0):
        w.rows = [r for r in w.rows if r[2] != midnight(-3) + 120] + [("cus_a", late, midnight(-3) + 120)]
        w.advance(HOUR)
        result = w.run()
        assert (result["success"], result["over"]) == (True, 0)
        assert w.billed() == w.source()
    assert [int(e.payload["value"]) for e in w.stripe_state.accepted()] == [150, -50, 50, -50]


def test_a_deleted_newest_row_is_shown_as_an_older_view_not_guessed(world):
    w = world()
    w.add("cus_a", 100, midnight(-3) + 60)
    w.add("cus_a", 50, midnight(-3) + 120)
    assert w.run()["success"]
    w.rows.pop()  # the newest row is deleted: the source now ends before what the ledger billed from
    w.advance(HOUR)
    result = w.run()
    assert (result["success"], result["events_sent"]) == (True, 0)
    [shown] = result["samples"]["older_view"]
    assert (shown["expected"], shown["recorded"]) == (100, 150)


def test_work_left_for_while_events_are_out_is_done_once_and_a_failure_there_sends_all_the_same(
    world, caplog
):
    # The subscriptions table is written this way: on the run's thread, after the first slice's
    # rows are written pending and while its requests are out; it is kept if the write fails.
    from airflow_provider_stripe_meter.billing.periods import PeriodBook

    w = world()
    nightly_rows(w, 5)
    done: list[int] = []
    book = PeriodBook({}, (), int(w.now))

    def fails_once() -> None:
        if not done:
            done.append(len(w.stripe_state.accepted()))
            raise RuntimeError("database went away")
        done.append(-1)

    book.pending = [fails_once]
    first = w.run(meanwhile=[book.save])
    assert (first["success"], first["events_sent"]) == (True, 5)
    assert w.billed() == w.source()
    assert len(done) == 1  # tried once, while the run was sending
    assert 0 <= done[0] <= 5
    assert "database went away" in caplog.text
    assert book.pending == [fails_once]  # kept: the operator writes it again after the run
    book.save()
    assert done[1:] == [-1]
    assert book.pending == []
    w.advance(HOUR)
    assert w.run(meanwhile=[book.save])["events_sent"] == 0  # nothing left to do, nothing sent


# -- planning a slice ahead of the one being sent ------------------------------------------------


@pytest.fixture
def slices_of_three(monkeypatch):
    """Slices of 3 events, and a note of how many ledger rows were written as each customer-day
    was planned."""
    from airflow_provider_stripe_meter.billing import run as run_module

    monkeypatch.setattr(run_module, "SLICE", 3)
    seen: list[tuple[str, int]] = []
    faults: dict[str, BaseException] = {}
    original = run_module.plan_day

    def noting(aggregate, *args, **kwargs):
        if aggregate.customer_id in faults:
            raise faults.pop(aggregate.customer_id)
        with sqlite3.connect(noting.db) as con:
            written = con.execute("SELECT COUNT(*) FROM stripe_meter_ledger").fetchone()[0]
        seen.append((aggregate.customer_id, written))
        return original(aggregate, *args, **kwargs)

    monkeypatch.setattr(run_module, "plan_day", noting)
    return noting, seen, faults


def test_each_slice_is_planned_while_the_one_before_is_out(world, slices_of_three):
    noting, seen, _ = slices_of_three
    w = world()
    noting.db = w.db
    nightly_rows(w, 10)
    result = w.run()
    assert (result["success"], result["sent"], result["events_sent"]) == (True, 10, 10)
    assert w.billed() == w.source()
    written = dict(seen)
    # The first slice is planned before anything is written; each next one once the slice before
    # it is written, while its requests are out (the deliverer's ``meanwhile``).
    assert [written[f"cus_{c:03d}"] for c in range(10)] == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9]


def test_a_run_killed_while_planning_ahead_is_billed_once_by_the_next(world, slices_of_three):
    noting, _, faults = slices_of_three
    w = world()
    noting.db = w.db
    nightly_rows(w, 10)
    faults["cus_007"] = Killed("kill -9 while the third slice is planned")
    with pytest.raises(Killed):
        w.run()
    # Killed while the second slice's requests were out: that slice alone is left pending.
    assert sorted(r[4] for r in w.ledger_rows()) == ["accepted"] * 3 + ["pending"] * 3
    w.advance(60)
    again = w.run(run_id="retry")
    assert again["success"], again["samples"]
    assert w.billed() == w.source()
    assert not [r for r in w.ledger_rows() if r[4] == "pending"]


def test_planning_that_fails_while_a_slice_is_out_fails_the_run_after_the_slice_is_resolved(
    world, slices_of_three
):
    noting, _, faults = slices_of_three
    w = world()
    noting.db = w.db
    nightly_rows(w, 10)
    faults["cus_007"] = RuntimeError("the ledger's database went away")
    with pytest.raises(RuntimeError, match="went away"):
        w.run()
    # The slices sent before are resolved: nothing is left pending for the next run to settle.
    states = [r[4] for r in w.ledger_rows()]
    assert states == ["accepted"] * 6
    again = w.run(run_id="retry")
    assert (again["success"], again["events_sent"]) == (True, 4)
    assert w.billed() == w.source()


def test_two_runs_at_once_bill_each_day_once_when_the_plan_runs_ahead(world, slices_of_three):
    noting, _, _ = slices_of_three
    w = world()
    noting.db = w.db
    nightly_rows(w, 10)
    # Run A plans its first slice, then run B bills every day, then A sends: none of A's slices
    # gets through (nothing of them is sent), and A plans each next one itself.
    a, b = run_b_while_a_waits_to_deliver(w)
    assert (b["success"], b["sent"]) == (True, 10)
    assert (a["success"], a["failed"], a["events_sent"]) == (False, 10, 0)
    assert w.billed() == w.source()
    assert (w.run(run_id="A-retry")["events_sent"]) == 0
