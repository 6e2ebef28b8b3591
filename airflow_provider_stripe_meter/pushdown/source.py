"""Aggregate the team's query inside its database: only per-customer-day figures reach the worker.

:func:`aggregate_in_database` runs the statements of :mod:`.queries` on one DB-API connection
and feeds what they return into a :class:`~airflow_provider_stripe_meter.utils.aggregation.
UsageAggregator`, the same one the streaming path feeds row by row, so both paths fold, check
day totals and report problems in one place:

1. the query's columns are read (a statement that returns no row); a type the SQL is not
   generated for raises :class:`Unsupported` before anything else runs;
2. where days split at billing period boundaries, their parts go to a temporary table;
3. one statement sums every customer-day (part) the SQL vouches for and counts the rest;
4. for meters that bill the ``last`` value, one more finds each group's latest value;
5. only when some rows were not vouched for, or fell outside Stripe's window, one more returns
   those Python must check (every row the SQL could not vouch for, and the first few of the
   others, for the samples), numbered by their position in the query's result.

A customer id or event name the SQL let through but Python refuses (non-ASCII whitespace)
raises :class:`Unsupported` too: the caller then reads the query row by row, which reports it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.pushdown import Unsupported
from airflow_provider_stripe_meter.pushdown.dialects import ColumnTypes
from airflow_provider_stripe_meter.pushdown.ledger_diff import (
    ALL_CUSTOMERS,
    CUSTOMERS,
    UNCHANGED,
    LedgerSide,
    covered_customers_query,
    day_figures_query,
    diff_query,
    ledger_day_figures_query,
    read_day_figures,
    same_days,
)
from airflow_provider_stripe_meter.pushdown.queries import (
    CHECK,
    FUTURE,
    GOOD,
    OLD,
    PARTS,
    REFUSED,
    Shape,
    groups_query,
    latest_values_query,
    probe_sql,
    render,
    render_own,
    rows_query,
)
from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY
from airflow_provider_stripe_meter.utils.rules import (
    MeterEventInputError,
    validate_customer_id,
    validate_event_name,
)
from airflow_provider_stripe_meter.utils.unchanged import Unchanged

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.pushdown.dialects import SqlDialect
    from airflow_provider_stripe_meter.utils.aggregation import UsageAggregator

#: Rows fetched at a time from the statements' results.
FETCH = 10_000
#: Rows inserted per statement into the table of split days' parts.
INSERT_BATCH = 500
#: Day number 0 of the statements' days.
EPOCH = date(1970, 1, 1)
#: Problem kinds by the statements' ``kind``, as the result names them.
PROBLEM = {OLD: "skipped_too_old", FUTURE: "skipped_future"}


@dataclass
class DatabaseFigures:
    """What the database did for the run: statements, rows handed back, seconds."""

    statements: int = 0
    #: Rows Python checked itself (not vouched for by the SQL, or sampled problems).
    rows_checked: int = 0
    #: Groups (customer-day parts) the database returned.
    groups: int = 0
    #: Parts of split days sent to the temporary table.
    parts: int = 0
    #: Customer-days the ledger in the same database already holds (not handed back).
    unchanged: int | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe, for the result."""
        return {
            "statements": self.statements,
            "rows_checked": self.rows_checked,
            "groups": self.groups,
            "parts": self.parts,
            **({"unchanged": self.unchanged} if self.unchanged is not None else {}),
            "seconds": round(self.seconds, 3),
        }


def aggregate_in_database(
    conn: Any,
    dialect: SqlDialect,
    sql: str,
    parameters: Any,
    aggregator: UsageAggregator,
    *,
    placeholder: str = "?",
    needs_last: Callable[[set[str]], set[str]] | None = None,
    cursor: Callable[[Any], Any] | None = None,
    ledger: Callable[[], LedgerSide | None] | None = None,
) -> DatabaseFigures:
    """Aggregate ``sql`` in the database behind ``conn`` into ``aggregator`` (see the module).

    :param placeholder: The driver's parameter marker (the temporary table's inserts).
    :param needs_last: Of the event names found, those billed by a ``last`` meter (``None``:
        all): only their groups' latest values are looked up.
    :param cursor: Opens the cursor results are streamed through (default ``conn.cursor()``).
    :param ledger: The ledger in this same database (asked only where the dialect subtracts it,
        :mod:`.ledger_diff`): only the customer-days it does not hold exactly come back; the
        others are counted in ``aggregator.unchanged``.
    :raises Unsupported: the query's columns, or a customer or event name, call for the
        streaming path; nothing was added to ``aggregator`` that it would not add.
    """
    started = time.monotonic()
    figures = DatabaseFigures()
    fixed = aggregator.event_name is not None
    # One cursor for the statements (DuckDB's cursors are connections of their own, and a
    # temporary table is seen by its own connection only); a streaming one, where given, reads.
    with closing(conn.cursor()) as cur:
        dialect.prepare(cur)
        types = _column_types(cur, sql, parameters, len(aggregator.columns))
        dialect.check(types, fixed_event=fixed)
        parts = _parts(aggregator, fixed)
        if parts and not dialect.temp_tables:
            raise Unsupported(
                f"{len(parts)} parts of days split at billing period boundaries need a temporary "
                f"table, which is not generated for {dialect.name}"
            )
        shape = Shape(
            dialect, types, fixed, aggregator.oldest, aggregator.newest, aggregator.keep_too_old, bool(parts)
        )
        side = ledger() if ledger is not None and dialect.ledger_diff else None
        if parts:
            figures.parts = _fill_parts(cur, shape, parts, placeholder)
            figures.statements += 1
        try:
            _aggregate(
                cur, conn, shape, sql, parameters, aggregator, figures, needs_last, cursor, placeholder, side
            )
        finally:
            if parts:
                # A connection may outlive the run (a pool): its temporary table goes with the run.
                cur.execute(f"DROP TABLE IF EXISTS {PARTS}")
    figures.seconds = time.monotonic() - started
    return figures


def _aggregate(
    shared: Any,
    conn: Any,
    shape: Shape,
    sql: str,
    parameters: Any,
    aggregator: UsageAggregator,
    figures: DatabaseFigures,
    needs_last: Callable[[set[str]], set[str]] | None,
    cursor: Callable[[Any], Any] | None,
    placeholder: str,
    side: LedgerSide | None,
) -> None:
    """The statements of a run, their results fed to ``aggregator``."""

    def run(statement: Any, *, own: bool = False) -> Iterator[Sequence[Any]]:
        """Run a statement over the team's query (``own``: one of the ledger's alone)."""
        figures.statements += 1
        text = render_own(statement, shape) if own else render(statement, shape, sql)
        cur = cursor(conn) if cursor is not None else shared
        try:
            if parameters and not own:
                cur.execute(text, parameters)
            else:
                cur.execute(text)
            while chunk := cur.fetchmany(FETCH):
                yield from chunk
        finally:
            if cur is not shared:
                cur.close()

    keep = aggregator.keep_too_old
    refused = _Refused()
    unchanged = Unchanged() if side is not None else None
    by_day = None
    if side is not None and shape.dialect.hashes_text:
        by_day = _by_day(run, shape, side, aggregator.event_name, keep)
    if by_day is not None:
        groups, counts, unchanged = by_day
    else:
        first = diff_query(shape, side) if side is not None else groups_query(shape)
        groups, counts = _read_groups(
            run(first), shape, aggregator.event_name, keep, refused, unchanged, side
        )
    if refused and not shape.dialect.temp_tables:
        # Their rows are checked one by one through a temporary table (before anything is added).
        raise Unsupported(
            f"customer ids or event names Python refuses need a temporary table to be checked row by "
            f"row, which is not generated for {shape.dialect.name}"
        )
    figures.groups = len(groups)
    names = {g[1] for g in groups}
    wanted = names if needs_last is None else needs_last(names)
    if wanted and groups:
        latest = _latest_values(run(latest_values_query(shape)), shape, aggregator.event_name)
        # Every kept group has its latest value: a missing one is a defect, not a zero.
        groups = [(*g[:8], latest[g[:5]] if g[1] in wanted else 0) for g in groups]
    aggregator.add_groups(g[1:] for g in groups if g[0] == GOOD)
    aggregator.add_too_old_groups((g[1], g[2], g[3], g[5], g[6], g[7], g[8]) for g in groups if g[0] == OLD)
    aggregator.rows += sum(counts.values()) + sum(g[7] for g in groups)
    if unchanged is not None:
        aggregator.rows += unchanged.rows
        aggregator.unchanged = unchanged
        figures.unchanged = unchanged.groups()
    if counts.get(CHECK) or counts.get(FUTURE) or (counts.get(OLD) and not keep):
        if refused:
            figures.statements += _fill_refused(shared, shape.dialect.name == "sqlite", refused, placeholder)
        try:
            handed = _check_rows(
                run(rows_query(shape, aggregator.problems.limit, refused=bool(refused))), aggregator
            )
        finally:
            if refused:
                shared.execute(f"DROP TABLE IF EXISTS {REFUSED}")
        figures.rows_checked = sum(handed.values())
        for kind, problem in PROBLEM.items():
            # Counted here, beyond the sampled ones Python saw.
            rest = counts.get(kind, 0) - handed.get(kind, 0)
            if rest > 0:
                aggregator.problems.counts[problem] += rest


def _by_day(
    run: Callable[..., Iterator[Sequence[Any]]],
    shape: Shape,
    side: LedgerSide,
    event_name: str | None,
    keep: bool,
) -> tuple[list[Group], dict[int, int], Unchanged] | None:
    """The groups of the days the ledger does not hold exactly, the days compared a day at a
    time from the rows (:func:`.ledger_diff.day_figures_query`); ``None`` where the customer-level
    statement must decide (:func:`.ledger_diff.diff_query`): rows the SQL cannot vouch for, or
    kept from before the window (their customers' days all come back), a customer or event name
    Python refuses, or a customer-day of the coverage the ledger billed and the source lost."""
    day_figures = read_day_figures(run(day_figures_query(shape)), shape, event_name)
    if day_figures.problem_rows:
        return None
    same = same_days(day_figures, list(run(ledger_day_figures_query(shape, side), own=True)), side)
    skip = {(None if shape.fixed_event else e): sorted(days) for e, days in same.items()}
    refused = _Refused()
    groups, counts = _read_groups(run(groups_query(shape, skip)), shape, event_name, keep, refused)
    if refused:
        return None
    if side.apart is not None:
        lo, hi = side.apart
        seen = {(side.meters[g[1]][0], g[2], g[3]) for g in groups if g[0] == GOOD and g[1] in side.meters}
        billed = run(covered_customers_query(shape, side), own=True)
        if any((m, c, int(day)) not in seen for m, c, day in billed if lo <= int(day) <= hi):
            return None
    unchanged = Unchanged()
    for e, days in same.items():
        counts_rows = side.meters[e][1]
        for day in sorted(days):
            n, total, _, customer_days, _ = day_figures.days[(e, day)]
            unchanged.add_days(e, EPOCH + timedelta(days=day), customer_days, n if counts_rows else total, n)
    # The customers all of whose days stayed in the database: those of the source's good rows
    # the groups read back do not name.
    back: dict[Any, set[Any]] = {}
    for g in groups:
        if g[0] == GOOD:
            back.setdefault(g[1], set()).add(g[2])
    for e, customers in day_figures.customers.items():
        unchanged.customers[e] = customers - len(back.get(e, ()))
    unchanged.all_customers = day_figures.all_customers - len(set().union(*back.values()) if back else set())
    return groups, counts, unchanged


#: A group as read: (kind, event name, customer, day number, part or None, sum, latest, rows, last).
Group = tuple[int, str, str, int, "int | None", int, int, int, int]


@dataclass
class _Refused:
    """The customers and event names of the groups Python refused (their rows are checked one by one)."""

    customers: set[Any] = field(default_factory=set)
    events: set[Any] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.customers or self.events)


def _read_groups(
    rows: Iterable[Sequence[Any]],
    shape: Shape,
    event_name: str | None,
    keep: bool,
    refused: _Refused,
    unchanged: Unchanged | None = None,
    side: LedgerSide | None = None,
) -> tuple[list[Group], dict[int, int]]:
    """The kept groups, and per kind the rows only counted here (``CHECK`` ones include those of
    a customer or event name Python refuses, noted in ``refused``); the summaries of the groups
    the ledger holds (:mod:`.ledger_diff`) go to ``unchanged``."""
    groups: list[Group] = []
    counts: dict[int, int] = {}
    good: dict[Any, bool] = {}

    def fine(value: Any, check: Callable[[Any], Any], into: set[Any]) -> bool:
        ok = good.get(value)
        if ok is None:
            try:
                check(value)
                ok = True
            except MeterEventInputError:
                ok = False
            good[value] = ok
        if not ok:
            into.add(value)
        return ok

    for row in rows:
        kind, rest = int(row[0]), list(row[1:])
        e = event_name if shape.fixed_event else rest.pop(0)
        c, day = rest[0], rest[1]
        part = rest[2] if shape.parts else None
        total, n, latest = rest[-3], rest[-2], rest[-1]
        if kind >= UNCHANGED:
            assert unchanged is not None
            assert side is not None
            _summary(unchanged, side, kind, e, day, total, n, latest, fixed=shape.fixed_event)
            continue
        n = int(n)
        if kind != CHECK and not (
            fine(("c", c), lambda v: validate_customer_id(v[1]), refused.customers)
            & (shape.fixed_event or fine(("e", e), lambda v: validate_event_name(v[1]), refused.events))
        ):
            kind = CHECK
        if kind == GOOD or (kind == OLD and keep):
            groups.append(
                (kind, e, c, int(day), None if part is None else int(part), int(total), int(latest), n, 0)  # type: ignore[arg-type]
            )
        else:
            counts[kind] = counts.get(kind, 0) + n
    refused.customers = {v for _, v in refused.customers}
    refused.events = {v for _, v in refused.events}
    return groups, counts


def _summary(
    unchanged: Unchanged,
    side: LedgerSide,
    kind: int,
    e: Any,
    day: Any,
    total: Any,
    n: Any,
    count: Any,
    *,
    fixed: bool,
) -> None:
    """One summary row of :func:`.ledger_diff.diff_query` into ``unchanged``."""
    if kind == UNCHANGED:
        # The source's figure of a count meter's day is its rows; of a sum meter's, its sum.
        value = int(n) if side.meters[e][1] else int(total)
        unchanged.add_days(e, EPOCH + timedelta(days=int(day)), int(count), value, int(n))
    elif kind == CUSTOMERS:
        unchanged.customers[e] = int(n)
        if fixed:
            unchanged.all_customers = int(n)
    elif kind == ALL_CUSTOMERS:
        unchanged.all_customers = int(n)


def _fill_refused(cur: Any, untyped: bool, refused: _Refused, placeholder: str) -> int:
    """Create the temporary table of refused customers and event names; the statements run."""
    # No declared type: SQLite compares the values as the query returns them (an integer id
    # stays an integer); elsewhere the columns are text already.
    cur.execute(f"CREATE TEMPORARY TABLE {REFUSED} (what VARCHAR(1), v {'' if untyped else 'VARCHAR'})")
    values = [("c", c) for c in refused.customers] + [("e", e) for e in refused.events]
    marks = f"({placeholder}, {placeholder})"
    for i in range(0, len(values), INSERT_BATCH):
        batch = values[i : i + INSERT_BATCH]
        cur.execute(
            f"INSERT INTO {REFUSED} VALUES " + ", ".join([marks] * len(batch)), [x for r in batch for x in r]
        )
    return 1 + -(-len(values) // INSERT_BATCH)


def _latest_values(
    rows: Iterable[Sequence[Any]], shape: Shape, event_name: str | None
) -> dict[tuple[Any, ...], int]:
    out: dict[tuple[Any, ...], int] = {}
    for row in rows:
        kind, rest = int(row[0]), list(row[1:])
        e = event_name if shape.fixed_event else rest.pop(0)
        part = rest[2] if shape.parts else None
        out[(kind, e, rest[0], int(rest[1]), None if part is None else int(part))] = int(rest[-1])
    return out


def _check_rows(rows: Iterable[Sequence[Any]], aggregator: UsageAggregator) -> dict[int, int]:
    """Feed the handed-back rows to Python's checks in source order; count them per kind."""
    handed: dict[int, int] = {}

    def numbered() -> Iterator[tuple[int, tuple[Any, ...]]]:
        for row in rows:
            kind = int(row[1])
            handed[kind] = handed.get(kind, 0) + 1
            yield int(row[0]), tuple(row[2:])

    aggregator.add_numbered(numbered())
    return handed


def _column_types(cur: Any, sql: str, parameters: Any, needed: int) -> ColumnTypes:
    """The names and type codes of the query's first ``needed`` columns, from a statement with no row."""
    if parameters:
        cur.execute(probe_sql(sql), parameters)
    else:
        cur.execute(probe_sql(sql))
    description = cur.description or ()
    cur.fetchall()
    if len(description) < needed:
        raise Unsupported(f"the query returns {len(description)} columns, {needed} are needed")
    names = tuple(str(d[0]) for d in description[:needed])
    if len(set(names)) != needed or any(not name for name in names):
        raise Unsupported(f"the query's columns need distinct names to be read in SQL, got {list(names)}")
    return ColumnTypes(
        names,
        tuple(d[1] for d in description[:needed]),
        tuple(d[5] if len(d) > 5 else None for d in description[:needed]),
    )


def _parts(aggregator: UsageAggregator, fixed: bool) -> list[tuple[Any, ...]]:
    """The slices of every day split at a billing period boundary inside the window:
    (customer, start, end[, event name]), cut as the aggregator cuts rows into parts.

    The aggregator's own choice of the customers split on each day (:meth:`~UsageAggregator.
    split_customers`: a boundary of any of the customer's meters inside the day), then the
    event name's own boundaries inside that day: none, and the day is whole.
    """
    split: Mapping[tuple[str, str], Sequence[int]] = aggregator.split_bounds
    if not split:
        return []
    names: dict[str, list[str]] = {}
    for event_name, customer in split:
        if not fixed or event_name == aggregator.event_name:
            names.setdefault(customer, []).append(event_name)
    lo, hi = aggregator.split_window
    out: list[tuple[Any, ...]] = []
    for day in range(lo // SECONDS_PER_DAY, hi // SECONDS_PER_DAY + 1):
        start = day * SECONDS_PER_DAY
        for customer in aggregator.split_customers(day):
            for event_name in names.get(customer, ()):
                bounds = split.get((event_name, customer), ())
                inside = [b for b in bounds if start < b < start + SECONDS_PER_DAY]
                if not inside:
                    continue
                for a, b in itertools.pairwise([start, *inside, start + SECONDS_PER_DAY]):
                    out.append((customer, a, b) if fixed else (customer, a, b, event_name))
    return out


def _fill_parts(cur: Any, shape: Shape, parts: list[tuple[Any, ...]], placeholder: str) -> int:
    """Create the temporary table of split days' parts and insert them (bound parameters)."""
    columns = "c VARCHAR, lo BIGINT, hi BIGINT" + ("" if shape.fixed_event else ", e VARCHAR")
    width = 3 if shape.fixed_event else 4
    marks = "(" + ", ".join([placeholder] * width) + ")"
    cur.execute(f"CREATE TEMPORARY TABLE {PARTS} ({columns})")
    for i in range(0, len(parts), INSERT_BATCH):
        batch = parts[i : i + INSERT_BATCH]
        cur.execute(
            f"INSERT INTO {PARTS} VALUES " + ", ".join([marks] * len(batch)),
            [value for row in batch for value in row],
        )
    return len(parts)
