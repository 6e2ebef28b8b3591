"""The SQL an aggregation pushed into the database runs, built with SQLAlchemy Core per dialect.

Three statements over the team's query (spliced in as a subquery, its text and parameters
untouched), each row first classified by :func:`classified` as ``kind``:

* ``GOOD`` (0): a row the SQL vouches for (:mod:`.dialects`) inside Stripe's window;
* ``CHECK`` (1): a row the SQL cannot vouch for: handed back to Python, which checks it;
* ``OLD`` (2) / ``FUTURE`` (3): vouched for, but older than the window or too far ahead.

:func:`groups_query` sums per (kind, event name, customer, UTC day, part of a split day) and
counts the rest per kind: the only statement of a clean night. :func:`latest_values_query`
finds each group's latest row's value (for ``last`` meters, only when one is billed).
:func:`rows_query` returns the ``CHECK`` rows and the first few ``OLD``/``FUTURE`` ones, with
their position in the source, for Python's checks and samples. Every value in the SQL is an
integer the package computed (window bounds, a limit), rendered by SQLAlchemy; the customer ids of
split days travel in a temporary table, inserted with bound parameters.

.. seealso:: https://docs.sqlalchemy.org/en/20/core/selectable.html#sqlalchemy.sql.expression.Select.cte
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, column, func, literal, not_, or_, select, table
from sqlalchemy.sql.elements import quoted_name

from airflow_provider_stripe_meter.pushdown import Unsupported

if TYPE_CHECKING:
    from sqlalchemy.sql.selectable import CTE, Select, TableClause

    from airflow_provider_stripe_meter.pushdown.dialects import ColumnTypes, SqlDialect

GOOD, CHECK, OLD, FUTURE = 0, 1, 2, 3
#: The name the team's query goes by inside the generated SQL.
SOURCE = "stripe_meter_source"
#: The temporary table of the parts of split days (customer, [event name,] start, end).
PARTS = "stripe_meter_parts"
#: The temporary table of the customers (``what`` = "c") and event names ("e") Python refused.
REFUSED = "stripe_meter_refused"


@dataclass(frozen=True)
class Shape:
    """What the generated SQL is about: the query's columns, the window, what is kept."""

    dialect: SqlDialect
    types: ColumnTypes
    #: ``True``: every row is of one event name (the operator's ``event_name``), not a column.
    fixed_event: bool
    oldest: int
    newest: int
    #: Rows older than the window are aggregated apart (``too_old="bill_at_oldest"``).
    keep_too_old: bool
    #: Split days' parts are joined from :data:`PARTS`.
    parts: bool


def source_table(shape: Shape) -> TableClause:
    """The team's query as a table of its own columns (spliced in by :func:`render`), each named
    as the cursor named it, quoted: Snowflake folds an unquoted name to upper case."""
    return table(SOURCE, *(column(quoted_name(name, True)) for name in shape.types.names))


def classified(shape: Shape, *, refused: bool = False) -> CTE:
    """Per row: customer, value, timestamp as read, event name, whole unix seconds, ``kind``.

    ``refused``: rows of the customers and event names in :data:`REFUSED` (Python refused them
    in the groups) are ``CHECK`` rows too.
    """
    d, codes, src = shape.dialect, shape.types.codes, source_table(shape)
    names = shape.types.names
    c, v, t = d.binary(src.c[names[0]]), src.c[names[1]], src.c[names[2]]
    e = None if shape.fixed_event else d.binary(src.c[names[3]])
    secs = d.seconds(t, codes[2])
    checks = [d.is_text(c, codes[0]), d.whole(v, codes[1])]
    if e is not None:
        checks.append(d.is_text(e, codes[3]))
    if refused:
        gone = table(REFUSED, column("what"), column("v"))
        checks.append(c.notin_(select(gone.c.v).where(gone.c.what == literal("c")).scalar_subquery()))
        if e is not None:
            checks.append(e.notin_(select(gone.c.v).where(gone.c.what == literal("e")).scalar_subquery()))
    # One pass computes the seconds; the next classifies on them (each written once).
    first = d.fence(
        select(
            c.label("c"),
            v.label("v"),
            t.label("t"),
            *([e.label("e")] if e is not None else []),
            secs.label("secs"),
            and_(*checks).label("ok"),
        )
    ).cte("stripe_meter_read")
    kind = case(
        (or_(not_(first.c.ok), first.c.secs.is_(None)), literal(CHECK)),
        (first.c.secs < shape.oldest, literal(OLD)),
        (first.c.secs > shape.newest, literal(FUTURE)),
        else_=literal(GOOD),
    )
    day = d.day_number(first.c.secs)
    return d.fence(select(*first.c, kind.label("kind"), day.label("day"))).cte("stripe_meter_rows")


def _kept(shape: Shape, rows: CTE) -> Any:
    """Rows summed into groups: good ones, and old ones when kept apart."""
    if shape.keep_too_old:
        return rows.c.kind.in_([GOOD, OLD])
    return rows.c.kind == GOOD


def _parts_table(shape: Shape) -> TableClause:
    cols: list[Any] = [column("c"), column("lo"), column("hi")]
    if not shape.fixed_event:
        cols.append(column("e"))
    return table(PARTS, *cols)


def _keys(shape: Shape, rows: CTE) -> tuple[list[Any], Any]:
    """The group keys (kind, [event name,] customer, day, part start) and the FROM clause.

    Plain columns, the same for every kind: grouping on expressions would cost the database
    more than the few extra groups of problem rows it returns (Python checks each customer and
    event name once, and counts the rows of one it refuses as invalid).
    """
    keys = [rows.c.kind]
    if not shape.fixed_event:
        keys.append(rows.c.e)
    keys += [rows.c.c, rows.c.day]
    source: Any = rows
    if shape.parts:
        parts = _parts_table(shape)
        on = [parts.c.c == rows.c.c, rows.c.secs >= parts.c.lo, rows.c.secs < parts.c.hi, rows.c.kind == GOOD]
        if not shape.fixed_event:
            on.append(parts.c.e == rows.c.e)
        source = rows.outerjoin(parts, and_(*on))
        keys.append(parts.c.lo.label("part"))
    return keys, source


def groups_query(shape: Shape, skip: Mapping[str | None, Sequence[int]] | None = None) -> Select[Any]:
    """Per kind and, for kept rows, per customer-day (part): sum, rows, latest second.

    ``skip``: per event name (``None`` with a fixed one), UTC day numbers whose good rows are
    left out (the ledger holds those days exactly: :mod:`.ledger_diff`).
    """
    rows = classified(shape)
    keys, source = _keys(shape, rows)
    # The sum of a CHECK group is not read (its rows are checked one by one).
    statement = (
        select(
            *keys,
            func.sum(rows.c.v).label("total"),
            func.count().label("n"),
            func.max(rows.c.secs).label("latest"),
        )
        .select_from(source)
        .group_by(*keys)
    )
    left = []
    for name, days in sorted((skip or {}).items(), key=lambda item: str(item[0])):
        if days:
            named = [] if name is None else [rows.c.e == literal(name)]
            left.append(and_(*named, rows.c.day.in_([literal(d) for d in sorted(days)])))
    if left:
        statement = statement.where(not_(and_(rows.c.kind == literal(GOOD), or_(*left))))
    return statement


def latest_values_query(shape: Shape) -> Select[Any]:
    """Per kept group, the greatest value among the rows of its latest second (``last``).

    Every group's (of an event-name column, the caller keeps those of ``last`` meters): the
    names would otherwise be values written into the SQL.
    """
    rows = classified(shape)
    keys, source = _keys(shape, rows)
    kept = _kept(shape, rows)
    where = [kept]
    latest = (
        select(*keys, func.max(rows.c.secs).label("latest")).select_from(source).where(*where).group_by(*keys)
    )
    groups = latest.cte("stripe_meter_latest")
    # The join back: a row of the group in its latest second (NULL parts compared as -1).
    match = [groups.c[key.name] == key for key in keys if key.name != "part"]
    match.append(groups.c.latest == rows.c.secs)
    if shape.parts:
        part = next(key for key in keys if key.name == "part")
        match.append(func.coalesce(groups.c.part, -1) == func.coalesce(part, -1))
    out_keys = [groups.c[key.name] for key in keys]
    return (
        select(*out_keys, func.max(rows.c.v).label("last"))
        .select_from(source.join(groups, and_(*match)))
        .where(*where)
        .group_by(*out_keys)
    )


def rows_query(shape: Shape, sample_limit: int, *, refused: bool) -> Select[Any]:
    """The rows Python checks: every ``CHECK`` row (with ``refused``, those of the customers and
    event names in :data:`REFUSED` too), and the first ``sample_limit`` of each other problem
    kind, in source order, each with its position (from 1) and kind."""
    rows = classified(shape, refused=refused)
    numbered = select(*rows.c, shape.dialect.position().label("rn")).cte("stripe_meter_numbered")
    problems = [numbered.c.kind != GOOD]
    if shape.keep_too_old:
        problems.append(numbered.c.kind != OLD)
    ranked = (
        select(
            *numbered.c,
            func.row_number().over(partition_by=numbered.c.kind, order_by=numbered.c.rn).label("k"),
        )
        .where(*problems)
        .cte("stripe_meter_problems")
    )
    fields = [ranked.c.c, ranked.c.v, ranked.c.t]
    if not shape.fixed_event:
        fields.append(ranked.c.e)
    return (
        select(ranked.c.rn, ranked.c.kind, *fields)
        .where(or_(ranked.c.kind == CHECK, ranked.c.k <= sample_limit))
        .order_by(ranked.c.rn)
    )


def probe_sql(sql: str) -> str:
    """A statement that returns no row, only the query's columns (names and types)."""
    return f"SELECT * FROM (\n{_strip(sql)}\n) AS {SOURCE} WHERE 1 = 0"


def render(statement: Select[Any], shape: Shape, sql: str) -> str:
    """``statement`` in the dialect's SQL, the team's query spliced in as :data:`SOURCE`.

    The query's own text is kept as written (its parameters are passed along unchanged): it is
    put in place of the table name after compiling, not given to SQLAlchemy to parse.
    """
    compiled = str(
        statement.compile(dialect=shape.dialect.sqlalchemy(), compile_kwargs={"literal_binds": True})
    )
    # The table as a FROM item (not a column's qualifier, as in EXTRACT(epoch FROM source.t)).
    found = _FROM_SOURCE.findall(compiled)
    if len(found) != 1:
        raise AssertionError(f"the generated SQL reads {SOURCE} {len(found)} times")
    query = _strip(sql)
    return _FROM_SOURCE.sub(lambda _: f"FROM (\n{query}\n) AS {SOURCE}", compiled)


def render_own(statement: Select[Any], shape: Shape) -> str:
    """A statement that does not read the team's query (the ledger's own), in the dialect's SQL."""
    compiled = str(
        statement.compile(dialect=shape.dialect.sqlalchemy(), compile_kwargs={"literal_binds": True})
    )
    if _FROM_SOURCE.search(compiled):
        raise AssertionError(f"a statement of the ledger's own reads {SOURCE}")
    return compiled


_FROM_SOURCE = re.compile(rf"FROM {SOURCE}(?![.\w])")


def _strip(sql: str) -> str:
    """The query without what may not stand inside parentheses: trailing semicolons, and the
    comments and spaces around them (``SELECT ...; -- nightly``). Read with sqlparse, which
    common-sql brings, so a ";" inside a string or a comment is not taken for one.

    :raises Unsupported: the text holds more than one statement.
    """
    import sqlparse
    from sqlparse import tokens

    leaves = [token for statement in sqlparse.parse(sql) for token in statement.flatten()]
    while leaves and (
        leaves[-1].is_whitespace
        or leaves[-1].ttype in tokens.Comment
        or (leaves[-1].ttype is tokens.Punctuation and leaves[-1].value == ";")
    ):
        leaves.pop()
    if any(token.ttype is tokens.Punctuation and token.value == ";" for token in leaves):
        raise Unsupported("the query holds more than one statement")
    return "".join(token.value for token in leaves)
