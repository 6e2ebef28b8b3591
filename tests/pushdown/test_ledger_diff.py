"""The ledger subtracted in the database (:mod:`airflow_provider_stripe_meter.pushdown.ledger_diff`):
the same histories lived twice, once summed row by row on the worker and once with the usage
table beside the ledger (SQLite), and the two runs' results compared key by key; what reached
Stripe is compared too. Then what the database handed back, and the SQL on PostgreSQL."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest

from airflow_provider_stripe_meter.billing.coverage import Coverage
from tests.billing.world import DAY, HOUR, World, midnight

#: Result keys that say how the rows were read, not what became of them; and the delivery's
#: seconds, measured on the machine's own clock.
HOW = {"aggregated_in", "aggregated_because", "database", "seconds"}


def _pair(tmp_path: Any, monkeypatch: Any, **kwargs: Any) -> tuple[World, World]:
    worker = World(tmp_path / "worker", monkeypatch, **kwargs)
    ledger = World(tmp_path / "ledger", monkeypatch, **kwargs)
    (tmp_path / "worker").mkdir()
    (tmp_path / "ledger").mkdir()
    ledger.aggregate_in = "ledger"
    return worker, ledger


def _both(pair: tuple[World, World], step: Callable[[World], Any]) -> tuple[Any, Any]:
    return step(pair[0]), step(pair[1])


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    left = {k: v for k, v in a.items() if k not in HOW}
    right = {k: v for k, v in b.items() if k not in HOW}
    assert left == right


def _rows(w: World, customers: int, days: range, base: int = 100) -> None:
    for back in days:
        for c in range(customers):
            w.add(f"cus_{c:03d}", base + c + back, midnight(-back, int(w.now)) + HOUR + c)


def _three_days(w: World, **kwargs: Any) -> dict[str, Any]:
    """A nightly whose query reads three days and covers its own (the operator's default)."""
    now = int(w.now)
    own = Coverage.between(midnight(-1, now), midnight(0, now), now)
    return w.run(since=midnight(-3, now), until=midnight(0, now), covers=own, **kwargs)


@pytest.mark.parametrize("formula", ["sum", "count"])
def test_a_rerun_of_billed_days_leaves_them_in_the_database_with_the_same_result(
    tmp_path: Any, monkeypatch: Any, formula: str
) -> None:
    pair = _pair(tmp_path, monkeypatch, formula=formula, check_customers=False)
    _both(pair, lambda w: _rows(w, 6, range(1, 4)))
    first = _both(pair, _three_days)
    _same(*first)
    assert first[0]["sent"] == 18
    # The first night the ledger held nothing: every customer-day came back.
    assert pair[1].unchanged == 0
    again = _both(pair, _three_days)
    _same(*again)
    assert again[0]["already_recorded"] == 18
    assert again[0]["events_sent"] == 0
    # Two of the three days left in the database (the covered day is planned in full).
    assert pair[1].unchanged == 12
    assert again[1]["database"]["groups"] == 6
    assert again[1]["database"]["unchanged"] == 12
    assert again[1]["totals"]["ai_tokens_used"]["customers"] == 6
    assert pair[0].billed() == pair[1].billed() == pair[0].source()


def test_what_changed_on_an_older_day_comes_back_and_is_billed_as_the_worker_bills_it(
    tmp_path: Any, monkeypatch: Any
) -> None:
    pair = _pair(tmp_path, monkeypatch, check_customers=False)
    _both(pair, lambda w: _rows(w, 5, range(1, 4)))
    _same(*_both(pair, _three_days))

    def late_rows_and_a_deletion(w: World) -> None:
        # A late row on the oldest day, a row removed from the middle day (outside the
        # coverage: an older view, left alone), and a customer's first day.
        w.add("cus_001", 7, midnight(-3, int(w.now)) + 5 * HOUR)
        w.rows.remove(
            next(r for r in w.rows if r[0] == "cus_002" and r[2] // DAY == midnight(-2, int(w.now)) // DAY)
        )
        w.add("cus_new", 3, midnight(-2, int(w.now)) + 6 * HOUR)

    _both(pair, late_rows_and_a_deletion)
    again = _both(pair, _three_days)
    _same(*again)
    assert again[0]["events_sent"] == 2
    # The covered day's five, the day with a late row and the new customer's day; the day whose
    # only row is gone has no group (and, outside the coverage, is not corrected on either path).
    assert again[1]["database"]["groups"] == 5 + 2
    assert pair[1].unchanged == 10 - 2
    assert pair[0].billed() == pair[1].billed()


def test_a_day_with_an_open_row_comes_back_to_be_settled(tmp_path: Any, monkeypatch: Any) -> None:
    pair = _pair(tmp_path, monkeypatch, check_customers=False)
    _both(pair, lambda w: _rows(w, 3, range(1, 3)))
    _same(*_both(pair, _three_days))
    for w in pair:
        with sqlite3.connect(w.db) as con:
            con.execute("UPDATE stripe_meter_ledger SET state = 'pending' WHERE customer_id = 'cus_000'")
    again = _both(pair, _three_days)
    _same(*again)
    # cus_000's older day came back with its open row: settled, not sent again.
    assert again[1]["database"]["groups"] == 3 + 1
    assert again[0]["ledger"]["settled"] == 2
    assert pair[0].billed() == pair[1].billed() == pair[0].source()


def test_a_last_meter_is_never_left_in_the_database(tmp_path: Any, monkeypatch: Any) -> None:
    pair = _pair(tmp_path, monkeypatch, formula="last", check_customers=False)
    _both(pair, lambda w: _rows(w, 3, range(1, 3)))
    _same(*_both(pair, _three_days))
    again = _both(pair, _three_days)
    _same(*again)
    assert pair[1].unchanged is None
    assert "unchanged" not in again[1]["database"]


def test_a_run_covering_every_day_it_reads_plans_them_all(tmp_path: Any, monkeypatch: Any) -> None:
    # Where the coverage holds every day of the query, a deleted row is a correction: found only
    # by planning every customer-day, so none is left in the database.
    pair = _pair(tmp_path, monkeypatch, check_customers=False)
    _both(pair, lambda w: _rows(w, 3, range(1, 3)))
    now = int(pair[0].now)
    _same(*_both(pair, lambda w: w.run(since=midnight(-2, now), until=midnight(0, now))))
    _both(pair, lambda w: w.rows.remove(next(r for r in w.rows if r[0] == "cus_001")))
    again = _both(pair, lambda w: w.run(since=midnight(-2, now), until=midnight(0, now)))
    _same(*again)
    assert pair[1].unchanged == 0
    assert again[0]["actions"]["correct"] == 1
    assert pair[0].billed() == pair[1].billed() == pair[0].source()


def test_a_day_split_at_a_billing_period_boundary_comes_back_part_by_part(
    tmp_path: Any, monkeypatch: Any
) -> None:
    from airflow_provider_stripe_meter.billing.periods import CustomerPeriods, Period, PeriodBook

    pair = _pair(tmp_path, monkeypatch, check_customers=False)
    now = int(pair[0].now)
    boundary = midnight(-2, now) + 14 * HOUR + 37 * 60 + 12
    customers = [f"cus_{c:03d}" for c in range(3)]

    def periods() -> PeriodBook:
        # The period ended two days ago mid-afternoon; its draft takes usage for three days more.
        mine = CustomerPeriods(
            [
                Period(boundary - 30 * DAY, boundary, "sub_1", boundary + 72 * HOUR),
                Period(boundary, boundary + 30 * DAY, "sub_1"),
            ]
        )
        return PeriodBook({("ai_tokens_used", c): mine for c in customers}, ["ai_tokens_used"], now=now)

    def rows(w: World) -> None:
        _rows(w, 3, range(1, 4))
        for c in customers:  # the split day's afternoon, after the boundary
            w.add(c, 11, boundary + HOUR)

    _both(pair, rows)
    _same(*_both(pair, lambda w: _three_days(w, periods=periods())))
    again = _both(pair, lambda w: _three_days(w, periods=periods()))
    _same(*again)
    assert again[0]["events_sent"] == 0
    # Left in the database: the whole days before the covered one (three customers on the
    # oldest day); the split day's parts came back, each customer's two.
    assert pair[1].unchanged == 3
    assert again[1]["database"]["groups"] == 3 + 3 * 2
    assert pair[0].billed() == pair[1].billed() == pair[0].source()


# -- the statement itself, on SQLite and PostgreSQL ----------------------------------------------

#: The run's "now" in the statement-level tests, and its day number.
NOW = 1_764_000_000 - 1_764_000_000 % DAY + 2 * HOUR
TODAY = NOW // DAY


def _ledger_rows(account: str = "platform") -> list[Any]:
    """Ledger rows of meter ``mtr_a``, each about one customer-day of :func:`_usage`."""
    from datetime import date, timedelta

    from airflow_provider_stripe_meter.ledger.entries import Entry

    def row(customer: str, back: int, seq: int, value: int, state: str, **kw: Any) -> Entry:
        day = date(1970, 1, 1) + timedelta(days=TODAY - back)
        return Entry(
            kw.pop("account", account),
            kw.pop("meter", "mtr_a"),
            "e",
            customer,
            day,
            seq,
            f"id-{customer}-{back}-{seq}-{kw.get('part', 0)}-{account}",
            value,
            (TODAY - back) * DAY + HOUR,
            (TODAY - back) * DAY + HOUR,
            state,
            "run",
            "attempt",
            0.0,
            **kw,
        )

    return [
        row("cus_same", 1, 1, 10, "accepted"),
        row("cus_same", 1, 2, 5, "accepted"),  # two events, 15 in all: the source's 15
        row("cus_more", 1, 1, 10, "accepted"),  # the source has 12
        row("cus_open", 1, 1, 10, "pending"),  # open: settled first
        row("cus_gone", 1, 1, 10, "dropped"),  # nothing live: Stripe holds none of it
        row("cus_gone", 1, 2, 10, "accepted", account="acct_other"),  # another account's
        row("cus_split", 1, 1, 10, "accepted", part=(TODAY - 1) * DAY),  # a part of a split day
        row("cus_meter", 1, 1, 10, "accepted", meter="mtr_old"),  # another meter's
        row("cus_same", 2, 1, 7, "accepted"),  # the older day, the same
    ]


def _usage() -> list[tuple[str, int, int]]:
    at = (TODAY - 1) * DAY + 3 * HOUR
    return [
        ("cus_same", 9, at),
        ("cus_same", 6, at + 60),
        ("cus_more", 12, at),
        ("cus_open", 10, at),
        ("cus_gone", 10, at),
        ("cus_split", 10, at),
        ("cus_meter", 10, at),
        ("cus_new", 4, at),
        ("cus_same", 7, at - DAY),
    ]


def _subtract(
    connect: Callable[[], Any],
    dialect: Any,
    placeholder: str,
    counts: bool = False,
    ledger_rows: list[Any] | None = None,
    usage: list[tuple[str, int, int]] | None = None,
) -> Any:
    from airflow_provider_stripe_meter.ledger.store import SqlLedger
    from airflow_provider_stripe_meter.pushdown.ledger_diff import LedgerSide
    from airflow_provider_stripe_meter.pushdown.source import aggregate_in_database
    from airflow_provider_stripe_meter.utils.aggregation import UsageAggregator

    conn = connect()
    ledger = SqlLedger(
        lambda: conn, placeholder=placeholder, dialect="postgres" if placeholder == "%s" else "sqlite"
    )
    cur = conn.cursor()
    cur.execute(f"DROP TABLE IF EXISTS {ledger.table}")
    ledger.insert(ledger_rows if ledger_rows is not None else _ledger_rows())
    cur.execute("DROP TABLE IF EXISTS diff_usage")
    cur.execute("CREATE TABLE diff_usage (customer_id VARCHAR(40), value BIGINT, secs BIGINT)")
    for row in usage if usage is not None else _usage():
        cur.execute(f"INSERT INTO diff_usage VALUES ({placeholder}, {placeholder}, {placeholder})", row)
    conn.commit()
    aggregator = UsageAggregator(event_name="e", now=NOW, columns=("customer_id", "value", "secs"))
    side = LedgerSide(ledger.table, "platform", {"e": ("mtr_a", counts)})
    figures = aggregate_in_database(
        conn,
        dialect,
        "SELECT customer_id, value, secs FROM diff_usage",
        None,
        aggregator,
        placeholder=placeholder,
        ledger=lambda: side,
    )
    conn.close()
    back = sorted((a.customer_id, TODAY - (a.day.toordinal() - 719163)) for a in aggregator.finish())
    return figures, aggregator.unchanged, back


@pytest.fixture
def pg_dsn_connect() -> Callable[[], Any]:
    dsn = os.environ.get("STRIPE_METER_TEST_PG_DSN")
    if not dsn:
        pytest.skip("STRIPE_METER_TEST_PG_DSN not set: no PostgreSQL server (.ci/run starts one)")
    import psycopg2

    return lambda: psycopg2.connect(dsn)


def _sqlite_connect(tmp_path: Any) -> Callable[[], Any]:
    return lambda: sqlite3.connect(tmp_path / "diff.db")


def test_only_the_customer_days_the_ledger_holds_exactly_stay_in_the_database(tmp_path: Any) -> None:
    from airflow_provider_stripe_meter.pushdown.dialects import SqliteDialect

    # SQLite compares customer-day by customer-day.
    figures, unchanged, back = _subtract(_sqlite_connect(tmp_path), SqliteDialect(), "?")
    # Left in the database: cus_same's two days (15 and 7, as the ledger holds them).
    assert unchanged.groups() == 2
    assert unchanged.value == {"e": 22}
    assert unchanged.rows == 3
    assert unchanged.customers == {"e": 1}
    assert unchanged.all_customers == 1
    assert sorted(unchanged.days["e"].values()) == [1, 1]
    # Back to the worker: a different sum, an open row, nothing live, a split day's part, another
    # meter's rows, a new customer.
    assert back == [(c, 1) for c in ("cus_gone", "cus_meter", "cus_more", "cus_new", "cus_open", "cus_split")]
    assert (figures.groups, figures.unchanged) == (6, 2)


def test_a_count_meter_compares_rows_with_events(tmp_path: Any) -> None:
    from airflow_provider_stripe_meter.pushdown.dialects import SqliteDialect

    _, unchanged, back = _subtract(_sqlite_connect(tmp_path), SqliteDialect(), "?", counts=True)
    # cus_same: two rows and two events on the day, one and one the day before; cus_more's one
    # row is its one event (whatever the values).
    assert unchanged.groups() == 3
    assert unchanged.value == {"e": 4}
    assert ("cus_more", 1) not in back


def _spread(
    rows: list[Any], usage: list[tuple[str, int, int]]
) -> tuple[list[Any], list[tuple[str, int, int]]]:
    """The same situations, each on a day of its own (by its customer), as PostgreSQL compares
    day by day: a day comes back whole or stays whole."""
    from dataclasses import replace
    from datetime import timedelta

    customers = sorted({r[0] for r in usage} | {e.customer_id for e in rows})
    back = {c: i for i, c in enumerate(customers)}
    spread_rows = [
        replace(
            e,
            day=e.day - timedelta(days=3 * back[e.customer_id]),
            identifier=f"{e.identifier}-s",
            part=e.part - 3 * back[e.customer_id] * DAY if e.part else 0,
        )
        for e in rows
    ]
    spread_usage = [(c, v, t - 3 * back[c] * DAY) for c, v, t in usage]
    return spread_rows, spread_usage


def test_postgresql_compares_day_by_day_through_digests(pg_dsn_connect: Callable[[], Any]) -> None:
    from airflow_provider_stripe_meter.pushdown.dialects import PostgresDialect

    rows, usage = _spread(_ledger_rows(), _usage())
    figures, unchanged, back = _subtract(
        pg_dsn_connect, PostgresDialect(), "%s", ledger_rows=rows, usage=usage
    )
    # cus_same's two days stay (it is first: its days are the original ones); every other
    # situation's day comes back, as on SQLite.
    assert unchanged.groups() == 2
    assert unchanged.value == {"e": 22}
    assert (unchanged.customers, unchanged.all_customers) == ({"e": 1}, 1)
    assert [c for c, _ in back] == ["cus_gone", "cus_meter", "cus_more", "cus_new", "cus_open", "cus_split"]
    assert (figures.groups, figures.unchanged) == (6, 2)


@pytest.mark.parametrize("counts", [False, True], ids=["sum", "count"])
def test_postgresql_digests_see_usage_moved_between_customers_of_one_day(
    pg_dsn_connect: Callable[[], Any], counts: bool
) -> None:
    from dataclasses import replace

    from airflow_provider_stripe_meter.pushdown.dialects import PostgresDialect

    # The ledger billed cus_a 10 in one event and cus_b 5 in two; the source now holds two rows
    # of cus_a (5 in all) and one of cus_b (10): the day's sum (15) and rows (3) are the same,
    # its customers' figures are not.
    template = _ledger_rows()[0]
    rows = [
        replace(template, customer_id=c, seq=seq, value=v, identifier=f"id-{c}-{seq}")
        for c, seq, v in (("cus_a", 1, 10), ("cus_b", 1, 2), ("cus_b", 2, 3))
    ]
    at = (TODAY - 1) * DAY + 3 * HOUR
    usage = [("cus_a", 3, at), ("cus_a", 2, at), ("cus_b", 10, at)]
    _, unchanged, back = _subtract(
        pg_dsn_connect, PostgresDialect(), "%s", counts=counts, ledger_rows=rows, usage=usage
    )
    assert unchanged.groups() == 0
    assert back == [("cus_a", 1), ("cus_b", 1)]
    # The same rows as billed stay.
    same = [("cus_a", 10, at), ("cus_b", 2, at), ("cus_b", 3, at)]
    _, unchanged, back = _subtract(
        pg_dsn_connect, PostgresDialect(), "%s", counts=counts, ledger_rows=rows, usage=same
    )
    assert (unchanged.groups(), back) == (2, [])


def _day_rows(values: list[tuple[str, int]]) -> list[Any]:
    template = _ledger_rows()[0]
    from dataclasses import replace

    return [replace(template, customer_id=c, seq=1, value=v, identifier=f"id-{c}") for c, v in values]


@pytest.mark.parametrize(
    ("billed", "now"),
    [
        # A customer of a day total of 0 the ledger has no event of: the same sum, the same
        # digests of the figures; the customers present differ, so the day comes back.
        ([("cus_a", 10)], [("cus_a", 10), ("cus_z", 0)]),
        # Figures swapped between two customers by a multiple of a large prime: a digest taken
        # modulo that prime would not see it; the exact digest does.
        ([("cus_433", 1_000_000_008), ("cus_167771", 1)], [("cus_433", 1), ("cus_167771", 1_000_000_008)]),
        # Moved by a multiple of the product of two primes near 2^30 (the day's totals over 15
        # digits, reported by the worker).
        (
            [("cus_a", 5), ("cus_b", 3)],
            [("cus_a", 5 + 998_244_359_987_710_471), ("cus_b", 3 - 998_244_359_987_710_471)],
        ),
    ],
    ids=["customer-of-zero", "swap-by-a-prime", "swap-by-two-primes"],
)
def test_postgresql_days_that_differ_only_where_a_modulus_would_hide_it_come_back(
    pg_dsn_connect: Callable[[], Any], billed: list[tuple[str, int]], now: list[tuple[str, int]]
) -> None:
    at = (TODAY - 1) * DAY + 3 * HOUR
    from airflow_provider_stripe_meter.pushdown.dialects import PostgresDialect

    figures, unchanged, _ = _subtract(
        pg_dsn_connect,
        PostgresDialect(),
        "%s",
        ledger_rows=_day_rows(billed),
        usage=[(c, v, at) for c, v in now],
    )
    # Compared a day at a time: the day figures, the ledger's, the groups of the days that differ
    # (and the latest values, looked up for every event name here).
    assert figures.statements == 4
    assert unchanged.groups() == 0
    assert figures.groups == len(now)


def test_postgresql_a_customer_python_refuses_is_checked_whatever_its_total(
    pg_dsn_connect: Callable[[], Any],
) -> None:
    from airflow_provider_stripe_meter.pushdown.dialects import PostgresDialect

    # "user_42" is not a Stripe customer id: the day comes back, Python refuses the id, and the
    # customer-day level decides the rest (cus_a, as billed, stays); the row is reported.
    at = (TODAY - 1) * DAY + 3 * HOUR
    figures, unchanged, back = _subtract(
        pg_dsn_connect,
        PostgresDialect(),
        "%s",
        ledger_rows=_day_rows([("cus_a", 10)]),
        usage=[("cus_a", 10, at), ("user_42", 0, at)],
    )
    assert (unchanged.groups(), back, figures.rows_checked) == (1, [], 1)
