"""The billing planner: per customer-day, what to send so Stripe's figure equals the source's."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from airflow_provider_stripe_meter.billing.meters import MeterUnsupportedError, meter_spec
from airflow_provider_stripe_meter.billing.plans import OLDER_VIEW, PARTIAL_DAY, UNSETTLED, plan_day
from airflow_provider_stripe_meter.ledger.entries import DayFigure
from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate

DAY = date(2026, 11, 20)
DAY_END = int(datetime(2026, 11, 21, tzinfo=timezone.utc).timestamp())
NOW = DAY_END + 3 * 86400  # days later: the day is over
OLDEST = NOW - 35 * 86400  # the oldest instant Stripe accepts


def meter(formula="sum", window=None, **extra):
    return {
        "id": "mtr_1",
        "event_name": "tokens",
        "default_aggregation": {"formula": formula},
        "event_time_window": window,
        "customer_mapping": {"event_payload_key": "stripe_customer_id"},
        "value_settings": {"event_payload_key": "value"},
        **extra,
    }


def aggregate(value=30, rows=3, last=12, stamp=DAY_END - 7200):
    return DailyAggregate("tokens", "cus_a", DAY, value, stamp, rows, last)


def events(plan):
    return [(e.value, e.identifier) for e in plan.events]


def ledger(total=0, events=0, seq=None, source_at=DAY_END - 7200, newest=None, newest_stamp=-1, open_=0):
    """What the ledger holds for the day."""
    figure = DayFigure(total=total, events=events, max_seq=events if seq is None else seq, open=open_)
    figure.source_at = source_at if events else -1
    if newest is not None:
        figure.newest, figure.newest_stamp, figure.newest_seq = newest, newest_stamp, figure.max_seq
        figure.newest_sent, figure.last_sent_seq = newest, figure.max_seq
    return figure


def plan(agg, spec, figure=None, *, oldest=OLDEST):
    return plan_day(agg, spec, figure, now=NOW, oldest=oldest)


def test_sum_sends_the_source_minus_the_ledger_each_event_numbered_in_its_day():
    spec = meter_spec(meter())
    first = plan(aggregate(), spec)
    assert (first.action, events(first)) == ("send", [(30, "sm:tokens:cus_a:2026-11-20:1:mtr_1")])
    assert (first.events[0].seq, first.events[0].timestamp) == (1, DAY_END - 7200)
    late = plan(aggregate(value=42), spec, ledger(total=30, events=1))
    assert (late.action, events(late)) == ("top_up", [(12, "sm:tokens:cus_a:2026-11-20:2:mtr_1")])
    assert plan(aggregate(), spec, ledger(total=30, events=1)).action == "leave_alone"
    # Sequence numbers follow every row, also rows Stripe dropped or refused (no identifier twice).
    assert plan(aggregate(value=42), spec, ledger(total=30, events=1, seq=4)).events[0].seq == 5


def test_a_sum_that_went_down_is_corrected_with_a_negative_event():
    spec = meter_spec(meter())
    lower = plan(aggregate(value=-5), spec, ledger(total=30, events=1))
    assert (lower.action, events(lower)) == ("correct", [(-35, "sm:tokens:cus_a:2026-11-20:2:mtr_1")])


def test_an_older_view_of_the_day_changes_nothing():
    # The ledger billed the day from a row at 22:00; an hourly run retried later saw rows to 10:00.
    spec = meter_spec(meter())
    stale = plan(aggregate(value=10, stamp=DAY_END - 14 * 3600), spec, ledger(total=30, events=1))
    assert (stale.action, stale.reason, stale.events) == ("leave_alone", OLDER_VIEW, [])


def test_a_day_partly_past_stripes_window_is_never_lowered():
    spec = meter_spec(meter())
    oldest = DAY_END - 6 * 3600  # the day's first 18 hours are too old to show in the source
    partial = plan(aggregate(value=12), spec, ledger(total=30, events=1), oldest=oldest)
    assert (partial.action, partial.reason) == ("leave_alone", PARTIAL_DAY)
    more = plan(aggregate(value=40), spec, ledger(total=30, events=1), oldest=oldest)
    assert (more.action, events(more)[0][0], more.events[0].timestamp) == ("top_up", 10, DAY_END - 7200)


def test_count_sends_one_event_per_new_row_and_asks_to_cancel_when_rows_went():
    spec = meter_spec(meter("count"))
    first = plan(aggregate(rows=3), spec)
    assert [e[1].rsplit(":", 2)[1] for e in events(first)] == ["1", "2", "3"]
    assert [e[0] for e in events(first)] == [1, 1, 1]
    late = plan(aggregate(rows=5), spec, ledger(events=3, total=3))
    assert [e.seq for e in late.events] == [4, 5]
    fewer = plan(aggregate(rows=2), spec, ledger(events=3, total=3))
    assert (fewer.action, fewer.cancel, fewer.events) == ("correct", 1, [])


@pytest.mark.parametrize(
    ("formula", "window", "figure"),
    [("last", None, 12), ("sum", "day", 30), ("last", "day", 12)],
    ids=["last", "pre_aggregated_sum", "pre_aggregated_last"],
)
def test_newest_event_meters_get_the_figure_whole_stamped_at_the_snapshot(formula, window, figure):
    spec = meter_spec(meter(formula, window))
    first = plan(aggregate(), spec)
    assert (first.action, [e[0] for e in events(first)], first.events[0].timestamp) == (
        "send",
        [figure],
        DAY_END - 7200,
    )
    same = plan(aggregate(), spec, ledger(events=1, newest=figure, newest_stamp=DAY_END - 7200))
    assert same.action == "leave_alone"
    # Corrected in place (same snapshot time, another figure): one second later, so it is newest.
    changed = plan(aggregate(), spec, ledger(events=1, newest=figure + 1, newest_stamp=DAY_END - 7200))
    assert (changed.action, changed.events[0].value, changed.events[0].timestamp) == (
        "top_up",
        figure,
        DAY_END - 7199,
    )


def test_a_last_meter_sends_zero_for_a_day_it_never_billed():
    spec = meter_spec(meter("last"))
    zero = plan(aggregate(last=0), spec)
    assert (zero.action, [e[0] for e in events(zero)]) == ("send", [0])


def test_a_day_with_unsettled_events_is_left_for_the_run_to_report():
    spec = meter_spec(meter())
    assert plan(aggregate(), spec, ledger(total=20, events=1, open_=1)).reason == UNSETTLED


@pytest.mark.parametrize(
    ("formula", "window", "says"),
    [
        ("count", "day", "keeps one event per day"),
        ("count", "hour", "keeps one event per hour"),
        ("sum", "hour", "would count twice"),
        ("max", None, "only sum, count and last"),
    ],
)
def test_meters_that_cannot_be_billed_exactly_are_refused_by_name(formula, window, says):
    with pytest.raises(MeterUnsupportedError, match=says) as caught:
        meter_spec(meter(formula, window))
    assert "mtr_1" in str(caught.value)
    assert "'tokens'" in str(caught.value)
