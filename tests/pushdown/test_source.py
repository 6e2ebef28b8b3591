"""The aggregation pushed into SQL gives exactly what the worker's row-by-row aggregation gives.

Differential: the same rows (clean ones, and every kind of bad one the rules know) in a real
SQLite, DuckDB and (when STRIPE_METER_TEST_PG_DSN is set) PostgreSQL table, aggregated both ways
by the same :class:`UsageAggregator` settings; the aggregates, too-old aggregates, row and problem
counts and the samples (which name rows by their position) must be equal.
"""

from __future__ import annotations

import csv
import os
import random
import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_stripe_meter.pushdown import Unsupported
from airflow_provider_stripe_meter.pushdown.dialects import (
    DuckdbDialect,
    PostgresDialect,
    SqlDialect,
    SqliteDialect,
)
from airflow_provider_stripe_meter.pushdown.source import aggregate_in_database
from airflow_provider_stripe_meter.utils.aggregation import UsageAggregator
from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY

NOW = 1_796_637_600 + 13 * 3600 + 17  # 2026-12-07 13:00:17 UTC
DAY = SECONDS_PER_DAY
CUSTOMERS = ["cus_a", "cus_b", "cus_c", "cus_d"]


def _naive(seconds: int, micro: int = 0) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc).replace(tzinfo=None, microsecond=micro)


def clean_rows(rng: random.Random, n: int) -> list[tuple[Any, ...]]:
    """Rows every database stores as they are: ties in a second, days across the window."""
    rows = []
    for _ in range(n):
        seconds = NOW - rng.choice([rng.randint(60, 3 * DAY), rng.randint(0, 40 * DAY), rng.randint(-900, 0)])
        rows.append((rng.choice(CUSTOMERS), rng.randint(-5, 50), seconds))
    # Two rows in one latest second with other values: the greater wins, in either order.
    rows += [
        ("cus_a", 9, NOW - 7200),
        ("cus_a", 4, NOW - 7200),
        ("cus_b", 4, NOW - 7000),
        ("cus_b", 9, NOW - 7000),
    ]
    return rows


def sqlite_rows(rng: random.Random, n: int) -> list[tuple[Any, ...]]:
    """SQLite holds any type in any column: the bad rows of every kind, mixed in."""
    rows: list[tuple[Any, ...]] = []
    for customer, value, seconds in clean_rows(rng, n):
        shape = rng.randrange(14)
        stamp: Any = _naive(seconds).isoformat(sep=" ")
        if shape == 0:
            stamp = seconds  # integer unix seconds
        elif shape == 1:
            stamp = _naive(seconds, 999_900).isoformat(sep=" ")  # a fraction SQLite would round up
        elif shape == 2:
            stamp = _naive(seconds).isoformat()  # "T"
        elif shape == 3:
            stamp = _naive(seconds).isoformat() + "Z"  # a zone: checked in Python
        elif shape == 4:
            stamp = rng.choice(["2026-02-30 10:00:00", "junk", None, " 2026-12-01 10:00:00", str(seconds)])
        elif shape == 5:
            value = rng.choice([12.0, 12.5, "4", None, True, "x", Decimal("3")][:6])
        elif shape == 6:
            customer = rng.choice(["bad", "cus_ x", None, "cus_", "cus_\tz", 42, "cus_\u00a0y"])
        rows.append((customer, value, stamp))
    return rows


def aggregator(*, keep: bool = False, split: Any = None, event_name: str | None = "e") -> UsageAggregator:
    columns = ("customer_id", "value", "ts", "event")
    return UsageAggregator(
        event_name=event_name, now=NOW, columns=columns, keep_too_old=keep, sample_limit=4, split=split
    )


def both_ways(
    connect: Callable[[], Any],
    dialect: SqlDialect,
    sql: str,
    *,
    keep: bool,
    split: Any,
    event_name: str | None,
    placeholder: str | None = None,
) -> tuple[UsageAggregator, UsageAggregator]:
    conn = connect()
    try:
        cur = conn.cursor()
        cur.execute(sql)
        rows = cur.fetchall()
        worker = aggregator(keep=keep, split=split, event_name=event_name)
        worker.add_rows(rows)
        worker.finish()
        database = aggregator(keep=keep, split=split, event_name=event_name)
        aggregate_in_database(
            conn, dialect, sql, None, database, placeholder=placeholder or PLACEHOLDER[dialect.name]
        )
        database.finish()
    finally:
        conn.close()
    return worker, database


PLACEHOLDER = {"sqlite": "?", "duckdb": "?", "postgresql": "%s"}


def assert_same(worker: UsageAggregator, database: UsageAggregator) -> None:
    def key(a: Any) -> tuple[Any, ...]:
        return (a.event_name, a.customer_id, a.day)

    assert sorted(database.finish(), key=key) == sorted(worker.finish(), key=key)
    assert sorted(database.too_old, key=key) == sorted(worker.too_old, key=key)
    assert (database.rows, database.too_old_rows) == (worker.rows, worker.too_old_rows)
    assert dict(database.problems.counts) == dict(worker.problems.counts)
    assert database.problems.samples == worker.problems.samples


SPLIT = {
    ("e", "cus_a"): (NOW - 3 * DAY + 5 * 3600, NOW - 3 * DAY + 9 * 3600, NOW - 2 * 3600),
    ("e", "cus_c"): (NOW - 20 * DAY + 77,),
    ("f", "cus_b"): (NOW - DAY - 3600,),
}


@pytest.fixture(scope="module")
def sqlite_source(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Any]:
    path = tmp_path_factory.mktemp("pushdown") / "usage.db"
    rng = random.Random(7)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE usage (customer_id, value, ts, event)")
        rows = sqlite_rows(rng, 3000)
        events = [rng.choice(["e", "e", "f", " e", "", None, "x" * 101]) for _ in rows]
        db.executemany(
            "INSERT INTO usage VALUES (?, ?, ?, ?)", [(*r, ev) for r, ev in zip(rows, events, strict=True)]
        )
    return lambda: sqlite3.connect(path)


@pytest.mark.parametrize("keep", [False, True], ids=["skip-too-old", "keep-too-old"])
@pytest.mark.parametrize("split", [None, SPLIT], ids=["whole-days", "split-days"])
@pytest.mark.parametrize("event_name", ["e", None], ids=["fixed-event", "event-column"])
def test_sqlite_with_every_kind_of_bad_row_aggregates_as_the_worker_does(
    sqlite_source: Callable[[], Any], keep: bool, split: Any, event_name: str | None
) -> None:
    worker, database = both_ways(
        sqlite_source, SqliteDialect(), "SELECT * FROM usage", keep=keep, split=split, event_name=event_name
    )
    assert_same(worker, database)
    # The claim is about something: bad rows of each kind, ties, split days and kept old rows.
    assert worker.problems.counts["invalid"] > 100
    assert worker.problems.counts["skipped_future"] > 0
    assert len(worker.problems.samples["invalid"]) == 4
    if split:
        assert any(a.parts for a in worker.finish())
    if keep:
        assert worker.too_old_rows > 0
    else:
        assert worker.problems.counts["skipped_too_old"] > 0


def _typed_rows(rng: random.Random, n: int, *, clean_names: bool = False) -> list[tuple[Any, ...]]:
    """Rows for a typed table: customers that break the rule, fractional and NULL values.

    ``clean_names``: the only bad customer is NULL and every event name is good (the SQL hands
    NULL's rows to Python, which refuses none of the names the database groups by)."""
    rows = []
    for customer, value, seconds in clean_rows(rng, n):
        shape = rng.randrange(12)
        stamp: Any = _naive(seconds, rng.choice([0, 0, 999_999]))
        dec: Any = Decimal(value)
        if shape == 0:
            bad = [None] if clean_names else ["bad", "cus_ x", None, "cus_", "cus_\nz", "cus_\u2003y"]
            customer = rng.choice(bad)
        elif shape == 1:
            dec = rng.choice([Decimal("12.5"), None])
        elif shape == 2:
            stamp = None
        rows.append(
            (customer, dec, stamp, rng.choice(["e", "e", "f"] if clean_names else ["e", "e", "f", " e"]))
        )
    return rows


def _duckdb(
    tmp_path_factory: pytest.TempPathFactory, stamp_type: str, value_type: str, *, clean_names: bool = False
) -> Callable[[], Any]:
    duckdb = pytest.importorskip("duckdb")
    path = str(tmp_path_factory.mktemp("duck") / "usage.duckdb")
    rows = _typed_rows(random.Random(11), 3000, clean_names=clean_names)
    db = duckdb.connect(path)
    db.execute(
        f"CREATE TABLE usage (customer_id VARCHAR, value {value_type}, ts {stamp_type}, event VARCHAR)"
    )
    if stamp_type == "DATE":
        rows = [(c, v, None if t is None else t.date(), e) for c, v, t, e in rows]
    elif stamp_type == "BIGINT":
        rows = [
            (c, v, None if t is None else int(t.replace(tzinfo=timezone.utc).timestamp()), e)
            for c, v, t, e in rows
        ]
    elif stamp_type.endswith("ZONE"):
        rows = [(c, v, None if t is None else t.replace(tzinfo=timezone.utc), e) for c, v, t, e in rows]
    # Through a CSV file: DuckDB's executemany takes seconds for a few thousand rows.
    csv_path = Path(path).with_suffix(".csv")
    with csv_path.open("w", newline="") as out:
        csv.writer(out).writerows([["\\N" if x is None else x for x in row] for row in rows])
    db.execute(f"COPY usage FROM '{csv_path}' (NULLSTR '\\N')")
    db.close()
    return lambda: duckdb.connect(path)


@pytest.mark.parametrize(
    ("stamp_type", "value_type"),
    [("TIMESTAMP", "DECIMAL(18,2)"), ("BIGINT", "BIGINT"), ("TIMESTAMP WITH TIME ZONE", "DECIMAL(18,2)")],
)
@pytest.mark.parametrize("event_name", ["e", None], ids=["fixed-event", "event-column"])
def test_duckdb_aggregates_as_the_worker_does(
    tmp_path_factory: pytest.TempPathFactory, stamp_type: str, value_type: str, event_name: str | None
) -> None:
    connect = _duckdb(tmp_path_factory, stamp_type, value_type)
    if stamp_type.endswith("ZONE"):
        # The session's zone must not matter: a zone-aware column is read as the instant it is.
        base = connect

        def connect() -> Any:
            conn = base()
            conn.execute("SET TimeZone = 'America/New_York'")
            return conn

    worker, database = both_ways(
        connect, DuckdbDialect(), "SELECT * FROM usage", keep=False, split=SPLIT, event_name=event_name
    )
    assert_same(worker, database)
    assert worker.problems.counts["invalid"] > 50


@pytest.fixture
def pg_connect() -> Iterator[Callable[[], Any]]:
    dsn = os.environ.get("STRIPE_METER_TEST_PG_DSN")
    if not dsn:
        pytest.skip("STRIPE_METER_TEST_PG_DSN not set: no PostgreSQL server (.ci/run starts one)")
    import psycopg2

    with psycopg2.connect(dsn) as db, db.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS pushdown_usage")
        cur.execute(
            "CREATE TABLE pushdown_usage (customer_id text, value numeric, ts timestamp, event text, "
            "tsz timestamptz, secs bigint, n bigint)"
        )
        rows = _typed_rows(random.Random(5), 3000)
        cur.executemany(
            "INSERT INTO pushdown_usage VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [
                (
                    c,
                    v,
                    t,
                    e,
                    None if t is None else t.replace(tzinfo=timezone.utc),
                    None if t is None else int(t.replace(tzinfo=timezone.utc).timestamp()),
                    None if v is None or v != v.to_integral_value() else int(v),
                )
                for c, v, t, e in rows
            ],
        )
    return lambda: psycopg2.connect(dsn)


@pytest.mark.parametrize(
    "columns",
    ["customer_id, value, ts, event", "customer_id, n, tsz, event", "customer_id, value, secs, event"],
    ids=["numeric-timestamp", "bigint-timestamptz", "numeric-unix-seconds"],
)
@pytest.mark.parametrize("keep", [False, True], ids=["skip-too-old", "keep-too-old"])
def test_postgres_aggregates_as_the_worker_does(
    pg_connect: Callable[[], Any], columns: str, keep: bool
) -> None:
    worker, database = both_ways(
        pg_connect,
        PostgresDialect(),
        f"SELECT {columns} FROM pushdown_usage",
        keep=keep,
        split=SPLIT,
        event_name=None,
    )
    assert_same(worker, database)
    assert worker.problems.counts["invalid"] > 50


def test_a_column_type_the_sql_cannot_read_exactly_is_named(tmp_path_factory: pytest.TempPathFactory) -> None:
    duckdb = pytest.importorskip("duckdb")
    conn = duckdb.connect()
    conn.execute("CREATE TABLE usage (customer_id VARCHAR, value DOUBLE, ts TIMESTAMP)")
    with pytest.raises(Unsupported, match="value column 'value' is of type 'DOUBLE'"):
        aggregate_in_database(conn, DuckdbDialect(), "SELECT * FROM usage", None, aggregator())


def test_a_customer_python_refuses_is_reported_row_by_row_as_the_worker_reports_it() -> None:
    # Customer ids are checked by Python, once per customer the database groups by: a no-break
    # space or an internal id, its rows handed back and reported by their position.
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE usage (customer_id, value, ts)")
    fresh, old = _naive(NOW - 60).isoformat(sep=" "), _naive(NOW - 50 * DAY).isoformat(sep=" ")
    rows = [
        ("cus_a", 1, fresh),
        ("cus_\u00a0x", 2, fresh),
        ("user_7", 3, old),
        ("cus_a", 4, old),
        (42, 5, fresh),
    ]
    conn.executemany("INSERT INTO usage VALUES (?, ?, ?)", rows)
    worker, database = aggregator(), aggregator()
    worker.add_rows(rows)
    figures = aggregate_in_database(conn, SqliteDialect(), "SELECT * FROM usage", None, database)
    assert_same(worker, database)
    assert [s["row"] for s in database.problems.samples["invalid"]] == [2, 3, 5]
    assert [s["row"] for s in database.problems.samples["skipped_too_old"]] == [4]
    assert figures.rows_checked == 4  # three refused customers' rows, one old row sampled


def test_the_query_keeps_its_own_text_and_parameters() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE usage (customer_id, value, ts)")
    stamp = _naive(NOW - 60).isoformat(sep=" ")
    conn.executemany("INSERT INTO usage VALUES (?, ?, ?)", [("cus_a", 2, stamp), ("cus_b", 3, stamp)])
    database = aggregator()
    # A trailing semicolon and comment, a parameter: kept as written.
    sql = "SELECT * FROM usage WHERE customer_id = ? -- the one customer\n; -- nightly\n"
    figures = aggregate_in_database(
        conn, SqliteDialect(), sql, ["cus_b"], database, needs_last=lambda names: set()
    )
    [day] = database.finish()
    assert (day.customer_id, day.value, day.rows, database.rows) == ("cus_b", 3, 1, 1)
    # A clean night of a sum meter: one statement, no row back to the worker.
    assert figures.statements == 1
    assert figures.rows_checked == 0
    assert figures.groups == 1


# -- counterexamples found by review, each a regression test -------------------------------------


def _sqlite(rows: list[tuple[Any, ...]], columns: str = "customer_id, value, ts") -> Callable[[], Any]:
    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE TABLE usage ({columns})")
    conn.executemany(f"INSERT INTO usage VALUES ({', '.join('?' * len(rows[0]))})", rows)
    return lambda: conn


class _Shared:
    """One in-memory connection handed out again (both_ways closes what it is given)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    def close(self) -> None:
        pass


def _iso(seconds: int) -> str:
    return _naive(seconds).isoformat(sep=" ")


def _same(
    rows: list[tuple[Any, ...]], *, columns: str = "customer_id, value, ts", **kwargs: Any
) -> UsageAggregator:
    conn = _Shared(_sqlite(rows, columns)())
    kwargs.setdefault("keep", False)
    kwargs.setdefault("split", None)
    kwargs.setdefault("event_name", "e")
    worker, database = both_ways(lambda: conn, SqliteDialect(), "SELECT * FROM usage", **kwargs)
    assert_same(worker, database)
    return database


def test_a_day_split_for_another_meter_of_the_customer_is_cut_as_the_worker_cuts_it() -> None:
    # The customer's day holds a boundary of meter "f"; meter "e"'s own boundary that day comes
    # after the window's end: the worker cuts "e"'s day there; so must the database, also when
    # one of the day's rows (a text value) is checked by Python.
    split = {("e", "cus_a"): (NOW + 600,), ("f", "cus_a"): (NOW - 3600,)}
    rows = [("cus_a", 5, _iso(NOW - 7200), "e"), ("cus_a", "7", _iso(NOW - 3000), "e")]
    columns = "customer_id, value, ts, event"
    for event_name in ("e", None):
        database = _same(rows, columns=columns, split=split, event_name=event_name)
        [day] = database.finish()
        assert (day.value, len(day.parts)) == (12, 1)


def test_text_is_compared_byte_for_byte_whatever_the_columns_collation() -> None:
    rows = [("cus_A", 1, _iso(NOW - 60), "api_calls"), ("cus_a", 2, _iso(NOW - 60), "API_CALLS")]
    rows.append(("cus_a ", 4, _iso(NOW - 60), "api_calls"))  # a trailing space: invalid
    columns = "customer_id COLLATE NOCASE, value, ts, event COLLATE NOCASE"
    database = _same(rows, columns=columns, event_name=None)
    assert len(database.finish()) == 2
    assert database.problems.counts["invalid"] == 1
    _same(rows, columns="customer_id COLLATE RTRIM, value, ts, event", event_name=None)


def test_text_timestamps_sqlite_reads_but_python_refuses_are_checked_by_python() -> None:
    odd = [
        "2026-12-07    10:00",
        "2026-12-07TTTTTTTTT",
        "2026-12-07 T10:00  ",
        "2026-12-07 10:00z  ",
        "2026-12-07 10:00   .5",
        _iso(NOW - 60) + "\x00junk",
        "1.0e-00000000000001",
    ]
    rows = [("cus_a", 1, _iso(NOW - 120))] + [("cus_a", 5, stamp) for stamp in odd]
    for keep in (False, True):
        database = _same(rows, keep=keep)
        assert database.problems.counts["invalid"] == len(odd)


def test_a_row_before_1970_billed_late_lands_on_its_own_day() -> None:
    rows = [("cus_a", 3, "1969-12-31 12:00:00"), ("cus_b", 4, -43_200), ("cus_c", 1, _iso(NOW - 60))]
    database = _same(rows, keep=True)
    assert {a.day.isoformat() for a in database.too_old} == {"1969-12-31"}


def test_days_over_15_digits_are_reported_in_the_same_order_on_both_paths() -> None:
    rows = [("cus_b", 10**15, _iso(NOW - 60)), ("cus_a", 10**15, _iso(NOW - 60))]
    database = _same(rows)
    assert [s["customer_id"] for s in database.problems.samples["invalid"]] == ["cus_a", "cus_b"]


def test_event_names_never_enter_the_sql_as_text() -> None:
    # A "%" (doubled by a pyformat driver's escaping) or a NUL in an event name: the latest
    # values of a last meter are looked up for every group, and picked by name in Python.
    duckdb = pytest.importorskip("duckdb")
    conn = duckdb.connect()
    conn.execute("CREATE TABLE usage (customer_id VARCHAR, value BIGINT, ts TIMESTAMP, event VARCHAR)")
    conn.executemany(
        "INSERT INTO usage VALUES (?, ?, ?, ?)",
        [("cus_a", 5, _naive(NOW - 7200), "gb_50%_tier"), ("cus_a", 3, _naive(NOW - 9000), "gb_50%_tier")],
    )
    worker, database = aggregator(event_name=None), aggregator(event_name=None)
    worker.add_rows(conn.execute("SELECT * FROM usage").fetchall())
    aggregate_in_database(conn, DuckdbDialect(), "SELECT * FROM usage", None, database)
    assert_same(worker, database)
    assert [a.last_value for a in database.finish()] == [5]
    nul = _same(
        [("cus_a", 2, _iso(NOW - 60), "e\x00x")], columns="customer_id, value, ts, event", event_name=None
    )
    assert [a.last_value for a in nul.finish()] == [2]
