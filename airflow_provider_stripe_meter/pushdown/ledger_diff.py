"""The ledger subtracted inside the database: only the customer-days that differ come back.

Where the ledger table lives in the database the usage is read from (the operator's default:
``ledger_conn_id`` is ``sql_conn_id``), :func:`diff_query` joins the source's groups
(:func:`~.queries.groups_query`) to the ledger's figure of each customer-day and returns:

* every group the ledger does not hold exactly, as :func:`~.queries.groups_query` returns it;
* per event name and day, the count, sum and rows of the groups it does (kind :data:`UNCHANGED`);
* per event name, the customers all of whose groups it holds (kind :data:`CUSTOMERS`), and the
  same across event names (kind :data:`ALL_CUSTOMERS`), so the result counts customers as before.

A customer-day is left in the database only where the planner would surely leave it alone as
already recorded (:func:`~airflow_provider_stripe_meter.billing.plans.plan_day`): its meter
sums or counts (a ``last`` meter's days all come back); the day is whole (no part of a split
day, in the source or the ledger); the ledger has no row still to be settled for it and at
least one live event; and the live events add up to the source's figure by the meter's formula.
Days of the run's coverage (where a missing row is a correction, found by comparing every
customer-day the ledger billed) all come back, as do rows the SQL cannot vouch for.

The values written into the SQL are the package's own (the ledger's account, meter ids and
event names read from Stripe, day numbers), rendered as literals by SQLAlchemy.

.. seealso:: https://docs.sqlalchemy.org/en/20/core/selectable.html#sqlalchemy.sql.expression.union_all
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, column, func, literal, null, or_, select, table, union_all

from airflow_provider_stripe_meter.ledger.entries import LIVE, OPEN
from airflow_provider_stripe_meter.pushdown.queries import GOOD, Shape, groups_query
from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY

if TYPE_CHECKING:
    from sqlalchemy.sql.selectable import CompoundSelect

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
    """The groups the ledger does not hold exactly, and the summaries of those it does (see the module).

    Every row has the columns of :func:`~.queries.groups_query` (kind, [event name,] customer,
    day, [part,] total, rows, latest); a summary row carries its count in ``latest``.
    """
    fixed, parts = shape.fixed_event, shape.parts
    groups = groups_query(shape).cte("stripe_meter_groups")
    held = _ledger_days(shape, side).cte("stripe_meter_ledger_days")
    g, h = groups.c, held.c
    on = [h.lc == g.c, h.ld == g.day]
    if not fixed:
        meter_of = case(*((g.e == literal(n), literal(m)) for n, (m, _) in sorted(side.meters.items())))
        on.append(h.m == meter_of)
    counted = sorted(n for n, (_, counts) in side.meters.items() if counts)
    summed = sorted(n for n, (_, counts) in side.meters.items() if not counts)
    if fixed:
        match = h.le == g.n if counted else h.lt == g.total
    else:
        match = or_(
            *([and_(g.e.in_(summed), h.lt == g.total)] if summed else []),
            *([and_(g.e.in_(counted), h.le == g.n)] if counted else []),
        )
    same = [g.kind == GOOD, h.lx == 0, h.le > 0, match]
    if parts:
        same.append(g.part.is_(None))
    if side.apart is not None:
        same.append(or_(g.day < side.apart[0], g.day > side.apart[1]))
    joined = (
        select(*groups.c, case((and_(*same), literal(1)), else_=literal(0)).label("same"))
        .select_from(groups.outerjoin(held, and_(*on)))
        .cte("stripe_meter_diff")
    )
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
    # counts the others from the groups it gets.
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


def _ledger_days(shape: Shape, side: LedgerSide) -> Any:
    """Per (meter, customer, day number) of the window: the live events' sum and count, and the
    rows that keep the day out of the diff (open ones, parts of a split day)."""
    schema, _, name = side.table.rpartition(".")
    ledger = table(
        name,
        column("account"),
        column("meter_id"),
        column("customer_id"),
        column("day"),
        column("value"),
        column("state"),
        column("part"),
        schema=schema or None,
    )
    t = ledger.c
    live = t.state.in_([literal(s) for s in LIVE])
    unsettled = t.state.in_([literal(s) for s in OPEN])
    first = date.fromordinal(date(1970, 1, 1).toordinal() + shape.oldest // SECONDS_PER_DAY)
    last = date.fromordinal(date(1970, 1, 1).toordinal() + shape.newest // SECONDS_PER_DAY)
    return (
        select(
            t.meter_id.label("m"),
            t.customer_id.label("lc"),
            shape.dialect.iso_day_number(t.day).label("ld"),
            func.sum(case((live, t.value), else_=literal(0))).label("lt"),
            func.sum(case((live, literal(1)), else_=literal(0))).label("le"),
            func.sum(case((or_(unsettled, t.part != 0), literal(1)), else_=literal(0))).label("lx"),
        )
        .where(
            t.account == literal(side.account),
            t.meter_id.in_([literal(m) for m, _ in sorted(side.meters.values())]),
            t.day >= literal(first.isoformat()),
            t.day <= literal(last.isoformat()),
        )
        .group_by(t.meter_id, t.customer_id, t.day)
    )
