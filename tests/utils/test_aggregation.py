"""Daily aggregation: exact sums, the right day and timestamp, every bad row accounted for."""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from airflow_provider_stripe_meter.utils.aggregation import UsageAggregator

NOW = int(datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc).timestamp())
UTC = timezone.utc


def aggregate(rows, chunk=10_000, **kwargs):
    kwargs.setdefault("event_name", "tokens")
    aggregator = UsageAggregator(now=NOW, **kwargs)
    for start in range(0, len(rows), chunk):
        aggregator.add_rows(rows[start : start + chunk])
    return aggregator, aggregator.finish()


def as_tuples(aggregates):
    return sorted(
        (a.event_name, a.customer_id, a.day.isoformat(), a.value, a.timestamp, a.rows) for a in aggregates
    )


def test_sums_per_customer_and_utc_day_with_latest_timestamp():
    rows = [
        ("cus_a", 5, "2026-11-23 01:00:00"),
        ("cus_a", 7, "2026-11-23 22:30:00"),
        ("cus_b", 1, "2026-11-23 12:00:00"),
        ("cus_a", 2, "2026-11-22 23:59:59"),
    ]
    _, out = aggregate(rows)
    ts = lambda text: int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())  # noqa: E731
    assert as_tuples(out) == [
        ("tokens", "cus_a", "2026-11-22", 2, ts("2026-11-22 23:59:59"), 1),
        ("tokens", "cus_a", "2026-11-23", 12, ts("2026-11-23 22:30:00"), 2),
        ("tokens", "cus_b", "2026-11-23", 1, ts("2026-11-23 12:00:00"), 1),
    ]


def test_values_are_summed_exactly_whatever_their_type():
    rows = [
        ("cus_a", 999_999_999_999_990, "2026-11-23T10:00:00Z"),
        ("cus_a", Decimal("4"), "2026-11-23T10:00:01Z"),
        ("cus_a", "3", "2026-11-23T10:00:02Z"),
        ("cus_a", 2.0, "2026-11-23T10:00:03Z"),
    ]
    _, [agg] = aggregate(rows)
    assert agg.value == 999_999_999_999_999
    assert type(agg.value) is int


def test_a_day_total_over_15_digits_is_reported_not_sent():
    rows = [("cus_a", 999_999_999_999_999, "2026-11-23 10:00:00"), ("cus_a", 1, "2026-11-23 11:00:00")]
    aggregator, out = aggregate(rows)
    assert out == []
    assert aggregator.problems.counts["invalid"] == 2
    assert "15 digits" in aggregator.problems.samples["invalid"][0]["rule"]


def test_zones_decide_the_day():
    rows = [
        ("cus_a", 1, datetime(2026, 11, 22, 20, 0, tzinfo=timezone(timedelta(hours=-5)))),  # 23rd 01:00 UTC
        ("cus_a", 1, "2026-11-23T00:30:00+02:00"),  # 22nd 22:30 UTC
        ("cus_a", 1, datetime(2026, 11, 23, 3, 0)),  # naive: UTC
    ]
    _, out = aggregate(rows)
    assert sorted((a.day, a.value) for a in out) == [(date(2026, 11, 22), 1), (date(2026, 11, 23), 2)]


def test_naive_timestamps_can_be_read_in_another_zone_or_refused():
    import pendulum

    rows = [("cus_a", 1, "2026-11-23 23:30:00")]
    _, [agg] = aggregate(rows, naive_timezone=pendulum.timezone("America/New_York"))
    assert agg.day == date(2026, 11, 24)
    aggregator, out = aggregate(rows, naive_timezone=None)
    assert out == []
    assert aggregator.problems.samples["invalid"][0]["field"] == "timestamp"


def test_window_skips_old_and_future_rows_with_a_safety_margin():
    day = 86400
    rows = [
        ("cus_a", 1, NOW - 35 * day + 600),  # inside Stripe's window but within the 1 h margin
        ("cus_a", 2, NOW - 34 * day),
        ("cus_a", 4, NOW + 301),
        ("cus_a", 8, NOW + 60),
    ]
    aggregator, out = aggregate(rows)
    assert sum(a.value for a in out) == 10
    assert aggregator.problems.counts["skipped_too_old"] == 1
    assert aggregator.problems.counts["skipped_future"] == 1
    assert aggregator.problems.samples["skipped_too_old"][0]["row"] == 1  # rows count from 1
    aggregator, out = aggregate(rows, safety_margin=timedelta(0))
    assert aggregator.problems.counts["skipped_too_old"] == 0


@pytest.mark.parametrize(
    ("row", "field"),
    [
        pytest.param(("", 1, "2026-11-23 10:00:00"), "customer_id", id="missing-customer"),
        pytest.param((None, 1, "2026-11-23 10:00:00"), "customer_id", id="null-customer"),
        pytest.param(("user_7", 1, "2026-11-23 10:00:00"), "customer_id", id="not-a-stripe-customer"),
        pytest.param(("cus_a", 1.5, "2026-11-23 10:00:00"), "value", id="fraction"),
        pytest.param(("cus_a", "ten", "2026-11-23 10:00:00"), "value", id="text-value"),
        pytest.param(("cus_a", None, "2026-11-23 10:00:00"), "value", id="null-value"),
        pytest.param(("cus_a", True, "2026-11-23 10:00:00"), "value", id="bool-value"),
        pytest.param(("cus_a", 1, "yesterday"), "timestamp", id="unparseable-timestamp"),
        pytest.param(("cus_a", 1, None), "timestamp", id="null-timestamp"),
        pytest.param(("cus_a", 1), "row", id="short-row"),
        pytest.param("cus_a,1,2026", "row", id="not-a-row"),
    ],
)
def test_invalid_rows_are_counted_and_never_block_good_rows(row, field):
    rows = [("cus_good", 3, "2026-11-23 09:00:00"), row, ("cus_good", 4, "2026-11-23 11:00:00")]
    aggregator, out = aggregate(rows)
    assert [(a.customer_id, a.value) for a in out] == [("cus_good", 7)]
    assert aggregator.problems.counts["invalid"] == 1
    [sample] = aggregator.problems.samples["invalid"]
    assert (sample["row"], sample["field"]) == (2, field)  # the second row, counting from 1
    assert aggregator.rows == 3


def test_samples_are_bounded_but_counts_are_not():
    rows = [("bad", 1, "2026-11-23 10:00:00")] * 50
    aggregator, _ = aggregate(rows, sample_limit=5)
    assert aggregator.problems.counts["invalid"] == 50
    assert len(aggregator.problems.samples["invalid"]) == 5


def test_mapping_rows_with_own_column_names_and_event_per_row():
    rows = [
        {"account": "cus_a", "units": 2, "at": "2026-11-23 10:00:00", "meter": "api_calls"},
        {"account": "cus_a", "units": 3, "at": "2026-11-23 11:00:00", "meter": "gb_stored"},
        {"account": "cus_a", "units": 4, "at": "2026-11-23 12:00:00"},
    ]
    aggregator, out = aggregate(rows, event_name=None, columns=("account", "units", "at", "meter"))
    assert sorted((a.event_name, a.value) for a in out) == [("api_calls", 2), ("gb_stored", 3)]
    assert aggregator.problems.counts["invalid"] == 1


def random_rows(n, seed, *, messy):
    rng = random.Random(seed)
    base = datetime(2026, 11, 15)
    rows = []
    for _ in range(n):
        stamp = base + timedelta(seconds=rng.randrange(5 * 86400))
        rows.append((f"cus_{rng.randrange(40)}", rng.randrange(1, 10**6), stamp.isoformat(sep=" ")))
        if messy and rng.random() < 0.02:
            rows[-1] = rng.choice(
                [
                    ("cus_x", "1.5", "2026-11-20 10:00:00"),
                    ("cus_y", 2, "2026-10-01 10:00:00"),
                    ("cus_z", 3, datetime(2026, 11, 20, 5, tzinfo=UTC)),
                    ("cus_w", Decimal(4), "2026-11-21T10:00:00+09:00"),
                    ("oops", 1, "2026-11-20 10:00:00"),
                ]
            )
    return rows


@pytest.mark.parametrize("messy", [False, True], ids=["clean", "messy"])
@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
def test_fast_path_agrees_with_row_by_row(messy, ordered):
    rows = random_rows(20_000, seed=7, messy=messy)
    if ordered:
        rows.sort(key=lambda r: str(r[2]))
    fast, fast_out = aggregate(rows, chunk=1_000)
    slow = UsageAggregator(event_name="tokens", now=NOW)
    slow._fast_ok = False
    slow.add_rows(rows)
    assert as_tuples(fast_out) == as_tuples(slow.finish())
    assert fast.problems.counts == slow.problems.counts
    if not messy:
        assert fast.fast_chunks == 20  # the comparison really covers the fast path
    assert sum(a.rows for a in fast_out) + sum(fast.problems.counts.values()) == len(rows)


def test_finish_is_idempotent_and_closes_the_aggregator():
    aggregator = UsageAggregator(event_name="e", now=NOW)
    aggregator.add_rows([("cus_a", 10**15 - 1, NOW - 10), ("cus_a", 1, NOW - 5), ("cus_b", 2, NOW - 5)])
    first = aggregator.finish()
    assert aggregator.finish() is first
    assert aggregator.problems.counts["invalid"] == 2  # the 16-digit day, counted once per row
    with pytest.raises(RuntimeError, match="after finish"):
        aggregator.add_rows([("cus_c", 1, NOW)])


def test_each_day_knows_its_row_count_and_latest_value():
    aggregator = UsageAggregator(event_name="e", now=NOW)
    stamp = datetime.fromtimestamp(NOW - 3600, timezone.utc).replace(tzinfo=None)
    rows = [("cus_a", 5, stamp), ("cus_a", 7, stamp - timedelta(minutes=5)), ("cus_a", 9, stamp)]
    aggregator.add_rows(rows)
    [fast] = aggregator.finish()
    slow = UsageAggregator(event_name="e", now=NOW)
    slow.add_rows([{"customer_id": c, "value": v, "timestamp": t.isoformat() + "Z"} for c, v, t in rows])
    [general] = slow.finish()
    assert aggregator.fast_chunks == 1
    # Of two rows in the latest second, the greater value wins (whatever their order).
    assert (fast.value, fast.rows, fast.last_value) == (21, 3, 9)
    assert (general.value, general.rows, general.last_value) == (21, 3, 9)
