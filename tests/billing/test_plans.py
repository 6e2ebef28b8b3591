"""The billing planner: per customer-day, what to send so Stripe's figure equals the source's."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from airflow_provider_stripe_meter.billing.meters import MeterUnsupportedError, meter_spec
from airflow_provider_stripe_meter.billing.plans import is_fresh, plan_day
from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate

DAY = date(2026, 11, 20)
DAY_END = int(datetime(2026, 11, 21, tzinfo=timezone.utc).timestamp())
NOW = DAY_END + 3 * 86400  # days later: the day is over


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


def test_sum_sends_the_day_once_then_only_differences_named_after_their_base():
    spec = meter_spec(meter())
    first = plan_day(aggregate(), spec, None, prefix="usage", now=NOW)
    assert (first.action, events(first)) == ("send", [(30, "usage:tokens:cus_a:2026-11-20")])
    assert first.events[0].blind
    missing = plan_day(aggregate(), spec, 0, prefix="usage", now=NOW)
    assert (missing.action, events(missing)) == ("send", [(30, "usage:tokens:cus_a:2026-11-20")])
    assert not missing.events[0].blind
    late = plan_day(aggregate(value=42), spec, 30, prefix="usage", now=NOW)
    assert (late.action, events(late)) == ("top_up", [(12, "usage:tokens:cus_a:2026-11-20:from30")])
    same = plan_day(aggregate(), spec, 30, prefix="usage", now=NOW)
    assert (same.action, same.events) == ("leave_alone", [])


def test_a_shrunk_sum_is_reported_unless_correction_is_asked_for():
    spec = meter_spec(meter())
    over = plan_day(aggregate(value=25), spec, 30, prefix="usage", now=NOW)
    assert (over.action, over.events) == ("report", [])
    corrected = plan_day(aggregate(value=25), spec, 30, prefix="usage", now=NOW, correct_over=True)
    assert (corrected.action, events(corrected)) == (
        "correct",
        [(-5, "usage:tokens:cus_a:2026-11-20:from30")],
    )


def test_count_sends_one_numbered_event_per_row_and_late_rows_continue_the_numbers():
    spec = meter_spec(meter("count"))
    first = plan_day(aggregate(rows=3), spec, None, prefix="usage", now=NOW)
    assert events(first) == [(1, f"usage:tokens:cus_a:2026-11-20:n{k}") for k in (1, 2, 3)]
    late = plan_day(aggregate(rows=5), spec, 3, prefix="usage", now=NOW)
    assert events(late) == [(1, f"usage:tokens:cus_a:2026-11-20:n{k}") for k in (4, 5)]
    fewer = plan_day(aggregate(rows=2), spec, 3, prefix="usage", now=NOW, correct_over=True)
    assert (fewer.action, fewer.events) == ("report", [])  # a count cannot be lowered by an event


@pytest.mark.parametrize(
    ("formula", "window", "figure"), [("last", None, 12), ("sum", "day", 30), ("last", "hour", 12)]
)
def test_newest_event_meters_get_the_figure_whole_as_the_days_newest_event(formula, window, figure):
    spec = meter_spec(meter(formula, window))
    plan = plan_day(aggregate(), spec, None, prefix="usage", now=NOW)
    [event] = plan.events
    assert (event.value, event.identifier) == (figure, f"usage:tokens:cus_a:2026-11-20:set{figure}from0")
    assert event.timestamp == DAY_END - 1  # 2026-11-20T23:59:59Z, the last second of the day
    today = plan_day(aggregate(), spec, None, prefix="usage", now=DAY_END - 600)
    assert today.events[0].timestamp == DAY_END - 600  # a day not over yet: now
    lower = plan_day(aggregate(last=4), meter_spec(meter("last")), 12, prefix="usage", now=NOW)
    assert (lower.action, events(lower)) == ("top_up", [(4, "usage:tokens:cus_a:2026-11-20:set4from12")])


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


def test_an_unknown_customer_is_reported_never_sent():
    plan = plan_day(aggregate(), meter_spec(meter()), 0, prefix="usage", now=NOW, customer_unknown=True)
    assert (plan.action, plan.reason, plan.events) == ("report", "customer_unknown", [])


def test_a_day_is_fresh_while_events_sent_after_it_ended_are_inside_the_window():
    window = timedelta(hours=23)
    assert is_fresh(DAY, DAY_END + 22 * 3600, window)
    assert not is_fresh(DAY, DAY_END + 23 * 3600 + 1, window)
    assert is_fresh(DAY + timedelta(days=1), DAY_END + 3600, window)  # a day not over yet


def test_late_usage_is_billed_once_from_what_was_billed_late_before():
    from airflow_provider_stripe_meter.billing.plans import plan_late

    at = DAY_END + 60
    first = plan_late(aggregate(value=40), 0, prefix="usage", at=at)
    assert (first.action, events(first)) == ("send", [(40, "usage:tokens:cus_a:2026-11-20:late0")])
    assert (first.events[0].timestamp, first.events[0].blind) == (at, False)
    more = plan_late(aggregate(value=45), 40, prefix="usage", at=at)
    assert (more.action, events(more)) == ("top_up", [(5, "usage:tokens:cus_a:2026-11-20:late40")])
    assert plan_late(aggregate(value=40), 40, prefix="usage", at=at).action == "leave_alone"
    assert plan_late(aggregate(value=30), 40, prefix="usage", at=at).action == "report"
