"""Billing periods: reading them from Stripe's objects, and planning a day split at a boundary."""

from __future__ import annotations

import itertools
from datetime import date, datetime, timezone

from airflow_provider_stripe_meter.billing.meters import meter_spec
from airflow_provider_stripe_meter.billing.periods import (
    DRAFT,
    ENDED,
    FINAL,
    NONE,
    OPEN,
    CustomerPeriods,
    Period,
    PeriodBook,
    add_months,
    customer_periods,
)
from airflow_provider_stripe_meter.billing.plans import plan_in_periods
from airflow_provider_stripe_meter.ledger.entries import DayFigure, Entry
from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate, DayPart, UsageAggregator


def ts(*args: int) -> int:
    return int(datetime(*args, tzinfo=timezone.utc).timestamp())


DAY = date(2026, 11, 30)
START, END = ts(2026, 11, 30), ts(2026, 12, 1)
B = ts(2026, 11, 30, 14, 37, 12)  # November's period ends here (the 31st clamped)
NOW = ts(2026, 12, 1, 1, 0)


def meter(formula: str = "sum") -> dict:
    return {"id": "mtr_1", "event_name": "tokens", "default_aggregation": {"formula": formula}}


def test_monthly_periods_clamp_to_the_months_end_and_earlier_ones_follow_from_the_anchor():
    anchor = ts(2026, 1, 31, 14, 37, 12)
    assert add_months(anchor, 1) == ts(2026, 2, 28, 14, 37, 12)
    assert add_months(anchor, 10) == B
    sub = {"id": "sub_1", "billing_cycle_anchor": anchor, "start_date": anchor, "ended_at": None}
    item = {
        "current_period_start": B,
        "current_period_end": ts(2026, 12, 31, 14, 37, 12),
        "price": {"recurring": {"interval": "month", "interval_count": 1}},
    }
    found = customer_periods(sub, item, since=ts(2026, 10, 20), drafts={("sub_1", B): B + 86400})
    assert [(p.start, p.end, p.finalizes_at) for p in found.periods] == [
        (ts(2026, 9, 30, 14, 37, 12), ts(2026, 10, 31, 14, 37, 12), None),
        (ts(2026, 10, 31, 14, 37, 12), B, B + 86400),
        (B, ts(2026, 12, 31, 14, 37, 12), None),
    ]
    assert found.boundaries()[-2:] == [B, ts(2026, 12, 31, 14, 37, 12)]


def test_an_instant_is_open_draft_final_ended_or_without_a_subscription():
    periods = CustomerPeriods(
        [Period(ts(2026, 10, 31), B, "sub_1", B + 3600), Period(B, ts(2026, 12, 20), "sub_1")],
        ended_at=ts(2026, 12, 20),
    )
    book = PeriodBook({("tokens", "cus_a"): periods}, ["tokens"], now=B + 600)
    assert book.state("tokens", "cus_a", B - 1)[0] == DRAFT  # finalizes in 50 min
    assert book.state("tokens", "cus_a", B)[0] == OPEN
    assert book.state("tokens", "cus_a", ts(2026, 12, 21))[0] == ENDED
    assert book.state("tokens", "cus_a", ts(2026, 10, 1))[0] == NONE
    assert book.state("tokens", "cus_b", B)[0] == NONE
    # Within the margin of finalizing, a draft counts as final: the event could land too late.
    late = PeriodBook({("tokens", "cus_a"): periods}, ["tokens"], now=B + 3600 - 300)
    assert late.state("tokens", "cus_a", B - 1)[0] == FINAL


def split_day(rows: list[tuple[int, int]]) -> DailyAggregate:
    agg = UsageAggregator(event_name="tokens", now=NOW, split={("tokens", "cus_a"): (B,)})
    agg.add_rows(
        [("cus_a", v, datetime.fromtimestamp(t, tz=timezone.utc).replace(tzinfo=None)) for v, t in rows]
    )
    [day] = agg.finish()
    return day


def book(finalizes_at: int = NOW + 86400) -> PeriodBook:
    periods = CustomerPeriods(
        [Period(ts(2026, 10, 31), B, "sub_1", finalizes_at), Period(B, ts(2026, 12, 31), "sub_1")]
    )
    return PeriodBook({("tokens", "cus_a"): periods}, ["tokens"], now=NOW)


def test_each_part_is_stamped_inside_its_period_a_minute_clear_of_the_boundary():
    day = split_day([(60, START + 3600), (40, B - 7), (30, B + 28), (5, END - 1)])
    assert day.parts == (DayPart(START, B, 100, B - 7, 2, 40), DayPart(B, END, 35, END - 1, 2, 5))
    plan, held = plan_in_periods(
        day, meter_spec(meter()), None, [], book(), now=NOW, oldest=NOW - 34 * 86400, carry=False
    )
    assert held == []
    # The boundary falls inside 14:37: the first part stays before 14:37:00, the second after 14:38.
    assert [(e.value, e.timestamp, e.seq, e.part, e.period_end) for e in plan.events] == [
        (100, B - 12 - 1, 1, START, B),
        (35, END - 1, 2, B, ts(2026, 12, 31)),
    ]


def test_count_and_last_meters_bill_each_part_by_their_formula():
    day = split_day([(7, START + 60), (9, B - 3600), (4, B + 3600)])
    count, _ = plan_in_periods(
        day, meter_spec(meter("count")), None, [], book(), now=NOW, oldest=0, carry=False
    )
    assert [(e.value, e.period_end) for e in count.events] == [(1, B), (1, B), (1, ts(2026, 12, 31))]
    last, _ = plan_in_periods(
        day, meter_spec(meter("last")), None, [], book(), now=NOW, oldest=0, carry=False
    )
    assert [(e.value, e.period_end) for e in last.events] == [(9, B), (4, ts(2026, 12, 31))]


def test_a_part_already_billed_sends_nothing_and_late_rows_top_up_only_their_part():
    day = split_day([(100, B - 3600), (50, B + 3600), (8, B - 60)])
    billed = [
        Entry(
            "platform",
            "mtr_1",
            "tokens",
            "cus_a",
            DAY,
            1,
            "i1",
            100,
            B - 3600,
            B - 3600,
            "accepted",
            "r",
            "a",
            0,
            part=START,
        ),
        Entry(
            "platform",
            "mtr_1",
            "tokens",
            "cus_a",
            DAY,
            2,
            "i2",
            50,
            B + 3600,
            B + 3600,
            "accepted",
            "r",
            "a",
            0,
            part=B,
        ),
    ]
    figure = DayFigure()
    for e in billed:
        figure.add(e.seq, e.value, e.stamp, e.source_at, e.state)
    plan, held = plan_in_periods(
        day, meter_spec(meter()), figure, billed, book(), now=NOW, oldest=0, carry=False
    )
    assert [(e.value, e.seq, e.part) for e in plan.events] == [(8, 3, START)]
    # The same late rows once November's invoice is final: held, not sent anywhere.
    plan, held = plan_in_periods(
        day, meter_spec(meter()), figure, billed, book(NOW - 1), now=NOW, oldest=0, carry=False
    )
    assert (plan.events, [(h.outcome, h.value) for h in held]) == ([], [("invoice_final", 8)])
    # Carried: into the open period, stamped now, remembering where it came from.
    plan, held = plan_in_periods(
        day, meter_spec(meter()), figure, billed, book(NOW - 1), now=NOW, oldest=0, carry=True
    )
    assert [(e.value, e.timestamp, e.part, e.carried_from) for e in plan.events] == [(8, NOW, START, B)]


def test_stored_periods_answer_from_the_current_period_only_while_no_end_is_set():
    # Stored rows as a night reads them: (subscription, price, boundaries, start, end or
    # cancellation, current period start and end, customer). cus_a's subscription was cancelled
    # for Dec 5, inside the period Stripe names as current; cus_b's runs on.
    from airflow_provider_stripe_meter.billing.period_sync import _add_rows
    from airflow_provider_stripe_meter.billing.periods import StoredPeriods

    first, nxt = ts(2026, 10, 31, 14, 37, 12), ts(2026, 12, 31, 14, 37, 12)
    cancelled = ts(2026, 12, 5, 10)
    stored = StoredPeriods(None)
    _add_rows(
        stored,
        "tokens",
        [
            ("sub_a", "price_1", f"{first},{B},{cancelled}", first, cancelled, B, nxt, "cus_a"),
            ("sub_b", "price_1", f"{first},{B},{nxt}", first, None, B, nxt, "cus_b"),
        ],
    )
    periods = PeriodBook(stored, ["tokens"], now=NOW)
    assert periods.billable("tokens", "cus_b", B + 60) == (B, nxt)
    assert periods.billable("tokens", "cus_a", B + 60) == (B, cancelled)
    assert periods.billable("tokens", "cus_a", cancelled + 60) is None  # ended: held, not billed
    assert periods.state("tokens", "cus_a", cancelled + 60)[0] == ENDED
    # The day of the renewal splits at the renewal, the day of the cancellation at it.
    assert periods.split().split_on(START, END) == {"cus_a", "cus_b"}
    assert periods.split().split_on(END, END + 86400) == set()
    dec5 = ts(2026, 12, 5)
    assert periods.split().split_on(dec5, dec5 + 86400) == {"cus_a"}


def test_days_split_a_day_at_a_time_or_for_the_whole_window_aggregate_the_same():
    # A night's source holds a day or two: the customers split on them are worked out per day;
    # a backfill's many days, for the whole window at once. Both must split the same rows.
    from airflow_provider_stripe_meter.billing.period_sync import _add_rows
    from airflow_provider_stripe_meter.billing.periods import StoredPeriods

    day = 86400
    stored = StoredPeriods(None)
    rows = []
    for c in range(6):
        edges = [NOW - (30 - c) * day - 3600 * c, NOW - (5 - c % 3) * day + 777 * c, NOW + 25 * day]
        ended = NOW - 2 * day + 5 if c == 5 else None
        text = ",".join(str(b) for b in sorted([*edges, *([ended] if ended else [])]))
        rows.append((f"sub_{c}", "price_1", text, edges[0], ended, edges[1], edges[2], f"cus_{c}"))
    _add_rows(stored, "tokens", rows)
    usage = [
        (
            f"cus_{c}",
            10 + h,
            datetime.fromtimestamp(NOW - d * day + h * 3600, tz=timezone.utc).replace(tzinfo=None),
        )
        for c in range(6)
        for d in range(1, 7)
        for h in range(-20, 0, 3)
    ]

    def aggregate(split, days: int) -> list:
        agg = UsageAggregator(event_name="tokens", now=NOW, split=split)
        agg.add_rows([r for r in usage if (NOW - r[2].replace(tzinfo=timezone.utc).timestamp()) < days * day])
        return sorted(agg.finish(), key=lambda a: (a.customer_id, a.day))

    whole = {key: stored.split()[key] for key in stored}  # a plain mapping: the whole window
    # A night (a day at a time), a backfill (a day at a time, then the whole window).
    for days, split_days in ((2, 1), (7, 7)):
        by_day = aggregate(stored.split(), days)
        assert by_day == aggregate(whole, days)
        assert sum(1 for a in by_day if a.parts) == split_days


def test_stored_rows_whose_driver_returns_decimals_are_read_as_ints():
    from decimal import Decimal

    from airflow_provider_stripe_meter.billing.period_sync import _add_rows
    from airflow_provider_stripe_meter.billing.periods import StoredPeriods

    first, nxt = ts(2026, 10, 31, 14, 37, 12), ts(2026, 12, 31, 14, 37, 12)
    stored = StoredPeriods(None)
    row = ("sub_a", "price_1", f"{first},{B},{nxt}", Decimal(first), None, Decimal(B), Decimal(nxt), "cus_a")
    _add_rows(stored, "tokens", [row])
    [entry] = stored.raw[("tokens", "cus_a")]
    assert [type(v) for v in entry[3:7]] == [int, type(None), int, int]
    assert PeriodBook(stored, ["tokens"], now=NOW).billable("tokens", "cus_a", B + 60) == (B, nxt)


def _draft(sub: str, end: int, *, at: int | None, auto: bool = True, status: str = "draft", price="price_1"):
    """An invoice as Stripe lists it (2026-10-28.endive): its subscription under ``parent``, the
    metered line's service period under ``period``."""
    return {
        "id": f"in_{sub}_{end}",
        "status": status,
        "auto_advance": auto,
        "automatically_finalizes_at": at,
        "parent": {"type": "subscription_details", "subscription_details": {"subscription": sub}},
        "lines": {
            "data": [
                {
                    "id": f"il_{sub}_{end}",
                    "period": {"start": end - 30 * 86400, "end": end},
                    "pricing": {"type": "price_details", "price_details": {"price": price}},
                    "parent": {"subscription_item_details": {"subscription": sub}},
                    "quantity": 1,
                }
            ],
            "has_more": False,
        },
    }


class _Invoices:
    """What ``GET /v1/invoices`` would list, and the listings asked for (created range, status)."""

    def __init__(self, invoices):
        self.invoices, self.asked = invoices, []

    def __call__(self, lo, hi, status):
        self.asked.append((lo, hi, status))
        return [i for i in self.invoices if status is None or i["status"] == status]


def test_each_period_locks_as_its_own_draft_says():
    from airflow_provider_stripe_meter.billing.periods import DraftLocks

    end = B
    now = end + 5 * 3600
    listed = _Invoices(
        [
            _draft("sub_default", end, at=end + 24 * 3600),
            _draft("sub_postponed", end, at=end + 60 * 3600),
            _draft("sub_hand", end, at=None, auto=False),
            # Automatic finalization overdue or failed: it may lock at any moment.
            _draft("sub_overdue", end, at=None, auto=True),
            # Another kind of draft for the same subscription, locking sooner, on another price.
            _draft("sub_default", end, at=end + 3600, price="price_licensed"),
            # Two drafts carry one period: the first to lock decides.
            _draft("sub_twice", end, at=end + 30 * 3600),
            _draft("sub_twice", end, at=end + 20 * 3600),
        ]
    )
    locks = DraftLocks(listed, ["price_1"], now)
    assert locks.lock("sub_default", end) == (end + 24 * 3600, False)
    assert locks.lock("sub_postponed", end) == (end + 60 * 3600, False)
    assert locks.lock("sub_hand", end) == (None, True)
    assert locks.lock("sub_overdue", end) == (None, False)
    assert locks.lock("sub_twice", end) == (end + 20 * 3600, False)
    # Finalized (early or on time) or never drafted: final.
    assert locks.lock("sub_gone", end) == (None, False)
    assert locks.manual() == [("sub_hand", end)]
    # Drafts were listed once, in four time ranges read at once, from the start of yesterday (a
    # night asks about yesterday's periods and today's) or of the period end's day if earlier.
    yesterday = now - now % 86400 - 86400
    first = min(end - end % 86400, yesterday)
    assert _covered(listed.asked) == (first, None)
    assert len(listed.asked) == 4
    assert {status for *_, status in listed.asked} == {"draft"}

    # An older period asked later lists only what is older than what was listed.
    older = end - 3 * 86400
    locks.lock("sub_default", older)
    assert _covered(listed.asked[4:]) == (older - older % 86400, first)


def _covered(asked):
    """The one range [lo, hi) that contiguous listings cover."""
    ranges = sorted((lo, hi) for lo, hi, _ in asked)
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert hi == lo
    return ranges[0][0], ranges[-1][1]


def test_a_period_that_ended_within_the_hour_is_open_unless_its_invoice_was_finalized_at_once():
    from airflow_provider_stripe_meter.billing.periods import SHORTEST_GRACE, DraftLocks

    end = B
    listed = _Invoices([_draft("sub_fast", end, at=None, auto=False, status="open")])
    locks = DraftLocks(listed, ["price_1"], end + 20 * 60)
    # No draft listed yet: Stripe makes it at the end or later, and finalizes it an hour after.
    assert locks.lock("sub_slow", end) == (end + SHORTEST_GRACE, False)
    # Finalized at once (a webhook handler, or by hand): final, from the invoices of any status.
    assert locks.lock("sub_fast", end) == (None, False)
    assert [status for _, _, status in listed.asked] == ["draft"] * 4 + [None] * 4


def test_drafts_listed_ahead_on_a_thread_of_their_own_are_waited_for_once():
    import threading

    from airflow_provider_stripe_meter.billing.periods import DraftLocks

    end = B
    release = threading.Event()
    threads: set[str] = set()

    class Slow(_Invoices):
        def __call__(self, lo, hi, status):
            threads.add(threading.current_thread().name)
            release.wait(5)
            return super().__call__(lo, hi, status)

    listed = Slow([_draft("sub_a", end, at=end + 24 * 3600)])
    locks = DraftLocks(listed, ["price_1"], end + 5 * 3600)
    assert locks.prefetch(end) is True  # started: the run plans other days meanwhile
    assert locks.prefetch(end) is True  # still under way: a day asking waits for it
    release.set()
    assert locks.lock("sub_a", end) == (end + 24 * 3600, False)
    assert locks.prefetch(end) is False  # listed: nothing to wait for
    assert threading.current_thread().name not in threads
    assert len(listed.asked) == 4  # one listing, in four time ranges
