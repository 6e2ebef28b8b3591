"""The ledger subtracted inside the database: only the customer-days that differ come back.

Where the ledger table lives in the database the usage is read from (the operator's default:
``ledger_conn_id`` is ``sql_conn_id``), :func:`diff_query` compares the source's groups
(:func:`~.queries.groups_query`) with what the ledger holds and returns:

* every group the ledger may not hold exactly, as :func:`~.queries.groups_query` returns it;
* per event name and day, the count, sum and rows of the groups it does (kind :data:`UNCHANGED`);
* per event name, the customers all of whose groups it holds (kind :data:`CUSTOMERS`), and the
  same across event names (kind :data:`ALL_CUSTOMERS`), so the result counts customers as before.

A customer-day is left in the database only where the planner would surely leave it alone as
already recorded (:func:`~airflow_provider_stripe_meter.billing.plans.plan_day`): its meter
sums or counts (a ``last`` meter's days all come back); the day is whole (no part of a split
day, in the source or the ledger); the ledger has no row still to be settled for it; and its
live events add up to the source's figure by the meter's formula. Some customers' days all come
back (*tainted*): those with rows the SQL cannot vouch for or rows older than the window kept
apart (Python adds them to a customer-day, or names their day, later), and those the ledger
billed on a day of the run's coverage that the source has no rows of that day any more (the run
corrects them only when it sees the customer). The days of the coverage all come back too.

How the figures are compared depends on the database:

* **per day** (PostgreSQL, a source whose rows the SQL vouches for): before any customer-day is
  grouped, :func:`day_figures_query` folds the source's rows of each (event name, day) into a
  count, a sum, and exact digests (sums, with no modulus, of a 64-bit hash of the customer id,
  ``hashtextextended``, times the row's figure, and of the distinct hashes of the customers
  present); :func:`ledger_day_figures_query` does the same with the ledger's live events. A day
  whose figures and digests are all equal stays in the database whole; only the days that differ
  are grouped per customer and read back (:func:`~.queries.groups_query` with ``skip``). A change
  vanishes from the digests only where the customers' hashes happen to cancel it exactly (odds
  of about one in 2^64). A night with rows the SQL cannot vouch for, a customer id Python
  refuses, or a day of the coverage the ledger billed and the source lost is compared per
  customer-day instead;
* **per customer-day** (SQLite, and those nights): :func:`diff_query` joins each group to the
  ledger's figure of its customer-day.

The values written into the SQL are the package's own (the ledger's account, meter ids and
event names read from Stripe, day numbers, primes), rendered as literals by SQLAlchemy.

.. seealso:: https://www.postgresql.org/docs/current/functions-string.html
.. seealso:: https://docs.sqlalchemy.org/en/20/core/selectable.html#sqlalchemy.sql.expression.union_all
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    and_,
    case,
    cast,
    column,
    func,
    literal,
    null,
    or_,
    select,
    table,
    tuple_,
    union_all,
)
from sqlalchemy.sql.elements import quoted_name

from airflow_provider_stripe_meter.ledger.entries import LIVE, OPEN
from airflow_provider_stripe_meter.pushdown.queries import (
    CHECK,
    GOOD,
    OLD,
    Shape,
    _keys,
    classified,
    groups_query,
)
from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement
    from sqlalchemy.sql.selectable import CTE, CompoundSelect, Select

#: The kinds of the summary rows (beside :data:`~.queries.GOOD` and the others).
UNCHANGED, CUSTOMERS, ALL_CUSTOMERS = 10, 11, 12


@dataclass(frozen=True)
class LedgerSide:
    """The ledger the database subtracts from the source's groups."""

    #: The ledger's table, optionally schema-qualified (checked by the ledger's schema module).
    table: str
    #: The Stripe account the run bills (the ledger's ``account`` column).
    account: str
    #: Per event name of a ``sum`` or ``count`` meter: its meter id, and whether it counts rows.
    meters: Mapping[str, tuple[str, bool]]
    #: UTC day numbers, first and last, whose customer-days all come back (the run's coverage).
    apart: tuple[int, int] | None = None


def diff_query(shape: Shape, side: LedgerSide) -> CompoundSelect:
    """The groups the ledger may not hold exactly, and the summaries of those it does (see the module).

    Every row has the columns of :func:`~.queries.groups_query` (kind, [event name,] customer,
    day, [part,] total, rows, latest); a summary row carries its count in ``latest``.
    """
    fixed, parts = shape.fixed_event, shape.parts
    groups = groups_query(shape).cte("stripe_meter_groups")
    g = groups.c
    meter_of = _meter_of(g, side, fixed)
    tainted = _tainted(shape, side, groups, meter_of).cte("stripe_meter_tainted")
    # NOT IN a short list, hashed once (a join would be planned on the tables' guessed sizes).
    clean = [g.kind == GOOD, ~g.c.in_(select(tainted.c.c).scalar_subquery())]
    source: Any = groups
    if parts:
        clean.append(g.part.is_(None))
    if side.apart is not None:
        clean.append(or_(g.day < side.apart[0], g.day > side.apart[1]))
    held = _held_per_customer_day(shape, side).cte("stripe_meter_ledger_days")
    h = held.c
    on = [h.lc == g.c, h.ld == g.day] + ([] if fixed else [h.m == meter_of])
    source = source.outerjoin(held, and_(*on))
    clean += [h.lx == 0, _formula(side, fixed, g, h.lt, h.le)]
    joined = (
        select(*groups.c, case((and_(*clean), literal(1)), else_=literal(0)).label("same"))
        .select_from(source)
        .cte("stripe_meter_diff")
    )
    return _results(joined, fixed, parts)


def _results(joined: CTE, fixed: bool, parts: bool) -> CompoundSelect:
    """The groups that come back, and the summaries of those that stay (see :func:`diff_query`)."""
    j = joined.c
    by_name = [] if fixed else [j.e]
    blank_part = [null()] if parts else []
    part = [j.part] if parts else []
    changed = select(j.kind, *by_name, j.c, j.day, *part, j.total, j.n, j.latest).where(j.same == 0)
    unchanged = (
        select(
            literal(UNCHANGED),
            *by_name,
            null(),
            j.day,
            *blank_part,
            func.sum(j.total),
            func.sum(j.n),
            func.count(),
        )
        .where(j.same == 1)
        .group_by(*by_name, j.day)
    )
    # Customers all of whose days (of an event name, then of any) stayed here: the worker
    # counts the others from the groups it gets. A tainted customer's days all come back.
    of_name = (
        select(*by_name, j.c)
        .where(j.kind == GOOD)
        .group_by(*by_name, j.c)
        .having(func.min(j.same) == 1)
        .subquery("stripe_meter_customers")
    )
    blanks = [null(), null(), *blank_part, null()]
    statements: list[Any] = [
        changed,
        unchanged,
        select(literal(CUSTOMERS), *([] if fixed else [of_name.c.e]), *blanks, func.count(), null())
        .select_from(of_name)
        .group_by(*([] if fixed else [of_name.c.e])),
    ]
    if not fixed:
        everyone = (
            select(j.c)
            .where(j.kind == GOOD)
            .group_by(j.c)
            .having(func.min(j.same) == 1)
            .subquery("stripe_meter_all_customers")
        )
        statements.append(
            select(literal(ALL_CUSTOMERS), null(), *blanks, func.count(), null()).select_from(everyone)
        )
    return union_all(*statements)


def _meter_of(g: Any, side: LedgerSide, fixed: bool) -> ColumnElement[Any] | None:
    """The meter id of a group's event name (``None`` with a fixed event name: one meter)."""
    if fixed:
        return None
    return case(*((g.e == literal(n), literal(m)) for n, (m, _) in sorted(side.meters.items())))


def _formula(side: LedgerSide, fixed: bool, g: Any, total: Any, count: Any) -> ColumnElement[Any]:
    """True where the ledger's figure (``total``, ``count``) equals the group's by its meter's formula."""
    counted = sorted(n for n, (_, counts) in side.meters.items() if counts)
    summed = sorted(n for n, (_, counts) in side.meters.items() if not counts)
    if fixed:
        return count == g.n if counted else total == g.total
    return or_(
        *([and_(g.e.in_(summed), total == g.total)] if summed else []),
        *([and_(g.e.in_(counted), count == g.n)] if counted else []),
    )


def _ledger_table(side: LedgerSide) -> Any:
    schema, _, name = side.table.rpartition(".")
    # Unquoted, as the ledger writes it: PostgreSQL folds an unquoted name to lower case.
    return table(
        quoted_name(name, False),
        column("account"),
        column("meter_id"),
        column("customer_id"),
        column("day"),
        column("value"),
        column("state"),
        column("part"),
        schema=quoted_name(schema, False) if schema else None,
    )


def _ledger_rows(shape: Shape, side: LedgerSide, name: str, days: tuple[int, int] | None = None) -> Any:
    """The ledger's rows of the run's meters and account inside Stripe's window (or ``days``, day
    numbers, first and last), each with whether it is live, open or a part of a split day.

    A subquery each time it is named, not a common table: PostgreSQL would write millions of
    rows aside for a table named twice.
    """
    t = _ledger_table(side).c
    lo, hi = days if days is not None else (shape.oldest // SECONDS_PER_DAY, shape.newest // SECONDS_PER_DAY)
    first = date.fromordinal(date(1970, 1, 1).toordinal() + lo)
    last = date.fromordinal(date(1970, 1, 1).toordinal() + hi)
    return (
        select(
            t.meter_id.label("m"),
            t.customer_id.label("lc"),
            t.day.label("iso"),
            t.value.label("v"),
            case((t.state.in_([literal(s) for s in LIVE]), literal(1)), else_=literal(0)).label("live"),
            case(
                (or_(t.state.in_([literal(s) for s in OPEN]), t.part != 0), literal(1)), else_=literal(0)
            ).label("x"),
        )
        .where(
            t.account == literal(side.account),
            t.meter_id.in_([literal(m) for m, _ in sorted(side.meters.values())]),
            t.day >= literal(first.isoformat()),
            t.day <= literal(last.isoformat()),
        )
        .subquery(name)
    )


def _held_per_customer_day(shape: Shape, side: LedgerSide) -> Any:
    """Per (meter, customer, day number): the live events' sum and count, and the rows that keep
    the day out of the diff (open ones, parts of a split day)."""
    r = _ledger_rows(shape, side, "stripe_meter_ledger_rows").c
    return select(
        r.m,
        r.lc,
        shape.dialect.iso_day_number(r.iso).label("ld"),
        func.sum(r.live * r.v).label("lt"),
        func.sum(r.live).label("le"),
        func.sum(r.x).label("lx"),
    ).group_by(r.m, r.lc, r.iso)


def _tainted(shape: Shape, side: LedgerSide, groups: CTE, meter_of: Any) -> Any:
    """The customers whose days all come back (see the module); never NULL (``NOT IN`` a list
    holding a NULL is never true)."""
    g = groups.c
    kinds = [CHECK, OLD] if shape.keep_too_old else [CHECK]
    out: Any = select(g.c.label("c")).where(g.kind.in_(kinds), g.c.isnot(None))
    if side.apart is not None:
        lo, hi = side.apart
        r = _ledger_rows(shape, side, "stripe_meter_covered_rows", side.apart).c
        # The source's and the ledger's customer-days of the coverage, side by side and grouped
        # (a grouping, not a join: a planner misled about either side's size would loop).
        meter = [] if meter_of is None else [meter_of.label("m")]
        both = union_all(
            select(g.c.label("c"), g.day.label("day"), *meter, literal(1).label("src")).where(
                g.kind == GOOD, g.day >= lo, g.day <= hi
            ),
            select(
                r.lc, shape.dialect.iso_day_number(r.iso), *([] if meter_of is None else [r.m]), literal(0)
            ).where(r.live == 1),
        ).subquery("stripe_meter_covered")
        keys = [both.c.c, both.c.day] + ([] if meter_of is None else [both.c.m])
        gone = select(both.c.c).group_by(*keys).having(func.max(both.c.src) == 0)
        out = out.union(gone)
    return out


# -- the day figures first (PostgreSQL, a source without problem rows) ---------------------------
#
# Folding a day needs no customer-day grouping: a digest linear in the figures (the sum over rows
# of hash(c) * v is the sum over customers of hash(c) * their day's sum) is folded straight from
# the rows, on both sides; the days are compared in Python, and the groups statement then reads
# only the days that differ: three passes over the rows, none over millions of customer-days.
# The digests are exact (no modulus, :func:`_products`): a change vanishes from them only where the
# customers' 64-bit hashes happen to cancel it, odds of about one in 2^64.

#: ``GROUPING()`` of a day-figures row: a day's (0), an event name's over all days (1), all (3).
PER_DAY, PER_NAME, OVERALL = 0, 1, 3


def day_figures_query(shape: Shape) -> Select[Any]:
    """Per (kind, [event name,] day): rows, sum, split rows, customers and the digests of the
    rows (of the sums, of the counts, of the customers present); per (kind, [event name]) and per
    kind, the distinct customers (``GROUPING SETS``)."""
    d, rows = shape.dialect, classified(shape)
    keys, source = _keys(shape, rows)
    r = rows.c
    part = next((k for k in keys if k.name == "part"), None)
    split = case((part.isnot(None), literal(1)), else_=literal(0)) if part is not None else literal(0)
    hashed = d.fence(
        select(
            r.kind,
            *([] if shape.fixed_event else [r.e]),
            r.c,
            r.v,
            r.day,
            split.label("sp"),
            d.text_hash(r.c, 1).label("h"),
        ).select_from(source)
    ).subquery("stripe_meter_rows_hashed")
    x = hashed.c
    good = x.kind == GOOD
    by_name = [] if shape.fixed_event else [x.e]
    grouping = func.grouping(x.day, *by_name) if by_name else func.grouping(x.day)
    # Per day, per event name, overall (with a fixed event name the last two are one: each set
    # with a distinct count is a sort of every row).
    sets = [tuple_(x.kind, *by_name, x.day), tuple_(x.kind, *by_name)] + ([tuple_(x.kind)] if by_name else [])
    return select(
        x.kind,
        *by_name,
        x.day,
        grouping.label("g"),
        func.count().label("n"),
        func.sum(case((good, x.v), else_=literal(0))).label("st"),
        func.sum(x.sp).label("sp"),
        # Customers told apart by their 64-bit hashes (a sort of integers, not of text).
        func.count(func.distinct(x.h)).label("customers"),
        *(func.sum(case((good, p), else_=literal(0))).label(f"dv{i}") for i, p in enumerate(_products(x))),
        func.sum(case((good, x.h), else_=literal(0))).label("dn"),
        func.sum(func.distinct(x.h)).label("dp"),
    ).group_by(func.grouping_sets(*sets))


def ledger_day_figures_query(shape: Shape, side: LedgerSide) -> Select[Any]:
    """Per (meter, day) of the window: the live events' sum and count, the rows that keep the day
    apart (open, parts of a split day), and the digests of the live events (one hash per row)."""
    d = shape.dialect
    t = _ledger_rows(shape, side, "stripe_meter_ledger_rows").c
    rows = d.fence(select(t.m, t.iso, t.live, t.x, t.v, d.text_hash(t.lc, 1).label("h"))).subquery(
        "stripe_meter_ledger_hashed"
    )
    r = rows.c
    live = r.live == 1
    return select(
        r.m,
        d.iso_day_number(r.iso).label("day"),
        func.sum(r.live * r.v).label("lt"),
        func.sum(r.live).label("le"),
        func.sum(r.x).label("lx"),
        *(func.sum(case((live, p), else_=literal(0))).label(f"dv{i}") for i, p in enumerate(_products(r))),
        func.sum(case((live, r.h), else_=literal(0))).label("dn"),
        func.sum(func.distinct(case((live, r.h), else_=None))).label("dp"),
    ).group_by(r.m, r.iso)


def _products(x: Any) -> list[Any]:
    """The four products whose sums make up the exact digest of each row's hash ``x.h`` times
    its figure ``x.v``.

    The sum of ``h * v`` over millions of rows needs more than 64 bits, and in ``NUMERIC`` it
    costs seconds. Split into 32-bit halves of the hash and 30-bit halves of the figure (two's
    complement: ``x = (x >> k) * 2^k + (x & (2^k - 1))`` whatever its sign), each product fits 64
    bits for figures under 2^60 (a day's holds at most 15 digits), and each sum is PostgreSQL's
    exact ``sum(bigint)``. Equal component sums make equal digests.
    """
    h, figure = x.h, cast(x.v, BigInteger)
    halves_h = (h.op(">>")(literal(32)), h.op("&")(literal(0xFFFFFFFF)))
    halves_v = (figure.op(">>")(literal(30)), figure.op("&")(literal(0x3FFFFFFF)))
    return [a * b for a in halves_h for b in halves_v]


def covered_customers_query(shape: Shape, side: LedgerSide) -> Select[Any]:
    """The (meter, customer, day number)s the ledger billed on the days of the coverage."""
    assert side.apart is not None
    t = _ledger_rows(shape, side, "stripe_meter_covered_rows", side.apart).c
    return select(t.m, t.lc, shape.dialect.iso_day_number(t.iso)).where(t.live == 1).distinct()


@dataclass
class DayFigures:
    """What :func:`day_figures_query` returned, read."""

    #: Per (event name, day number): rows, sum, split rows, customer-days, digests (the four
    #: parts of the sums', the counts', the customers present).
    days: dict[tuple[Any, int], tuple[int, int, int, int, tuple[int, ...]]]
    #: Per event name, the customers of its good rows; and across names.
    customers: dict[Any, int]
    all_customers: int
    #: Rows of a kind the SQL does not vouch for, or kept older than the window, anywhere.
    problem_rows: int


def read_day_figures(rows: Any, shape: Shape, event_name: str | None) -> DayFigures:
    """Read :func:`day_figures_query`'s rows."""
    out = DayFigures({}, {}, 0, 0)
    problems = [CHECK, OLD] if shape.keep_too_old else [CHECK]
    for row in rows:
        kind, rest = int(row[0]), list(row[1:])
        e = event_name if shape.fixed_event else rest.pop(0)
        day, grouping, n, total, split, customers = rest[:6]
        if grouping == OVERALL or (shape.fixed_event and grouping == PER_NAME):
            if kind in problems:
                out.problem_rows += int(n)
            if kind == GOOD:
                out.all_customers = int(customers)
            if grouping == OVERALL and not shape.fixed_event:
                continue
        if kind != GOOD:
            continue
        if grouping == PER_NAME:
            out.customers[e] = int(customers)
        elif grouping == PER_DAY:
            digests = tuple(int(v or 0) for v in rest[6:12])
            out.days[(e, int(day))] = (int(n), int(total or 0), int(split or 0), int(customers), digests)
    return out


def same_days(figures: DayFigures, ledger_rows: Any, side: LedgerSide) -> dict[Any, set[int]]:
    """Per event name, the days outside the coverage whose figures and digests the ledger holds
    exactly (by the meter's formula, with the same customers present) and that hold no open row
    or split part."""
    held: dict[tuple[str, int], tuple[int, int, int, tuple[int, ...]]] = {}
    for m, day, lt, le, lx, *digests in ledger_rows:
        held[(m, int(day))] = (int(lt or 0), int(le or 0), int(lx or 0), tuple(int(v or 0) for v in digests))
    out: dict[Any, set[int]] = {}
    for (e, day), (n, total, split, _, mine) in figures.days.items():
        sv, sn, sp = mine[:4], mine[4], mine[5]
        meter = side.meters.get(e)
        if meter is None or split or (side.apart is not None and side.apart[0] <= day <= side.apart[1]):
            continue
        theirs = held.get((meter[0], day))
        if theirs is None or theirs[2]:
            continue
        lt, le, _, digests = theirs
        lv, ln, lp = digests[:4], digests[4], digests[5]
        # The same customers present (a customer of a zero total too), and the same figures.
        equal = sp == lp and ((le == n and sn == ln) if meter[1] else (lt == total and sv == lv))
        if equal:
            out.setdefault(e, set()).add(day)
    return out
