"""Histories where the ledger subtracted in the database must still give the worker's result:
rows the SQL cannot vouch for, rows older than the window kept apart, the default coverage's
corrections, dry runs, a mixed-case ledger table, a meter the run cannot bill. Each was a
counterexample once (a review of the first version of :mod:`.ledger_diff`)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_stripe_meter.billing.coverage import Coverage
from tests.billing.world import DAY, EPOCH, EVENT, HOUR, World, midnight

HOW = {"aggregated_in", "aggregated_because", "database", "seconds"}
NOW = 1_764_000_000 - 1_764_000_000 % DAY + 2 * HOUR
TODAY = NOW // DAY


def _what(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in HOW}


class _Zulu(int):
    """Unix seconds written as ISO text ending in ``Z``: SQLite's SQL cannot vouch for it, Python
    reads it (the row comes back to the worker, which adds it to its customer-day)."""


def _zulu_text(value: int) -> str:
    return datetime.fromtimestamp(int(value), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


sqlite3.register_adapter(_Zulu, _zulu_text)


class _CheckedWorld(World):
    """A World whose usage table takes any timestamp (rows Python checks are allowed)."""

    def _aggregate_in_database(
        self, aggregator: Any, since: int | None, end: int, *, subtract: Coverage | None = None
    ) -> None:
        from airflow_provider_stripe_meter.pushdown.dialects import SqliteDialect
        from airflow_provider_stripe_meter.pushdown.ledger_diff import LedgerSide
        from airflow_provider_stripe_meter.pushdown.source import aggregate_in_database

        store = self.store()
        con = store.conn
        con.execute("DROP TABLE IF EXISTS usage")
        side = None
        if subtract is not None:
            days = subtract.days
            apart = (days[0].toordinal() - EPOCH, days[-1].toordinal() - EPOCH) if days else None
            side = LedgerSide("stripe_meter_ledger", "platform", {EVENT: (self.meter.id, False)}, apart)
        try:
            con.execute("CREATE TABLE usage (customer_id TEXT, value INTEGER, used_at)")
            con.executemany("INSERT INTO usage VALUES (?, ?, ?)", self.rows)
            figures = aggregate_in_database(
                con,
                SqliteDialect(),
                "SELECT customer_id, value, used_at FROM usage",
                None,
                aggregator,
                ledger=(lambda: side) if side is not None else None,
            )
            aggregator.database = figures.as_dict()
            self.unchanged = figures.unchanged
        finally:
            store.close()


def _pair(tmp_path: Path, monkeypatch: Any, world: type[World] = World, **kwargs: Any) -> tuple[World, World]:
    (tmp_path / "worker").mkdir()
    (tmp_path / "ledger").mkdir()
    worker = World(tmp_path / "worker", monkeypatch, **kwargs)
    ledger = world(tmp_path / "ledger", monkeypatch, **kwargs)
    ledger.aggregate_in = "ledger"
    return worker, ledger


def test_a_row_python_checks_is_added_to_its_whole_day(tmp_path: Path, monkeypatch: Any) -> None:
    # Billed 10; a late row of 5 comes in a form the SQL cannot read: the worker tops the day up
    # to 15. Were the day's other rows left in the database, the planner would see 5 and correct
    # the day down to 5.
    pair = _pair(tmp_path, monkeypatch, _CheckedWorld, check_customers=False)
    day = midnight(-2)
    for w in pair:
        w.add("cus_a", 10, day + 10 * HOUR)
    first = [w.run() for w in pair]
    assert _what(first[0]) == _what(first[1])
    for w in pair:
        w.add("cus_a", 5, _Zulu(day + 11 * HOUR))
    again = [w.run() for w in pair]
    assert pair[0].billed() == {("cus_a", "2026-11-18"): 15}
    assert pair[1].billed() == pair[0].billed()
    assert _what(again[0]) == _what(again[1])


def test_a_customer_with_a_checked_row_is_counted_once(tmp_path: Path, monkeypatch: Any) -> None:
    pair = _pair(tmp_path, monkeypatch, _CheckedWorld, check_customers=False)
    for w in pair:
        w.add("cus_a", 7, midnight(-2) + HOUR)
    [w.run() for w in pair]
    for w in pair:
        w.add("cus_a", 3, _Zulu(midnight(-1) + HOUR))
    again = [w.run() for w in pair]
    assert again[1]["totals"][EVENT]["customers"] == again[0]["totals"][EVENT]["customers"] == 1
    assert _what(again[0]) == _what(again[1])


def test_bill_at_oldest_a_late_row_on_the_day_straddling_the_window_is_billed(
    tmp_path: Path, monkeypatch: Any
) -> None:
    pair = _pair(tmp_path, monkeypatch, check_customers=False)
    day = midnight(-34)
    for w in pair:
        w.add("cus_a", 10, day + 10 * HOUR)
    first = [w.run(too_old="bill_at_oldest") for w in pair]
    assert _what(first[0]) == _what(first[1])
    for w in pair:
        w.now += DAY
        w.add("cus_a", 5, day + HOUR)  # now older than the window's start
    again = [w.run(too_old="bill_at_oldest") for w in pair]
    assert pair[0].billed() == {("cus_a", "2026-10-17"): 15}
    assert pair[1].billed() == pair[0].billed()
    assert _what(again[0]) == _what(again[1])


def test_the_default_coverage_corrects_a_customer_whose_other_days_are_unchanged(
    tmp_path: Path, monkeypatch: Any
) -> None:
    # covers="billing_window" corrects only the customers the query returned rows of: cus_x's
    # covered day lost its rows, its day before did not. The worker sees cus_x through that day
    # and corrects the covered one to nothing; so must a run that leaves the day before in the
    # database.
    pair = _pair(tmp_path, monkeypatch, check_customers=False)
    now = int(pair[0].now)
    for w in pair:
        w.add("cus_x", 5, midnight(-2, now) + HOUR)
        w.add("cus_x", 7, midnight(-1, now) + HOUR)
        w.add("cus_y", 3, midnight(-1, now) + HOUR)

    def nightly(w: World) -> dict[str, Any]:
        seen = {datetime.fromtimestamp(t, timezone.utc).date() for _, _, t in w.rows}
        covers = Coverage.between(midnight(-1, now), midnight(0, now), now, days=seen, every_customer=False)
        return w.run(since=midnight(-3, now), until=midnight(0, now), covers=covers)

    first = [nightly(w) for w in pair]
    assert _what(first[0]) == _what(first[1])
    for w in pair:
        w.rows.remove(("cus_x", 7, midnight(-1, now) + HOUR))
    again = [nightly(w) for w in pair]
    assert again[0]["actions"]["correct"] == 1
    assert pair[0].billed() == pair[0].source()
    assert pair[1].billed() == pair[0].billed()
    assert _what(again[0]) == _what(again[1])


def test_a_dry_run_or_a_report_plans_every_customer_day() -> None:
    from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator

    def side(**kwargs: Any) -> Any:
        op = StripeMeterEventBatchOperator(
            task_id="bill", event_name=EVENT, sql="SELECT 1", sql_conn_id="usage", **kwargs
        )
        return op._ledger_side(None, None, {})  # type: ignore[arg-type]

    assert side() is not None
    assert side(dry_run=True) is None
    assert side(report_path="file:///tmp/report.jsonl") is None
    assert side(adopt=True) is None
    assert side(ledger_conn_id="elsewhere") is None


def test_a_meter_the_run_cannot_bill_is_not_subtracted(tmp_path: Path, monkeypatch: Any) -> None:
    import uuid

    from airflow_provider_stripe_meter.billing.context import Writer
    from airflow_provider_stripe_meter.billing.run import BillingRun
    from tests.billing.world import LOG

    w = World(tmp_path, monkeypatch, check_customers=False)
    w.stripe_state.add_meter("other_team_events", formula="count", event_time_window="hour")
    run = BillingRun(
        _settings(), w.stripe, w.store(), Writer("platform", "nightly", uuid.uuid4().hex), LOG, int(w.now)
    )
    assert set(run.subtractable({EVENT, "other_team_events"})) == {EVENT}


def _settings() -> Any:
    from airflow_provider_stripe_meter.billing.settings import Delivery, RunSettings, Timing

    return RunSettings(
        api="v1",
        confirm="meter",
        adopt=False,
        dry_run=False,
        max_rps=10_000,
        read_rps=10_000,
        delivery=Delivery(
            max_rps=10_000, concurrency=None, max_attempts=3, outage_timeout=timedelta(seconds=5)
        ),
        timing=Timing(settle_timeout=timedelta(minutes=10)),
        summary_lag=0.0,
    )


@pytest.fixture
def pg_connect() -> Callable[[], Any]:
    dsn = os.environ.get("STRIPE_METER_TEST_PG_DSN")
    if not dsn:
        pytest.skip("STRIPE_METER_TEST_PG_DSN not set: no PostgreSQL server (.ci/run starts one)")
    import psycopg2

    return lambda: psycopg2.connect(dsn)


@pytest.mark.parametrize("table", ["Billing_Ledger", "public.Billing_Ledger"])
def test_postgresql_finds_a_mixed_case_ledger_table_as_the_ledger_writes_it(
    pg_connect: Callable[[], Any], table: str
) -> None:
    from airflow_provider_stripe_meter.ledger.entries import Entry
    from airflow_provider_stripe_meter.ledger.store import SqlLedger
    from airflow_provider_stripe_meter.pushdown.dialects import PostgresDialect
    from airflow_provider_stripe_meter.pushdown.ledger_diff import LedgerSide
    from airflow_provider_stripe_meter.pushdown.source import aggregate_in_database
    from airflow_provider_stripe_meter.utils.aggregation import UsageAggregator

    conn = pg_connect()
    cur = conn.cursor()
    cur.execute("DROP TABLE IF EXISTS billing_ledger")
    ledger = SqlLedger(lambda: conn, table=table, placeholder="%s", dialect="postgres")
    stamp = (TODAY - 2) * DAY + HOUR
    day = date(1970, 1, 1) + timedelta(days=TODAY - 2)
    ledger.insert(
        [Entry("platform", "mtr_a", "e", "cus_a", day, 1, "id-1", 5, stamp, stamp, "accepted", "r", "a", 0.0)]
    )
    cur.execute("DROP TABLE IF EXISTS mixed_usage")
    cur.execute("CREATE TABLE mixed_usage (customer_id VARCHAR(40), value BIGINT, secs BIGINT)")
    cur.execute("INSERT INTO mixed_usage VALUES ('cus_a', 5, %s), ('cus_b', 3, %s)", (stamp, stamp))
    conn.commit()
    aggregator = UsageAggregator(event_name="e", now=NOW, columns=("customer_id", "value", "secs"))
    side = LedgerSide(table, "platform", {"e": ("mtr_a", False)})
    try:
        figures = aggregate_in_database(
            conn,
            PostgresDialect(),
            "SELECT customer_id, value, secs FROM mixed_usage",
            None,
            aggregator,
            ledger=lambda: side,
        )
    finally:
        conn.rollback()
        cur.execute("DROP TABLE IF EXISTS billing_ledger")
        conn.commit()
        conn.close()
    # The day differs (cus_b is new): it comes back whole, read through the table.
    assert (figures.groups, figures.unchanged) == (2, 0)
