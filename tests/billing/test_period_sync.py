"""Reading billing periods run after run: the table brought up to date from Stripe's events gives
the periods a full listing gives, and a night's changes are listed in parallel ranges."""

from __future__ import annotations

import sqlite3
from urllib.parse import parse_qs, urlsplit

import pytest

from airflow_provider_stripe_meter.billing.period_sync import _cuts, read_periods
from airflow_provider_stripe_meter.billing.subscription_events import subscription_changes
from airflow_provider_stripe_meter.hooks.stripe import StripeHook
from airflow_provider_stripe_meter.ledger.store import SqlLedger
from airflow_provider_stripe_meter.ledger.subscriptions import SubscriptionCache

DAY = 86400
NOW = 1_796_000_000  # 2026-11-29, a Sunday


@pytest.fixture
def clock(secret_server):
    """The local server's "now", which the test moves."""
    moment = [float(NOW)]
    secret_server.ledger.clock = lambda: moment[0]
    return moment


def event_ranges(server) -> list[tuple[str | None, str | None]]:
    """The ``created`` range of every events request the server answered."""
    out = []
    for method, path, _ in server.request_log:
        split = urlsplit(path)
        if method == "GET" and split.path == "/v1/events":
            query = parse_qs(split.query)
            gt, lte = query.get("created[gt]", [None])[0], query.get("created[lte]", [None])[0]
            out.append((gt, lte))
    return out


def test_a_nights_renewals_crowded_into_one_hour_are_listed_in_parallel_ranges(secret_server, clock):
    billing = secret_server.ledger.billing
    price = billing.add_price("ai_tokens_used")
    # 1,500 renewals within one hour of the last day, 40 spread over it, and one cancellation.
    renewing = [
        billing.subscribe(f"cus_r{i:04d}", price, anchor=NOW - 7200 + i * 2, start=NOW - 90 * DAY)
        for i in range(1500)
    ]
    spread = [
        billing.subscribe(f"cus_s{i:02d}", price, anchor=NOW - 23 * 3600 + i * 1800, start=NOW - 90 * DAY)
        for i in range(40)
    ]
    quiet = billing.subscribe("cus_quiet", price, anchor=NOW - 10 * DAY, start=NOW - 90 * DAY)
    for sub in [*renewing, *spread, quiet]:
        sub.changes[:] = [(NOW - 90 * DAY, "created")]  # made long ago
    billing.cancel(quiet, NOW + 5 * DAY)  # an update event, now
    hook = StripeHook()

    for cuts in ([], _cuts(sorted(s.billing_cycle_anchor for s in [*renewing, *spread]), 4)):
        secret_server.request_log.clear()
        found = subscription_changes(hook, NOW - DAY, cuts=cuts)

        assert sorted(s["id"] for s in found) == sorted(s.id for s in [*renewing, *spread, quiet])
        assert next(s for s in found if s["id"] == quiet.id)["cancel_at"] == NOW + 5 * DAY
        ranges = event_ranges(secret_server)
        # 1,541 events are 16 pages; ranges cost a partial page each, and no more.
        assert 16 <= len(ranges) <= 24, ranges
        assert len(set(ranges)) >= 4, "listed one page after another"


def test_the_table_brought_up_to_date_from_events_gives_what_a_full_listing_gives(
    secret_server, clock, tmp_path, monkeypatch
):
    from airflow_provider_stripe_meter.billing import period_sync

    # Never listed in full again (weekly, by default): 45 nights of events alone.
    monkeypatch.setattr(period_sync, "FULL_EVERY", 10**9)
    billing = secret_server.ledger.billing
    price = billing.add_price("ai_tokens_used")
    subs = [
        billing.subscribe(f"cus_{i:03d}", price, anchor=NOW - (i % 30) * DAY - i * 37, start=NOW - 60 * DAY)
        for i in range(60)
    ]
    for sub in subs:
        sub.changes[:] = [(NOW - 60 * DAY, "created")]
    hook = StripeHook()
    meters = {"ai_tokens_used": hook.active_meter("ai_tokens_used")["id"]}

    def read(db: str, now: int):
        cache = SubscriptionCache(SqlLedger(lambda: sqlite3.connect(tmp_path / db)))
        return read_periods(hook, cache, meters, "platform", now - 36 * DAY, now)

    book, figures = read("synced.db", NOW)
    assert figures["listed"] == 60

    # Nights pass: every subscription renews once or twice; one is cancelled mid-period, one
    # customer subscribes, one subscription ends. On the nights that follow a change the table
    # is checked against a full listing of the same moment.
    checked = 0
    for night in range(1, 46):
        clock[0] = NOW + night * DAY
        if night == 10:
            billing.cancel(subs[3], NOW + 12 * DAY + 5000)
        if night == 20:
            billing.subscribe("cus_new", price, anchor=NOW + 19 * DAY + 777, start=NOW + 19 * DAY + 777)
        if night == 30:
            billing.cancel(subs[7], NOW + 30 * DAY)
        book, figures = read("synced.db", int(clock[0]))
        assert figures["listed"] == 0
        assert figures["changes"] > 0
        if night in (1, 10, 11, 13, 20, 21, 30, 31, 45):
            full, listed = read(f"full-{night}.db", int(clock[0]))
            assert listed["listed"] == figures["cached"]
            assert_same(book, full, int(clock[0]))
            checked += 1
    assert checked == 9
    assert book.state("ai_tokens_used", subs[3].customer, NOW + 13 * DAY)[0] == "ended"
    assert book.state("ai_tokens_used", "cus_new", NOW + 19 * DAY + 776)[0] == "none"
    assert book.state("ai_tokens_used", "cus_new", NOW + 19 * DAY + 777)[0] == "open"


def assert_same(book, full, now: int) -> None:
    """The same customers, the same boundaries inside the days a run bills, the same state."""
    lo = now - 36 * DAY
    assert set(book.customers) == set(full.customers)
    ours, theirs = book.split(), full.split()
    for key in full.customers:
        assert [b for b in ours[key] if lo <= b <= now] == [b for b in theirs[key] if lo <= b <= now], key
        # Every instant a run may bill: either side of each boundary, and every few hours.
        moments = {m for b in theirs[key] for m in (b - 1, b)} | set(range(lo, now, 5 * 3600))
        for moment in sorted(m for m in moments if lo <= m <= now):
            assert book.state(*key, moment) == full.state(*key, moment), (key, moment)
            # The lean lookup of a night (from the current period where it can) tells the same.
            assert book.billable(*key, moment) == full._billable(*key, moment), (key, moment)
    # The customers split on each day, worked out a day at a time as a night does.
    for day in range(lo // DAY, now // DAY + 1):
        start, end = day * DAY, day * DAY + DAY
        expected = {key[1] for key in full.customers if any(start < b < end for b in theirs[key])}
        assert ours.split_on(start, end) == expected, day


def test_stored_boundaries_serve_a_renewal_only_if_the_new_period_is_one_of_theirs():
    from airflow_provider_stripe_meter.billing.period_sync import HORIZON, _still_holds

    far = 100 + HORIZON
    assert _still_holds(f"10,40,70,{far}", 40, 70)
    assert not _still_holds(f"10,40,70,{far}", 40, 69)  # Stripe's period is not one of ours
    assert not _still_holds(f"10,40,55,70,{far}", 40, 70)  # a boundary inside the new period
    assert not _still_holds("10,40,70,100", 40, 70)  # not far enough past it
    assert not _still_holds("", 40, 70)


def test_cuts_share_the_expected_events_evenly():
    moments = sorted([100] * 900 + list(range(1000, 1300)))
    cuts = _cuts(moments, 4)
    ranges = list(zip([0, *cuts], [*cuts, 10**9], strict=True))
    counts = [sum(1 for m in moments if lo < m <= hi) for lo, hi in ranges]
    # A second holding 900 events cannot be cut: the rest is shared out.
    assert counts[0] == 900
    assert sum(counts) == 1200
    assert len(ranges) >= 2
    assert _cuts(list(range(400)), 4) == [200]  # too few for four ranges of two pages
    assert _cuts([], 4) == []
