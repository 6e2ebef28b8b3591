"""The SQL generated for the warehouses the suite cannot run: Snowflake, BigQuery, Redshift, MySQL.

Two checks of each. Every statement a run may send parses in the warehouse's own dialect
(sqlglot's parsers, which know each one's functions and quoting). And the statements give what the
worker gives, through :func:`aggregate_in_database` itself: the warehouse's SQL is translated to
DuckDB's by sqlglot and run there on the same typed rows as ``test_source``'s DuckDB tests, the
connection describing the columns with the warehouse driver's type codes (Redshift's SQL runs on
PostgreSQL as it is, when a server is at hand). The translation is sqlglot's, so the second check
is of our expressions' meaning as sqlglot reads them, not of the warehouse: the collations are
left out of it (DuckDB has none of theirs) and checked by parsing alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from airflow_provider_stripe_meter.pushdown import Unsupported
from airflow_provider_stripe_meter.pushdown.dialects import ColumnTypes, SqlDialect
from airflow_provider_stripe_meter.pushdown.queries import (
    Shape,
    groups_query,
    latest_values_query,
    render,
    rows_query,
)
from airflow_provider_stripe_meter.pushdown.registry import dialect_for
from airflow_provider_stripe_meter.pushdown.source import aggregate_in_database
from airflow_provider_stripe_meter.pushdown.warehouses import (
    SF_REAL,
    BigQueryDialect,
    MysqlDialect,
    RedshiftDialect,
    SnowflakeDialect,
)
from tests.pushdown.test_source import (  # noqa: F401  (pg_connect: a fixture)
    NOW,
    SPLIT,
    _duckdb,
    aggregator,
    assert_same,
    both_ways,
    pg_connect,
)

sqlglot = pytest.importorskip("sqlglot")

#: sqlglot's name of each dialect's SQL.
READ = {"snowflake": "snowflake", "bigquery": "bigquery", "redshift": "redshift", "mysql": "mysql"}

#: The driver's type code of each DuckDB type the test tables use, per warehouse.
CODES: dict[str, dict[str, Any]] = {
    "snowflake": {"VARCHAR": 2, "BIGINT": 0, "DECIMAL(18,2)": 0, "TIMESTAMP": 8, "DATE": 3},
    "bigquery": {
        "VARCHAR": "STRING",
        "BIGINT": "INTEGER",
        "DECIMAL(18,2)": "NUMERIC",
        "TIMESTAMP": "DATETIME",
        "DATE": "DATE",
    },
    "mysql": {"VARCHAR": 253, "BIGINT": 8, "DECIMAL(18,2)": 246, "TIMESTAMP": 12, "DATE": 10},
    "redshift": {"VARCHAR": 1043, "BIGINT": 20, "DECIMAL(18,2)": 1700, "TIMESTAMP": 1114, "DATE": 1082},
}

WAREHOUSE_CLASSES = (SnowflakeDialect, BigQueryDialect, RedshiftDialect, MysqlDialect)
WAREHOUSES = [cls() for cls in WAREHOUSE_CLASSES]


#: The scale a driver gives each type (``description[i][5]``; Snowflake's is read).
SCALES = {"BIGINT": 0, "DECIMAL(18,2)": 2}


def _types(dialect: SqlDialect, stamp: str = "TIMESTAMP", value: str = "DECIMAL(18,2)") -> ColumnTypes:
    codes = CODES[dialect.name]
    return ColumnTypes(
        ("customer_id", "value", "ts", "event"),
        (codes["VARCHAR"], codes[value], codes[stamp], codes["VARCHAR"]),
        (None, SCALES.get(value), SCALES.get(stamp), None),
    )


def _statements(dialect: SqlDialect, types: ColumnTypes, *, fixed: bool, parts: bool) -> list[Any]:
    shape = Shape(dialect, types, fixed, NOW - 35 * 86_400, NOW + 300, False, parts)
    out = [groups_query(shape), latest_values_query(shape), rows_query(shape, 4, refused=False)]
    if dialect.temp_tables:
        out.append(rows_query(shape, 4, refused=True))
    return [(shape, statement) for statement in out]


@pytest.mark.parametrize("dialect", WAREHOUSES, ids=lambda d: d.name)
@pytest.mark.parametrize("stamp", ["TIMESTAMP", "DATE", "BIGINT"])
@pytest.mark.parametrize("fixed", [True, False], ids=["fixed-event", "event-column"])
def test_every_statement_parses_in_the_warehouses_own_sql(
    dialect: SqlDialect, stamp: str, fixed: bool
) -> None:
    # A column name that must be quoted, in the warehouse's own quotes (BigQuery's backticks).
    types = _types(dialect, stamp)
    types = ColumnTypes(("Customer Id", *types.names[1:]), types.codes, types.scales)
    query = "SELECT 1 AS x"
    parsed = 0
    for parts in [False, True] if dialect.temp_tables else [False]:
        for shape, statement in _statements(dialect, types, fixed=fixed, parts=parts):
            text = render(statement, shape, query)
            tree = sqlglot.parse_one(text, read=READ[dialect.name], error_level=sqlglot.ErrorLevel.RAISE)
            quoted = {c.name for c in tree.find_all(sqlglot.exp.Column) if c.args["this"].quoted}
            assert "Customer Id" in quoted, text
            parsed += 1
    assert parsed >= 3


def test_each_warehouse_says_a_rule_in_its_own_functions() -> None:
    def sql(dialect: SqlDialect, stamp: str = "TIMESTAMP") -> str:
        shape, statement = _statements(dialect, _types(dialect, stamp), fixed=True, parts=False)[0]
        return render(statement, shape, "SELECT 1")

    snowflake, bigquery, redshift, mysql = (sql(d()) for d in WAREHOUSE_CLASSES)
    assert 'date_part(EPOCH_NANOSECOND, stripe_meter_source."ts")' in snowflake
    assert """collate(stripe_meter_source."customer_id", 'utf8')""" in snowflake
    assert "unix_micros(timestamp(stripe_meter_source.`ts`))" in bigquery
    assert "collate(stripe_meter_source.`customer_id`, '')" in bigquery
    assert "div(" in bigquery
    assert 'EXTRACT(epoch FROM stripe_meter_source."ts")' in redshift
    assert "OFFSET" not in redshift
    # Redshift and MySQL compare text ignoring trailing blanks: such a value is handed back.
    c = "collate(stripe_meter_source.\"customer_id\", 'case_sensitive')"
    assert f"length({c}) = length(rtrim({c}))" in redshift
    assert "timestampdiff(SECOND, '1970-01-01 00:00:00', stripe_meter_source.`ts`)" in mysql
    assert "DIV 86400" in mysql
    c = "stripe_meter_source.`customer_id` COLLATE utf8mb4_bin"
    assert f"char_length({c}) = char_length(rtrim({c}))" in mysql


@pytest.mark.parametrize(
    ("conn_type", "name"),
    [("snowflake", "snowflake"), ("gcpbigquery", "bigquery"), ("redshift", "redshift"), ("mysql", "mysql")],
)
def test_airflows_connection_types_find_their_warehouse(conn_type: str, name: str) -> None:
    found = dialect_for(conn_type)
    assert found is not None
    assert found.name == name


@pytest.mark.parametrize(
    ("dialect", "codes", "message"),
    [
        (SnowflakeDialect(), (2, SF_REAL, 8), "value column 'value' is of type 1, not NUMBER"),
        (SnowflakeDialect(), (2, 0, 4), "timestamp column 'ts' is of type 4"),
        # NUMBER(p, 2) seconds: the connector hands Python a Decimal, not read as seconds.
        (SnowflakeDialect(), (2, 0, 0), "timestamp column 'ts' is of type 0, not .*NUMBER\\(p, 0\\)"),
        (BigQueryDialect(), ("STRING", "FLOAT", "TIMESTAMP"), "value column 'value' is of type 'FLOAT'"),
        (MysqlDialect(), (253, 8, 7), "timestamp column 'ts' is of type 7, not DATETIME"),
        (MysqlDialect(), (252, 8, 12), "customer column 'customer_id' is of type 252"),
        (RedshiftDialect(), (1043, 701, 1114), "value column 'value' is of type 701"),
    ],
)
def test_a_type_the_warehouse_sql_cannot_read_exactly_is_named(
    dialect: SqlDialect, codes: tuple[Any, ...], message: str
) -> None:
    with pytest.raises(Unsupported, match=message):
        dialect.check(ColumnTypes(("customer_id", "value", "ts"), codes, (None, 0, 2)), fixed_event=True)


def test_snowflake_reads_whole_number_seconds_of_scale_0() -> None:
    SnowflakeDialect().check(
        ColumnTypes(("customer_id", "value", "ts"), (2, 0, 0), (None, 2, 0)), fixed_event=True
    )


def test_mysql_reads_unsigned_seconds_past_2_to_the_63_as_future_rows() -> None:
    duckdb = pytest.importorskip("duckdb")
    conn = duckdb.connect()
    conn.execute("CREATE TABLE usage (customer_id VARCHAR, value BIGINT, ts UBIGINT)")
    conn.execute("INSERT INTO usage VALUES ('cus_a', 1, 18446744073709551615)")
    plain = _without_collation(MysqlDialect())
    shape = Shape(plain, _types(plain, "BIGINT", "BIGINT"), True, NOW - 35 * 86_400, NOW, False, False)
    text = render(groups_query(shape), shape, "SELECT customer_id, value, ts FROM usage")
    ((kind, *_),) = conn.execute(sqlglot.transpile(text, read="mysql", write="duckdb")[0]).fetchall()
    assert kind == 3  # FUTURE, as Python finds it: a CAST to SIGNED would have made it -1 (OLD)


# -- the same figures as the worker's, through DuckDB -------------------------------------------


class _Translated:
    """A DuckDB connection taking a warehouse's SQL (translated by sqlglot) and describing its
    columns with the warehouse driver's type codes."""

    def __init__(self, conn: Any, dialect: SqlDialect) -> None:
        self.conn, self.dialect = conn, dialect

    def cursor(self) -> _Cursor:
        return _Cursor(self.conn.cursor(), self.dialect)

    def close(self) -> None:
        self.conn.close()


class _Cursor:
    def __init__(self, cur: Any, dialect: SqlDialect) -> None:
        self.cur, self.dialect = cur, dialect
        self.description: Any = None

    def execute(self, sql: str, parameters: Any = None) -> None:
        text = sqlglot.transpile(sql, read=READ[self.dialect.name], write="duckdb")[0]
        if parameters:
            self.cur.execute(text, parameters)
        else:
            self.cur.execute(text)
        codes = CODES[self.dialect.name]
        self.description = [
            (d[0], codes.get(str(d[1]).upper(), d[1]), *d[2:5], SCALES.get(str(d[1]).upper()), d[6])
            for d in self.cur.description or ()
        ]

    def fetchmany(self, size: int) -> list[Any]:
        return self.cur.fetchmany(size)

    def fetchall(self) -> list[Any]:
        return self.cur.fetchall()

    def close(self) -> None:
        self.cur.close()


def _without_collation(dialect: SqlDialect) -> SqlDialect:
    """``dialect`` comparing text as the database does by default (DuckDB knows none of the
    warehouses' collations: they are checked by parsing above)."""

    class Plain(type(dialect)):  # type: ignore[misc]
        def binary(self, x: Any) -> Any:
            return x

    return Plain()


@pytest.mark.parametrize(
    "dialect", [SnowflakeDialect(), BigQueryDialect(), MysqlDialect()], ids=lambda d: d.name
)
@pytest.mark.parametrize(
    ("stamp_type", "value_type"), [("TIMESTAMP", "DECIMAL(18,2)"), ("BIGINT", "BIGINT"), ("DATE", "BIGINT")]
)
@pytest.mark.parametrize("event_name", ["e", None], ids=["fixed-event", "event-column"])
def test_a_warehouses_sql_sums_as_the_worker_does(
    tmp_path_factory: pytest.TempPathFactory,
    dialect: SqlDialect,
    stamp_type: str,
    value_type: str,
    event_name: str | None,
) -> None:
    connect = _duckdb(tmp_path_factory, stamp_type, value_type, clean_names=not dialect.temp_tables)
    plain = _without_collation(dialect)
    worker, database = both_ways(
        lambda: _Translated(connect(), plain),
        plain,
        "SELECT * FROM usage",
        keep=False,
        split=SPLIT if dialect.temp_tables else None,
        event_name=event_name,
        placeholder="?",
    )
    assert_same(worker, database)
    assert worker.problems.counts["invalid"] > 50  # rows of every kind reached both paths
    assert len(worker.finish()) > 20


@pytest.mark.parametrize("dialect", [BigQueryDialect(), MysqlDialect()], ids=lambda d: d.name)
def test_without_temporary_tables_split_days_stream_before_anything_runs(dialect: SqlDialect) -> None:
    ran: list[str] = []

    class Conn:
        def cursor(self) -> Any:
            return self

        def execute(self, sql: str, parameters: Any = None) -> None:
            ran.append(sql)
            codes = CODES[dialect.name]
            self.description = [
                ("customer_id", codes["VARCHAR"]),
                ("value", codes["BIGINT"]),
                ("ts", codes["TIMESTAMP"]),
            ]

        def fetchall(self) -> list[Any]:
            return []

        def close(self) -> None:
            pass

    with pytest.raises(Unsupported, match=f"temporary table, which is not generated for {dialect.name}"):
        aggregate_in_database(Conn(), dialect, "SELECT * FROM usage", None, aggregator(split=SPLIT))
    assert len(ran) == 1  # the columns read, nothing else
    assert ran[0].endswith("WHERE 1 = 0")


@pytest.mark.parametrize("dialect", [BigQueryDialect(), MysqlDialect()], ids=lambda d: d.name)
def test_without_temporary_tables_a_customer_python_refuses_streams_the_run(
    tmp_path_factory: pytest.TempPathFactory, dialect: SqlDialect
) -> None:
    connect = _duckdb(tmp_path_factory, "TIMESTAMP", "BIGINT")  # customers Python refuses among them
    plain = _without_collation(dialect)
    database = aggregator(event_name=None)
    with pytest.raises(Unsupported, match="customer ids or event names Python refuses"):
        aggregate_in_database(_Translated(connect(), plain), plain, "SELECT * FROM usage", None, database)
    assert database.rows == 0  # nothing added: the caller streams the rows into a fresh aggregator


def test_redshifts_sql_sums_as_the_worker_does_on_postgresql(request: pytest.FixtureRequest) -> None:
    # test_source's table in PostgreSQL (skipped without a server).
    connect: Callable[[], Any] = request.getfixturevalue("pg_connect")
    plain = _without_collation(RedshiftDialect())
    worker, database = both_ways(
        connect,
        plain,
        "SELECT customer_id, value, ts, event FROM pushdown_usage",
        keep=True,
        split=SPLIT,
        event_name=None,
        placeholder="%s",
    )
    assert_same(worker, database)
    assert worker.problems.counts["invalid"] > 50


def test_rows_before_1970_are_handed_to_python() -> None:
    duckdb = pytest.importorskip("duckdb")
    conn = duckdb.connect()
    conn.execute("CREATE TABLE usage (customer_id VARCHAR, value BIGINT, ts TIMESTAMP)")
    conn.execute("INSERT INTO usage VALUES ('cus_a', 1, TIMESTAMP '1969-12-31 23:59:59.5')")
    for dialect in (SnowflakeDialect(), BigQueryDialect(), MysqlDialect()):
        plain = _without_collation(dialect)
        shape = Shape(plain, _types(plain, "TIMESTAMP", "BIGINT"), True, NOW - 35 * 86_400, NOW, False, False)
        text = render(groups_query(shape), shape, "SELECT customer_id, value, ts FROM usage")
        (kind, *_), *rest = conn.execute(
            sqlglot.transpile(text, read=READ[dialect.name], write="duckdb")[0]
        ).fetchall()
        assert (kind, rest) == (1, []), dialect.name  # CHECK: Python decides (too old, here)
