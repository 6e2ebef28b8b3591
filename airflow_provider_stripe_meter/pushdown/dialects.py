"""What each database needs said differently: a row's unix seconds, a whole-number check, text checks.

Plain Python over SQLAlchemy Core expressions (no Airflow). The per-row rules of
:mod:`airflow_provider_stripe_meter.utils.rules` about a row's value and timestamp, in SQL but
**conservative**: an expression vouches for a row only where the Python rule would surely accept
it with the same figures; any row it cannot vouch for is handed back to Python and checked there,
one by one, with the same messages. So a check here may be narrower than Python's, never wider:
a SQLite ``REAL`` value ``12.0`` is handed back (Python takes it as 12). The rules about a
customer id or an event name depend on that text alone: Python checks each distinct one the
database groups by (:mod:`.source`), not each row.

A column's type decides the expression where the database has static types (PostgreSQL,
DuckDB: read from the cursor's description of the query); SQLite has a type per value
(``typeof``). A column of a type not listed takes the streaming path: :class:`Unsupported`
names it.

.. seealso:: https://docs.sqlalchemy.org/en/20/core/sqlelement.html
.. seealso:: https://www.sqlite.org/lang_datefunc.html
.. seealso:: https://www.postgresql.org/docs/current/functions-datetime.html#FUNCTIONS-DATETIME-EXTRACT
.. seealso:: https://duckdb.org/docs/stable/sql/functions/timestamp
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, Date, LargeBinary, and_, case, cast, func, literal, not_, or_

from airflow_provider_stripe_meter.pushdown import Unsupported
from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect as SaDialect
    from sqlalchemy.sql.elements import ColumnElement
    from sqlalchemy.sql.selectable import Select


@dataclass(frozen=True)
class ColumnTypes:
    """What the database says of the query's columns: customer, value, timestamp, event name."""

    names: tuple[str, ...]
    #: The cursor's type codes in the same order (``None`` where the driver gives none).
    codes: tuple[Any, ...]
    #: The cursor's scales (``description[i][5]``) in the same order, where the driver gives them.
    scales: tuple[Any, ...] = ()


class SqlDialect:
    """One database's SQL for the rules: subclassed per database."""

    #: Airflow connection types it serves.
    conn_types: tuple[str, ...] = ()
    #: The database runs inside the worker's process (no rows cross a network): ``"auto"``
    #: leaves the summing to the worker's fast path, which is faster there (docs/benchmarks.md).
    in_process = False
    #: The database's name, as the result and the log give it.
    name = ""
    #: The run may use temporary tables (split days' parts, refused names): its DB-API session
    #: keeps them for the later statements, and a query may name one twice. Without, a night
    #: that needs one streams to the worker.
    temp_tables = True

    def sqlalchemy(self) -> SaDialect:
        """The SQLAlchemy dialect the queries are compiled with."""
        raise NotImplementedError

    def check(self, types: ColumnTypes, *, fixed_event: bool) -> None:
        """Raise :class:`Unsupported` if a column's type is not one the SQL reads exactly."""

    def seconds(self, t: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        """Whole unix seconds of timestamp ``t``, NULL where the SQL cannot vouch for it."""
        raise NotImplementedError

    def whole(self, v: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        """True where value ``v`` is a whole number Python reads as the same integer."""
        raise NotImplementedError

    def is_text(self, x: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        """True where ``x`` is a text value."""
        return x.isnot(None)

    #: The collation comparing text byte for byte, as Python compares strings.
    binary_collation = "C"

    def binary(self, x: ColumnElement[Any]) -> ColumnElement[Any]:
        """``x`` compared and grouped byte for byte: a column's case-insensitive or trimming
        collation would merge ``cus_A`` with ``cus_a`` (two customers to Stripe)."""
        return x.collate(self.binary_collation)

    def prepare(self, cur: Any) -> None:
        """Settings of the run's own session, before its statements (none by default)."""

    def fence(self, statement: Select[Any]) -> Select[Any]:
        """``statement`` kept a subquery of its own, evaluated once per row: a planner that folds it
        into the statements over it would copy each expression to every place naming it."""
        return statement

    def position(self) -> ColumnElement[Any]:
        """Each row's position in the query's result, from 1 (the samples name rows by it)."""
        return func.row_number().over()

    def day_number(self, secs: ColumnElement[Any]) -> ColumnElement[Any]:
        """The UTC day number of whole unix seconds ``secs``, rounded down as Python's ``//`` does
        (integer division rounds toward zero: a row before 1970, billed late, would land a day
        late). The operator as written: SQLAlchemy's ``/`` is true division (a float)."""
        return _floor_div(secs, SECONDS_PER_DAY, "/")

    #: The ledger may be subtracted in this database's SQL (:mod:`.ledger_diff`): the ledger
    #: writes its table natively here, and the tests run the statement on it.
    ledger_diff = False

    def iso_day_number(self, day: ColumnElement[Any]) -> ColumnElement[Any]:
        """The day number of a ledger's ``YYYY-MM-DD`` day (days since 1970-01-01)."""
        raise NotImplementedError

    #: The database hashes text to 64 bits (:meth:`text_hash`): the ledger is compared day by
    #: day through digests, not customer-day by customer-day (:mod:`.ledger_diff`).
    hashes_text = False

    def text_hash(self, x: ColumnElement[Any], seed: int) -> ColumnElement[Any]:
        """A 64-bit hash of text ``x`` with ``seed`` (where :attr:`hashes_text`)."""
        raise NotImplementedError


class SqliteDialect(SqlDialect):
    """SQLite: a type per value (``typeof``); timestamps as ISO text or integer unix seconds."""

    conn_types = ("sqlite",)
    name = "sqlite"
    in_process = True
    binary_collation = "BINARY"

    def __init__(self) -> None:
        import sqlite3

        self.unixepoch = sqlite3.sqlite_version_info >= (3, 38, 0)

    def sqlalchemy(self) -> SaDialect:
        from sqlalchemy.dialects import sqlite

        return sqlite.dialect()

    def seconds(self, t: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        # Text of 19 characters SQLite reads as a date-time ("YYYY-MM-DD HH:MM:SS" or "T"), or
        # that and a fraction (".fff...", the seconds read from the first 19 characters: SQLite
        # rounds a fraction to milliseconds and could carry 23:59:59.9999 into the next day,
        # Python drops it). The separators are checked where Python's format puts them (SQLite
        # also reads "2026-12-07    10:00" or a julian day number such as "1.0e-00000000000001"),
        # the length in bytes (SQLite's length() stops at a NUL character); of the rest, SQLite
        # reads three that Python refuses: the hour 24, the year 0, and a day past a month's end,
        # rolled over (February 30th), checked by a round trip for days 29 to 31 only. Every
        # other row goes to Python.
        def at(start: int, length: int) -> ColumnElement[Any]:
            return func.substr(t, start, length)

        size = func.length(cast(t, LargeBinary))
        whole = size == 19
        fraction = and_(
            size > 20,
            at(20, 1) == literal("."),
            not_(func.substr(t, 21).op("GLOB")(literal("*[^0-9]*"))),
        )
        head = case((whole, t), (fraction, at(1, 19)), else_=None)
        # unixepoch() (SQLite 3.38) is three times cheaper than strftime('%s').
        epoch = (
            func.unixepoch(head) if self.unixepoch else cast(func.strftime(literal("%s"), head), BigInteger)
        )
        read = and_(
            func.typeof(t) == literal("text"),
            at(5, 1) == literal("-"),
            at(8, 1) == literal("-"),
            at(11, 1).in_([literal(" "), literal("T")]),
            at(14, 1) == literal(":"),
            at(17, 1) == literal(":"),
            at(12, 2) != literal("24"),
            at(1, 4) != literal("0000"),
            or_(
                at(9, 2) < literal("29"),
                func.date(head, literal("+0 days")) == at(1, 10),
            ),
        )
        return case(
            (func.typeof(t) == literal("integer"), t),
            (read, epoch),
            else_=None,
        )

    def whole(self, v: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        return func.typeof(v) == literal("integer")

    def fence(self, statement: Select[Any]) -> Select[Any]:
        # LIMIT -1 (no limit) keeps SQLite from flattening the subquery: it runs as a
        # co-routine, each row's seconds computed once.
        # https://www.sqlite.org/optoverview.html#flattening
        return statement.limit(-1)

    def is_text(self, x: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        return func.typeof(x) == literal("text")

    ledger_diff = True

    def iso_day_number(self, day: ColumnElement[Any]) -> ColumnElement[Any]:
        # julianday() of a date is its noon-less start: 2440587.5 is 1970-01-01, exact in a double.
        return cast(func.julianday(day) - literal(2440587.5), BigInteger)


#: PostgreSQL type OIDs (``pg_type``), as psycopg reports them in ``cursor.description``.
PG_INTEGERS = {20, 21, 23}  # int8, int2, int4
PG_NUMERIC = 1700
PG_TIMESTAMP, PG_TIMESTAMPTZ, PG_DATE = 1114, 1184, 1082
PG_TEXT = {25, 1043}  # text, varchar (not char(n): it pads with spaces)


class PostgresDialect(SqlDialect):
    """PostgreSQL (and Redshift's SQL): static types from the cursor's description."""

    conn_types: tuple[str, ...] = ("postgres", "postgresql")
    name = "postgresql"

    def sqlalchemy(self) -> SaDialect:
        from sqlalchemy.dialects import postgresql

        return postgresql.dialect()

    def check(self, types: ColumnTypes, *, fixed_event: bool) -> None:
        customer, value, stamp = types.codes[:3]
        _need(customer in PG_TEXT, "customer", types.names[0], customer, "text or varchar")
        _need(
            value in PG_INTEGERS or value == PG_NUMERIC,
            "value",
            types.names[1],
            value,
            "an integer or numeric",
        )
        _need(
            stamp in PG_INTEGERS or stamp in (PG_TIMESTAMP, PG_TIMESTAMPTZ, PG_DATE),
            "timestamp",
            types.names[2],
            stamp,
            "timestamp, timestamptz, date or integer unix seconds",
        )
        if not fixed_event:
            _need(types.codes[3] in PG_TEXT, "event name", types.names[3], types.codes[3], "text or varchar")

    def seconds(self, t: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        if code in PG_INTEGERS:
            return cast(t, BigInteger)
        moment = cast(t, _timestamp()) if code == PG_DATE else t
        # EXTRACT(EPOCH ...) of a timestamp without zone reads it as UTC, as naive_timezone's
        # default does; FLOOR drops the fraction as Python's whole seconds do.
        return cast(func.floor(func.extract("epoch", moment)), BigInteger)

    def prepare(self, cur: Any) -> None:
        # For the run's transaction only (SET LOCAL): enough memory to group a night of 100,000
        # customers in a hash table rather than sort it on disk (the default work_mem is 4 MB),
        # and no JIT compilation, which costs more than it saves on statements this short.
        # https://www.postgresql.org/docs/current/runtime-config-resource.html#GUC-WORK-MEM
        cur.execute("SET LOCAL work_mem = '64MB'")
        cur.execute("SET LOCAL jit = off")

    def fence(self, statement: Select[Any]) -> Select[Any]:
        # OFFSET 0: PostgreSQL's own fence against pulling the subquery up.
        # https://www.postgresql.org/docs/current/queries-with.html#QUERIES-WITH-CTE-MATERIALIZATION
        return statement.offset(0)

    def whole(self, v: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        if code in PG_INTEGERS:
            return v.isnot(None)
        # NaN and infinities: v - v is not 0 for them.
        return and_(v.isnot(None), v == func.trunc(v), (v - v) == 0)

    ledger_diff = True

    def iso_day_number(self, day: ColumnElement[Any]) -> ColumnElement[Any]:
        # date - date is an integer number of days in PostgreSQL.
        return cast(day, Date).op("-")(cast(literal("1970-01-01"), Date))

    hashes_text = True

    def text_hash(self, x: ColumnElement[Any], seed: int) -> ColumnElement[Any]:
        # hashtextextended (PostgreSQL 11 and later): the 64-bit hash of hash indexes, seeded.
        # https://www.postgresql.org/docs/current/functions-info.html
        return func.hashtextextended(x, literal(seed))


class DuckdbDialect(SqlDialect):
    """DuckDB: static types, named in the cursor's description."""

    conn_types = ("duckdb",)
    name = "duckdb"

    def sqlalchemy(self) -> SaDialect:
        # DuckDB speaks PostgreSQL's SQL for everything generated here.
        from sqlalchemy.dialects import postgresql

        return postgresql.dialect()

    def check(self, types: ColumnTypes, *, fixed_event: bool) -> None:
        customer, value, stamp = (str(code).upper() for code in types.codes[:3])
        _need(customer == "VARCHAR", "customer", types.names[0], customer, "VARCHAR")
        _need(
            _duck_integer(value) or value.startswith("DECIMAL"),
            "value",
            types.names[1],
            value,
            "an integer or DECIMAL",
        )
        _need(
            _duck_integer(stamp) or stamp in ("TIMESTAMP", "TIMESTAMP WITH TIME ZONE", "DATE"),
            "timestamp",
            types.names[2],
            stamp,
            "TIMESTAMP, TIMESTAMP WITH TIME ZONE, DATE or integer unix seconds",
        )
        if not fixed_event:
            code = str(types.codes[3]).upper()
            _need(code == "VARCHAR", "event name", types.names[3], code, "VARCHAR")

    def seconds(self, t: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        name = str(code).upper()
        if _duck_integer(name):
            return cast(t, BigInteger)
        moment = cast(t, _timestamp()) if name == "DATE" else t
        # Microseconds since the epoch, floored to seconds in integers: exact (epoch() and a
        # division by 1e6 are doubles, inexact before 1698).
        return _floor_div(func.epoch_us(moment), 1_000_000, "//")

    def day_number(self, secs: ColumnElement[Any]) -> ColumnElement[Any]:
        # DuckDB's "/" divides as floating point; "//" is its integer division.
        return _floor_div(secs, SECONDS_PER_DAY, "//")

    def whole(self, v: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        if _duck_integer(str(code).upper()):
            return v.isnot(None)
        return and_(v.isnot(None), v == func.trunc(v))


def _floor_div(x: ColumnElement[Any], by: int, op: str) -> ColumnElement[Any]:
    """``x`` divided by ``by`` rounded down, with the database's integer division ``op``."""

    # Each side grouped (parenthesized): a custom operator has no precedence of its own.
    def div(a: ColumnElement[Any]) -> ColumnElement[Any]:
        return a.self_group().op(op)(literal(by)).self_group()

    return case((x >= 0, div(x)), else_=-div(-x + (by - 1)))


def _duck_integer(name: str) -> bool:
    return name in (
        "TINYINT",
        "SMALLINT",
        "INTEGER",
        "BIGINT",
        "HUGEINT",
        "UTINYINT",
        "USMALLINT",
        "UINTEGER",
    )


def _timestamp() -> Any:
    from sqlalchemy import TIMESTAMP

    return TIMESTAMP()


def _need(ok: bool, what: str, name: str, code: Any, wanted: str) -> None:
    if not ok:
        raise Unsupported(f"the {what} column {name!r} is of type {code!r}, not {wanted}")


__all__ = [
    "ColumnTypes",
    "DuckdbDialect",
    "PostgresDialect",
    "SqlDialect",
    "SqliteDialect",
    "Unsupported",
]
