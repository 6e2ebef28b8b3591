"""One rule for every operator: a zone-less timestamp is read as UTC (``naive_timezone`` changes
it, ``None`` refuses it); rows are numbered from 1; a fraction's message says what to do.

The single-event operator checks its event with :func:`validate_meter_event`, the batch operator
and the reconcile sensor read rows with :class:`UsageAggregator`: both are asked the same
questions here and must answer alike.
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from decimal import Decimal

import pendulum
import pytest

from airflow_provider_stripe_meter.utils.aggregation import UsageAggregator
from airflow_provider_stripe_meter.utils.rules import (
    NAIVE_TIMEZONE,
    MeterEventInputError,
    validate_meter_event,
    validate_value,
)

NOW = int(datetime(2026, 11, 24, 2, 0, tzinfo=timezone.utc).timestamp())
#: 2026-11-23 23:30 UTC.
LATE_EVENING_UTC = int(datetime(2026, 11, 23, 23, 30, tzinfo=timezone.utc).timestamp())


def single_event(timestamp, **kwargs) -> int | None:
    """The timestamp the single-event operator would send."""
    event = validate_meter_event(
        event_name="ai_tokens_used", customer_id="cus_a", value=1, timestamp=timestamp, now=NOW, **kwargs
    )
    return event.timestamp


def batch_row(timestamp, **kwargs) -> UsageAggregator:
    """The batch operator's aggregator, fed one row with ``timestamp``."""
    aggregator = UsageAggregator(event_name="ai_tokens_used", now=NOW, **kwargs)
    aggregator.add_rows([("cus_a", 1, timestamp)])
    aggregator.finish()
    return aggregator


@pytest.mark.parametrize(
    "zone_less",
    [
        pytest.param("2026-11-23 23:30:00", id="sql-text"),
        pytest.param("2026-11-23T23:30:00", id="iso"),
        pytest.param(datetime(2026, 11, 23, 23, 30), id="naive-datetime"),
    ],
)
def test_both_operators_read_a_zone_less_timestamp_as_utc(zone_less):
    assert NAIVE_TIMEZONE is timezone.utc
    assert single_event(zone_less) == LATE_EVENING_UTC
    [aggregate] = batch_row(zone_less).finish()
    assert (aggregate.timestamp, aggregate.day) == (LATE_EVENING_UTC, date(2026, 11, 23))


def test_both_operators_read_a_zone_less_timestamp_in_the_zone_they_are_given():
    paris = pendulum.timezone("Europe/Paris")  # UTC+1 in November: 23:30 there is 22:30 UTC
    assert single_event("2026-11-23 23:30:00", naive_timezone=paris) == LATE_EVENING_UTC - 3600
    [aggregate] = batch_row("2026-11-23 23:30:00", naive_timezone=paris).finish()
    assert aggregate.timestamp == LATE_EVENING_UTC - 3600


def test_both_operators_refuse_a_zone_less_timestamp_with_naive_timezone_none():
    with pytest.raises(MeterEventInputError) as caught:
        single_event("2026-11-23 23:30:00", naive_timezone=None)
    assert caught.value.field == "timestamp"
    assert "'2026-11-23 23:30:00'" in str(caught.value)
    assert "must carry a timezone (naive_timezone=None refuses zone-less date-times)" in str(caught.value)

    aggregator = batch_row("2026-11-23 23:30:00", naive_timezone=None)
    assert aggregator.finish() == []
    [sample] = aggregator.problems.samples["invalid"]
    assert (sample["row"], sample["field"], sample["rule"]) == (
        1,
        "timestamp",
        "must carry a timezone (naive_timezone=None refuses zone-less date-times)",
    )


def test_a_timestamp_with_a_zone_is_read_in_its_own_zone_by_both():
    aware = "2026-11-24T00:30:00+01:00"
    assert single_event(aware) == LATE_EVENING_UTC
    [aggregate] = batch_row(aware, naive_timezone=None).finish()
    assert aggregate.timestamp == LATE_EVENING_UTC


def test_rows_are_numbered_from_1_across_chunks():
    aggregator = UsageAggregator(event_name="ai_tokens_used", now=NOW)
    good = ("cus_a", 1, "2026-11-23 10:00:00")
    aggregator.add_rows([good, ("user_1", 1, "2026-11-23 10:00:00"), good])  # rows 1 to 3
    aggregator.add_rows([good, good, ("cus_a", 2.5, "2026-11-23 10:00:00")])  # rows 4 to 6
    aggregator.add_rows([("cus_a", 1, "2026-09-01 10:00:00")])  # row 7, older than 35 days
    [aggregate] = aggregator.finish()
    assert (aggregate.value, aggregate.rows) == (4, 4)
    assert [(s["row"], s["field"]) for s in aggregator.problems.samples["invalid"]] == [
        (2, "customer_id"),
        (6, "value"),
    ]
    assert [s["row"] for s in aggregator.problems.samples["skipped_too_old"]] == [7]


@pytest.mark.parametrize(
    "fraction",
    [
        pytest.param(12.5, id="float"),
        pytest.param(Decimal("12.5"), id="decimal"),
        pytest.param("12.5", id="string"),
    ],
)
def test_a_fraction_is_refused_with_what_to_do_about_it(fraction):
    with pytest.raises(MeterEventInputError) as caught:
        validate_value(fraction)
    assert str(caught.value) == (
        f"value {fraction!r} is invalid: must be a whole number (Stripe's meters take whole numbers "
        "only): bill in a smaller unit (tokens, not thousands of tokens; milliseconds, not seconds), "
        "or round in the query (ROUND)"
    )


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        pytest.param(float("nan"), "must be a whole number, not NaN or infinity", id="nan"),
        pytest.param(Decimal("Infinity"), "must be a whole number, not NaN or infinity", id="infinity"),
        pytest.param("lots", "must be a whole number", id="word"),
    ],
)
def test_a_value_that_is_no_number_gets_no_advice_about_units(value, rule):
    with pytest.raises(MeterEventInputError) as caught:
        validate_value(value)
    assert caught.value.rule == rule
