"""The ledger table through real databases: SQLite, and PostgreSQL when STRIPE_METER_TEST_PG_DSN is set."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_stripe_meter.ledger.entries import ACCEPTED, DROPPED, PENDING, UNVERIFIED, Entry
from airflow_provider_stripe_meter.ledger.schema import check_table_name
from airflow_provider_stripe_meter.ledger.store import SqlLedger

DAY = date(2026, 11, 19)
STAMP = 1_795_000_000


def entry(
    customer: str = "cus_a", seq: int = 1, value: int = 10, attempt: str = "run-1", **changes: Any
) -> Entry:
    fields: dict[str, Any] = {
        "account": "platform",
        "meter_id": "mtr_1",
        "event_name": "tokens",
        "customer_id": customer,
        "day": DAY,
        "seq": seq,
        "identifier": f"sm:tokens:{customer}:{DAY}:{seq}:mtr_1",
        "value": value,
        "stamp": STAMP + seq,
        "source_at": STAMP,
        "state": PENDING,
        "run_id": "scheduled__1",
        "attempt": attempt,
        "sent_at": 1.0,
    }
    fields.update(changes)
    return Entry(**fields)


@pytest.fixture(params=["sqlite", "postgres", "postgres-psycopg3"])
def connect(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Callable[[], Any], str, str]]:
    """A factory of connections to a fresh database, its placeholder and dialect."""
    if request.param == "sqlite":
        path = tmp_path / "ledger.db"
        yield (lambda: sqlite3.connect(path)), "?", "sqlite"
        return
    dsn = os.environ.get("STRIPE_METER_TEST_PG_DSN")
    if not dsn:
        pytest.skip("STRIPE_METER_TEST_PG_DSN not set: no PostgreSQL server (.ci/run starts one)")
    import psycopg2

    with psycopg2.connect(dsn) as con, con.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS stripe_meter_ledger")
    if request.param == "postgres-psycopg3":
        # The postgres provider hands out psycopg 3 connections where it is installed: COPY too.
        import psycopg

        yield (lambda: psycopg.connect(dsn)), "%s", "postgres"
        return
    yield (lambda: psycopg2.connect(dsn)), "%s", "postgres"


def ledger(connect: tuple[Callable[[], Any], str, str]) -> SqlLedger:
    factory, placeholder, dialect = connect
    return SqlLedger(factory, placeholder=placeholder, dialect=dialect)


def test_rows_are_written_pending_resolved_and_folded_per_customer_day(connect):
    store = ledger(connect)
    written = [entry(seq=1, value=10), entry(seq=2, value=5), entry("cus_b", seq=1, value=7)]
    assert store.insert(written) == {e.identifier for e in written}
    assert {e.identifier for e in store.open_entries("platform", "mtr_1")} == {e.identifier for e in written}
    store.resolve(
        "platform",
        [
            (written[0].identifier, ACCEPTED, 2.5, ""),
            (written[1].identifier, DROPPED, 3.5, "customer unknown to Stripe"),
            (written[2].identifier, UNVERIFIED, 4.5, "meter deactivated"),
        ],
    )
    figures = store.figures("platform", "mtr_1", DAY, DAY, newest=True)
    a, b = figures[("cus_a", DAY)], figures[("cus_b", DAY)]
    # A dropped event is not Stripe's; its number is used all the same.
    assert (a.total, a.events, a.max_seq, a.open, a.newest) == (10, 1, 2, 0, 10)
    assert (b.total, b.events, b.open) == (7, 1, 1)
    [unverified] = store.open_entries("platform", "mtr_1")
    assert (unverified.customer_id, unverified.state, unverified.answered_at) == ("cus_b", UNVERIFIED, 4.5)
    [dropped] = [e for e in store.entries_of("platform", "mtr_1", ["cus_a"], DAY, DAY) if e.seq == 2]
    assert (dropped.state, dropped.note) == (DROPPED, "customer unknown to Stripe")
    # Another account's ledger is apart.
    assert store.figures("acct_1", "mtr_1", DAY, DAY) == {}
    store.close()


def test_a_second_writer_of_the_same_next_event_is_refused_by_the_key(connect):
    first, second = ledger(connect), ledger(connect)
    assert first.insert([entry(attempt="run-1")]) == {entry().identifier}
    assert second.insert([entry(attempt="run-2", value=99), entry(seq=2, attempt="run-2")]) == {
        entry(seq=2).identifier
    }
    [kept] = [e for e in first.entries_of("platform", "mtr_1", ["cus_a"], DAY, DAY) if e.seq == 1]
    assert (kept.attempt, kept.value) == ("run-1", 10)
    first.close()
    second.close()


def test_concurrent_writers_each_own_a_key_exactly_once(connect):
    keys = [(f"cus_{c}", seq) for c in range(40) for seq in (1, 2)]
    owned: dict[str, set[str]] = {}
    errors: list[BaseException] = []

    def write(attempt: str) -> None:
        store = ledger(connect)
        try:
            owned[attempt] = store.insert([entry(c, seq, attempt=attempt) for c, seq in keys])
        except BaseException as err:
            errors.append(err)
        finally:
            store.close()

    threads = [threading.Thread(target=write, args=(f"run-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if connect[2] == "sqlite":
        # SQLite serialises writers: one may find the database locked and must try again later.
        assert all(isinstance(e, sqlite3.OperationalError) for e in errors), errors
    else:
        assert errors == []
    every = [i for ids in owned.values() for i in ids]
    assert len(every) == len(set(every))
    assert set(every) == {entry(c, seq).identifier for c, seq in keys}


def test_usage_billed_late_is_found_on_the_day_it_landed(connect):
    store = ledger(connect)
    landed = STAMP + 40 * 86400
    store.insert(
        [
            entry(seq=1, value=30, stamp=landed),  # an older day's usage, stamped later
            entry("cus_b", seq=1, value=5),  # the day's own usage
        ]
    )
    store.resolve("platform", [(entry(seq=1).identifier, ACCEPTED, 1.0, "")])
    late = store.landed_late("platform", "mtr_1", landed - 60, landed + 60)
    assert late == {("cus_a", _day(landed)): 30}
    store.close()


def _day(stamp: int) -> date:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(stamp, timezone.utc).date()


@pytest.mark.parametrize("name", ["ledger; DROP TABLE usage", "1ledger", "a.b.c", ""])
def test_a_table_name_that_is_not_a_name_is_refused(name):
    with pytest.raises(ValueError, match="ledger_table must be a table name"):
        check_table_name(name)


def test_values_with_tabs_newlines_and_backslashes_round_trip(connect):
    # PostgreSQL rows go in through COPY's text format, where these characters are escapes.
    store = ledger(connect)
    odd = entry("cus_a\tb\\c", run_id="manual__2026-12-05T14:00:00+00:00\nretry")
    assert store.insert([odd]) == {odd.identifier}
    store.resolve("platform", [(odd.identifier, ACCEPTED, 5.0, "a\\b\tc\nd")])
    [back] = store.entries_of("platform", "mtr_1", ["cus_a\tb\\c"], DAY, DAY)
    assert (back.customer_id, back.run_id, back.note, back.answered_at) == (
        odd.customer_id,
        odd.run_id,
        "a\\b\tc\nd",
        5.0,
    )
    store.close()


def test_a_subscriptions_write_that_fails_half_way_leaves_the_table_as_it_was(connect):
    # The write shares the ledger's connection (it runs while a run's events are out): a failure
    # after its DELETE must not be committed by the ledger's next write.
    from airflow_provider_stripe_meter.ledger.subscriptions import NAMES, SubscriptionCache, SyncState

    factory, placeholder, dialect = connect
    fresh = factory()
    for table in ("stripe_meter_ledger_subscriptions", "stripe_meter_ledger_subscriptions_sync"):
        fresh.cursor().execute(f"DROP TABLE IF EXISTS {table}")
    fresh.commit()
    fresh.close()
    store = SqlLedger(factory, placeholder=placeholder, dialect=dialect)
    cache = SubscriptionCache(store)
    row = ("platform", "mtr_1", "sub_1", "cus_a", "price_1", 10, 10, None, None, "month", 1, 10, 20, "10,20")
    assert len(row) == len(NAMES)
    cache.replace("platform", "mtr_1", [row], full=True, state=SyncState(("price_1",), 5, 5))
    broken = (*row[:4], None, *row[5:])  # price_id is NOT NULL: the INSERT fails after the DELETE
    with pytest.raises(Exception, match=r"(?i)null"):  # the driver's own IntegrityError
        cache.replace("platform", "mtr_1", [broken], full=False, state=SyncState(("price_1",), 5, 9))
    store.insert([entry()])  # the ledger's own work goes on, and commits
    assert [r[2] for r in cache.rows("platform", "mtr_1")] == ["sub_1"]
    assert cache.state("platform", "mtr_1") == SyncState(("price_1",), 5, 5)
    store.close()
