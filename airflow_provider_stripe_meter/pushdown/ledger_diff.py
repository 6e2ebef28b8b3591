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

* **per day** (PostgreSQL): each (meter, day) of the ledger is folded into its count, its sum,
  and two digests, sums modulo a prime of a 64-bit hash of the customer id (``hashtextextended``)
  times the customer's figure; the source's groups of a day are folded the same way. Equal
  digests mean every customer's figure is equal but with odds of about one in 10^18 per day that
  changed, so a day whose digests are equal is left in the database whole, and a day that
  differs comes back whole. Folding a day costs one pass over its rows, not a join of millions
  of customer-days (docs/benchmarks.md);
* **per customer-day** (SQLite, which has no hash function of its own): each group is joined to
  the ledger's figure of its customer-day.

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
    union_all,
)
from sqlalchemy.sql.elements import quoted_name

from airflow_provider_stripe_meter.ledger.entries import LIVE, OPEN
from airflow_provider_stripe_meter.pushdown.queries import CHECK, GOOD, OLD, Shape, groups_query
from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement
    from sqlalchemy.sql.selectable import CTE, CompoundSelect

#: The kinds of the summary rows (beside :data:`~.queries.GOOD` and the others).
UNCHANGED, CUSTOMERS, ALL_CUSTOMERS = 10, 11, 12
#: The digests' moduli: two primes near 2^30, so a hash's part times a figure (each reduced
#: modulo the prime) fits a 64-bit integer, and a day's sum of millions of them too.
DIGESTS = (1_000_000_007, 998_244_353)


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
    if shape.dialect.hashes_text:
        same_days = _same_days(shape, side, groups, tainted, meter_of).cte("stripe_meter_same_days")
        s = same_days.c
        on = [s.day == g.day] + ([] if fixed else [s.e == g.e])
        source = source.outerjoin(same_days, and_(*on))
        clean.append(s.day.isnot(None))
    else:
        held = _held_per_customer_day(shape, side).cte("stripe_meter_ledger_days")
        h = held.c
        on = [h.lc == g.c, h.ld == g.day] + ([] if fixed else [h.m == meter_of])
        source = source.outerjoin(held, and_(*on))
        clean += [h.lx == 0, _formula(side, fixed, g, lambda n: (h.lt, h.le))]
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


def _formula(side: LedgerSide, fixed: bool, g: Any, figures: Any) -> ColumnElement[Any]:
    """True where the ledger's figure (sum, count) equals the group's by its meter's formula."""
    total, count = figures(None)
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


def _same_days(shape: Shape, side: LedgerSide, groups: CTE, tainted: CTE, meter_of: Any) -> Any:
    """The (event name, day)s whose untainted customers' figures the ledger holds exactly, by the
    count, the sum and the digests of each side (see the module)."""
    d, g = shape.dialect, groups.c
    fixed = shape.fixed_event
    counted = sorted(n for n, (_, counts) in side.meters.items() if counts)
    summed = sorted(n for n in side.meters if n not in counted)
    # The digests each formula needs: of the sums, of the counts (a fixed event name: one).
    kinds = [k for k, names in (("v", summed), ("n", counted)) if names]
    untainted = select(tainted.c.c).scalar_subquery()

    # One hash per row, in a fenced subquery (PostgreSQL would otherwise compute it per digest).
    t = _ledger_rows(shape, side, "stripe_meter_ledger_rows").c
    rows = d.fence(
        select(t.m, t.iso, t.live, t.x, t.v, d.text_hash(t.lc, 1).label("h")).where(~t.lc.in_(untainted))
    ).subquery("stripe_meter_ledger_hashed")
    r = rows.c
    ledger_days = (
        select(
            r.m,
            r.iso,
            func.sum(r.live * r.v).label("lt"),
            func.sum(r.live).label("le"),
            func.sum(r.x).label("lx"),
            *(
                func.sum(r.live * _term(r.h, r.v if k == "v" else literal(1), i)).label(f"l{k}{i}")
                for k in kinds
                for i in range(len(DIGESTS))
            ),
        )
        .group_by(r.m, r.iso)
        .subquery("stripe_meter_ledger_day_digests")
    )
    split = case((g.part.isnot(None), literal(1)), else_=literal(0)) if shape.parts else literal(0)
    by_name = [] if fixed else [g.e]
    meter = [] if meter_of is None else [meter_of.label("m")]
    hashed = d.fence(
        select(
            *by_name, *meter, g.day, g.total, g.n, split.label("sp"), d.text_hash(g.c, 1).label("h")
        ).where(g.kind == GOOD, ~g.c.in_(untainted))
    ).subquery("stripe_meter_groups_hashed")
    h = hashed.c
    source_days = (
        select(
            *([] if fixed else [h.e]),
            *([] if meter_of is None else [h.m]),
            h.day,
            func.sum(h.total).label("st"),
            func.sum(h.n).label("sn"),
            func.sum(h.sp).label("sp"),
            *(
                func.sum(_term(h.h, h.total if k == "v" else h.n, i)).label(f"s{k}{i}")
                for k in kinds
                for i in range(len(DIGESTS))
            ),
        )
        .group_by(*([] if fixed else [h.e]), *([] if meter_of is None else [h.m]), h.day)
        .subquery("stripe_meter_source_day_digests")
    )
    sd, ld = source_days.c, ledger_days.c
    on = [d.iso_day_number(ld.iso) == sd.day] + ([] if fixed else [ld.m == sd.m])

    def digests(k: str) -> list[Any]:
        return [_mod(sd[f"s{k}{i}"], p) == _mod(ld[f"l{k}{i}"], p) for i, p in enumerate(DIGESTS)]

    by_sum = and_(ld.lt == sd.st, *digests("v")) if summed else None
    by_count = and_(ld.le == sd.sn, *digests("n")) if counted else None
    if fixed:
        match = by_count if counted else by_sum
    else:
        match = or_(
            *([and_(sd.e.in_(summed), by_sum)] if summed else []),
            *([and_(sd.e.in_(counted), by_count)] if counted else []),
        )
    return (
        select(*([] if fixed else [sd.e]), sd.day)
        .select_from(source_days.join(ledger_days, and_(*on)))
        .where(ld.lx == 0, sd.sp == 0, match)
    )


def _term(h: Any, figure: Any, i: int) -> Any:
    """A customer's share of digest ``i``: its hash's part times its figure, modulo the prime.

    Digest 0 takes the hash's value modulo its prime, digest 1 its upper 32 bits (two nearly
    independent draws from one 64-bit hash); each factor is brought into ``[0, p)`` first, so
    their product fits 64 bits.
    """
    prime = DIGESTS[i]
    part = h if i == 0 else h.op("/")(literal(2**32))
    return _mod(_mod(part, prime) * cast(_mod(figure, prime), BigInteger), prime)


def _mod(x: Any, prime: int) -> Any:
    """``x`` modulo ``prime`` in ``[0, prime)`` (SQL's ``%`` keeps the sign of ``x``)."""
    return func.mod(func.mod(x, literal(prime)) + literal(prime), literal(prime))
