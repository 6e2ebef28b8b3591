"""The rules in the SQL of the warehouses the suite cannot run: Snowflake, BigQuery, Redshift, MySQL.

Each is a :class:`~.dialects.SqlDialect` held to the same contract as the ones the tests run
(SQLite, PostgreSQL, DuckDB): an expression vouches for a row only where Python's rule would
surely accept it with the same figures, and hands every other row back to Python. So each
reads only the column types its driver names exactly (``cursor.description``'s type code) and
whose conversion its database documents; any other type takes the streaming path, named in
:class:`~airflow_provider_stripe_meter.pushdown.Unsupported`. Three conservative choices
common to them all:

* a date or time before 1970 is handed back (the functions used truncate toward zero there,
  and Python rounds down);
* a value of a floating-point type is not summed in SQL (NaN and infinities, inexact sums);
* where the DB-API connection cannot keep a temporary table across statements (BigQuery), or a
  query cannot name one twice (MySQL), the days split at billing period boundaries stream to
  the worker.

Their SQL is checked by generating every statement and parsing it in the warehouse's dialect,
and by running it on DuckDB as sqlglot translates it (Redshift's on PostgreSQL), against the
worker's figures (``tests/pushdown/test_warehouses.py``); it has not run on the warehouses
themselves. A statement a warehouse refuses makes the rows stream instead
(``aggregate_in="auto"``).

.. seealso:: https://docs.snowflake.com/en/sql-reference/functions/date_part
.. seealso:: https://docs.snowflake.com/en/developer-guide/python-connector/python-connector-api#type-codes
.. seealso:: https://cloud.google.com/bigquery/docs/reference/standard-sql/timestamp_functions#unix_micros
.. seealso:: https://docs.aws.amazon.com/redshift/latest/dg/r_EXTRACT_function.html
.. seealso:: https://dev.mysql.com/doc/refman/8.0/en/date-and-time-functions.html#function_timestampdiff
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, and_, case, cast, func, literal, literal_column
from sqlalchemy.types import UserDefinedType

from airflow_provider_stripe_meter.pushdown.dialects import (
    ColumnTypes,
    PostgresDialect,
    SqlDialect,
    _floor_div,
    _need,
)
from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect as SaDialect
    from sqlalchemy.sql.elements import ColumnElement
    from sqlalchemy.sql.selectable import Select

#: The first instant the warehouses' functions convert as Python does (see the module).
EPOCH = "1970-01-01 00:00:00"


def _ansi_dialect(quote: str = '"') -> SaDialect:
    """SQLAlchemy's default (ANSI) compiler, quoting identifiers with ``quote``: Snowflake and
    BigQuery have no dialect in SQLAlchemy itself, and the statements use only ANSI forms and
    functions named with ``func``."""
    from sqlalchemy.engine.default import DefaultDialect
    from sqlalchemy.sql.compiler import IdentifierPreparer

    class Preparer(IdentifierPreparer):
        def __init__(self, dialect: Any) -> None:
            super().__init__(dialect, initial_quote=quote)

    class Ansi(DefaultDialect):
        preparer: type[IdentifierPreparer] = Preparer
        # Both have a BOOLEAN type: NOT x, not x = 0 (BigQuery refuses to compare BOOL with INT64).
        supports_native_boolean = True

    return Ansi()


def _whole_decimal(v: ColumnElement[Any]) -> ColumnElement[Any]:
    return and_(v.isnot(None), v == func.trunc(v))


def _no_trailing_blank(x: ColumnElement[Any], length: Any) -> ColumnElement[Any]:
    """``x`` is text without a trailing blank, measured with the database's ``length``."""
    return and_(x.isnot(None), length(x) == length(func.rtrim(x)))


# -- Snowflake ----------------------------------------------------------------------------------


class _TimestampNtz(UserDefinedType[Any]):
    """Snowflake's ``TIMESTAMP_NTZ``, for a ``CAST`` (a DATE's midnight, as UTC)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "TIMESTAMP_NTZ"


#: snowflake-connector-python's type codes (the index of each type in its ``FIELD_TYPES``).
SF_FIXED, SF_REAL, SF_TEXT, SF_DATE = 0, 1, 2, 3
SF_TIMESTAMP_LTZ, SF_TIMESTAMP_TZ, SF_TIMESTAMP_NTZ = 6, 7, 8


class SnowflakeDialect(SqlDialect):
    """Snowflake: ``NUMBER``, ``TEXT``, ``DATE`` and the three ``TIMESTAMP_*`` types."""

    conn_types = ("snowflake",)
    name = "snowflake"

    def sqlalchemy(self) -> SaDialect:
        return _ansi_dialect('"')

    def check(self, types: ColumnTypes, *, fixed_event: bool) -> None:
        customer, value, stamp = types.codes[:3]
        _need(customer == SF_TEXT, "customer", types.names[0], customer, "TEXT (type code 2)")
        _need(value == SF_FIXED, "value", types.names[1], value, "NUMBER (type code 0)")
        _need(
            stamp in (SF_DATE, SF_TIMESTAMP_LTZ, SF_TIMESTAMP_TZ, SF_TIMESTAMP_NTZ)
            # Unix seconds as NUMBER(p, 0): the connector hands a NUMBER with a scale to Python as
            # a Decimal (or a float), which Python's rule does not read as seconds.
            or (stamp == SF_FIXED and types.scales[2:3] == (0,)),
            "timestamp",
            types.names[2],
            stamp,
            "TIMESTAMP_NTZ, TIMESTAMP_LTZ, TIMESTAMP_TZ, DATE or NUMBER(p, 0) unix seconds",
        )
        if not fixed_event:
            _need(types.codes[3] == SF_TEXT, "event name", types.names[3], types.codes[3], "TEXT")

    def binary(self, x: ColumnElement[Any]) -> ColumnElement[Any]:
        # COLLATE(x, 'utf8'): compared by the UTF-8 bytes, whatever the column's collation.
        return func.collate(x, literal("utf8"))

    def seconds(self, t: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        if code == SF_FIXED:
            return cast(t, BigInteger)
        moment = cast(t, _TimestampNtz()) if code == SF_DATE else t
        # EPOCH_NANOSECOND of a TIMESTAMP_NTZ reads its wall clock as UTC (naive_timezone's
        # default); of LTZ and TZ, the instant. Whole nanoseconds, cut to seconds by subtracting
        # the remainder, in integers: a quotient of NUMBERs keeps 6 decimals and would round
        # 0.9999996 s up, where the connector and Python drop the fraction.
        nanos = func.date_part(literal_column("EPOCH_NANOSECOND"), moment)
        whole = nanos - func.mod(nanos, literal_column("1000000000"))
        return case((nanos >= 0, cast(whole / literal_column("1000000000"), BigInteger)), else_=None)

    def whole(self, v: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        return _whole_decimal(v)

    def position(self) -> ColumnElement[Any]:
        # Snowflake's ROW_NUMBER requires an ORDER BY: NULL keeps the rows as they come.
        return func.row_number().over(order_by=literal_column("NULL"))

    def day_number(self, secs: ColumnElement[Any]) -> ColumnElement[Any]:
        # "/" of two NUMBERs is a NUMBER with a fraction in Snowflake: FLOOR of it, exact for
        # whole seconds (a day's last second is 1/86,400 short of the next day, far above the
        # quotient's rounding at 6 decimals).
        return cast(func.floor(secs / literal(SECONDS_PER_DAY)), BigInteger)


# -- BigQuery -----------------------------------------------------------------------------------


class BigQueryDialect(SqlDialect):
    """BigQuery (standard SQL): ``STRING``, ``INT64``, ``NUMERIC``, ``TIMESTAMP``, ``DATETIME``,
    ``DATE``. Its DB-API keeps no session between statements: no temporary tables."""

    conn_types = ("gcpbigquery", "bigquery")
    name = "bigquery"
    temp_tables = False

    INTEGER = ("INTEGER", "INT64")
    DECIMAL = ("NUMERIC", "BIGNUMERIC")

    def sqlalchemy(self) -> SaDialect:
        return _ansi_dialect("`")

    def check(self, types: ColumnTypes, *, fixed_event: bool) -> None:
        customer, value, stamp = (str(code).upper() for code in types.codes[:3])
        _need(customer == "STRING", "customer", types.names[0], customer, "STRING")
        _need(value in self.INTEGER + self.DECIMAL, "value", types.names[1], value, "INT64 or NUMERIC")
        _need(
            stamp in (*self.INTEGER, "TIMESTAMP", "DATETIME", "DATE"),
            "timestamp",
            types.names[2],
            stamp,
            "TIMESTAMP, DATETIME, DATE or INT64 unix seconds",
        )
        if not fixed_event:
            code = str(types.codes[3]).upper()
            _need(code == "STRING", "event name", types.names[3], code, "STRING")

    def binary(self, x: ColumnElement[Any]) -> ColumnElement[Any]:
        # An empty collation specification is binary, whatever the column's own.
        return func.collate(x, literal(""))

    def seconds(self, t: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        name = str(code).upper()
        if name in self.INTEGER:
            return t
        # TIMESTAMP(datetime or date) reads it in UTC; whole microseconds since the epoch,
        # divided in integers (DIV rounds toward zero: the same as down, from 1970 on).
        moment = t if name == "TIMESTAMP" else func.timestamp(t)
        micros = func.unix_micros(moment)
        return case((micros >= 0, func.div(micros, literal(1_000_000))), else_=None)

    def whole(self, v: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        if str(code).upper() in self.INTEGER:
            return v.isnot(None)
        return _whole_decimal(v)

    def day_number(self, secs: ColumnElement[Any]) -> ColumnElement[Any]:
        # "/" is floating-point division in BigQuery; DIV(x, y) is the integer one (toward zero).
        def div(x: ColumnElement[Any]) -> ColumnElement[Any]:
            return func.div(x, literal(SECONDS_PER_DAY))

        return case((secs >= 0, div(secs)), else_=-div(-secs + (SECONDS_PER_DAY - 1)))


# -- Redshift -----------------------------------------------------------------------------------


class RedshiftDialect(PostgresDialect):
    """Amazon Redshift: PostgreSQL's SQL and type OIDs (redshift_connector reports them), without
    PostgreSQL's session settings and its ``COLLATE "C"``."""

    conn_types = ("redshift",)
    name = "redshift"
    #: Its SQL is PostgreSQL's, but its ledger is written row by row: not subtracted there.
    ledger_diff = False

    def prepare(self, cur: Any) -> None:
        # work_mem and jit are PostgreSQL's settings: Redshift has neither.
        pass

    def fence(self, statement: Select[Any]) -> Select[Any]:
        # OFFSET 0 is PostgreSQL's planner fence, not Redshift's.
        return statement

    def is_text(self, x: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        # Redshift compares VARCHARs ignoring trailing blanks, whatever the collation: 'cus_a '
        # would be grouped with 'cus_a' (Python refuses the first). Such a value is handed back.
        # https://docs.aws.amazon.com/redshift/latest/dg/r_Character_types.html
        return _no_trailing_blank(x, func.length)

    def binary(self, x: ColumnElement[Any]) -> ColumnElement[Any]:
        return func.collate(x, literal("case_sensitive"))

    def seconds(self, t: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        secs = super().seconds(t, code)
        return case((secs >= 0, secs), else_=None)


# -- MySQL --------------------------------------------------------------------------------------

#: MySQL's protocol type codes (``MySQLdb.constants.FIELD_TYPE``; mysql-connector's ``FieldType``).
MY_INTEGERS = {1, 2, 3, 8, 9}  # TINY, SHORT, LONG, LONGLONG, INT24
MY_DECIMALS = {0, 246}  # DECIMAL, NEWDECIMAL
MY_DATE, MY_DATETIME, MY_NEWDATE = 10, 12, 14
MY_TEXT = {15, 253, 254}  # VARCHAR, VAR_STRING, STRING


class MysqlDialect(SqlDialect):
    """MySQL 8: ``VARCHAR``, integers, ``DECIMAL``, ``DATETIME`` and ``DATE``. A ``TIMESTAMP``
    column is read in the session's time zone by the driver as well as by SQL: it streams."""

    conn_types = ("mysql",)
    name = "mysql"
    # "You cannot refer to a TEMPORARY table more than once in the same query."
    # https://dev.mysql.com/doc/refman/8.0/en/temporary-table-problems.html
    temp_tables = False
    binary_collation = "utf8mb4_bin"

    def sqlalchemy(self) -> SaDialect:
        from sqlalchemy.dialects import mysql

        return mysql.dialect()

    def check(self, types: ColumnTypes, *, fixed_event: bool) -> None:
        customer, value, stamp = types.codes[:3]
        _need(customer in MY_TEXT, "customer", types.names[0], customer, "VARCHAR or CHAR")
        _need(value in MY_INTEGERS | MY_DECIMALS, "value", types.names[1], value, "an integer or DECIMAL")
        _need(
            stamp in MY_INTEGERS | {MY_DATE, MY_DATETIME, MY_NEWDATE},
            "timestamp",
            types.names[2],
            stamp,
            "DATETIME, DATE or integer unix seconds",
        )
        if not fixed_event:
            _need(types.codes[3] in MY_TEXT, "event name", types.names[3], types.codes[3], "VARCHAR or CHAR")

    def is_text(self, x: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        # utf8mb4_bin is a PAD SPACE collation: 'cus_a ' equals 'cus_a' (Python refuses the
        # first). Such a value is handed back; CHAR_LENGTH counts a VARCHAR's trailing spaces.
        # https://dev.mysql.com/doc/refman/8.0/en/charset-binary-collations.html
        return _no_trailing_blank(x, func.char_length)

    def seconds(self, t: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        if code in MY_INTEGERS:
            # As it is: a CAST to SIGNED would wrap a BIGINT UNSIGNED past 2^63 to a negative.
            return t
        # TIMESTAMPDIFF of a DATETIME from the epoch: no time zone involved (UNIX_TIMESTAMP
        # would read it in the session's), whole seconds.
        secs = func.timestampdiff(literal_column("SECOND"), literal(EPOCH), t)
        return case((secs >= 0, secs), else_=None)

    def whole(self, v: ColumnElement[Any], code: Any) -> ColumnElement[Any]:
        if code in MY_INTEGERS:
            return v.isnot(None)
        return and_(v.isnot(None), v == func.truncate(v, literal(0)))

    def day_number(self, secs: ColumnElement[Any]) -> ColumnElement[Any]:
        return _floor_div(secs, SECONDS_PER_DAY, "DIV")


WAREHOUSES: tuple[SqlDialect, ...] = (
    SnowflakeDialect(),
    BigQueryDialect(),
    RedshiftDialect(),
    MysqlDialect(),
)
