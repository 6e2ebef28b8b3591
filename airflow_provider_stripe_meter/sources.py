"""Where usage rows come from: an upstream task's output or a query streamed from any SQL hook.

Shared by the batch operator (what to bill) and reconciliation (what should have been billed), so
both read and aggregate the source by the same rules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from datetime import timedelta, tzinfo
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.pushdown import Unsupported
from airflow_provider_stripe_meter.utils.aggregation import UsageAggregator, iter_chunks, paused_gc
from airflow_provider_stripe_meter.utils.clock import SYSTEM

if TYPE_CHECKING:
    import logging

    from airflow_provider_stripe_meter.pushdown.ledger_diff import LedgerSide

PROGRESS_SECONDS = 10.0
#: Row fields in order: customer id, value, timestamp, and the event name where none is fixed.
DEFAULT_COLUMNS = ("customer_id", "value", "timestamp", "event_name")


def check_source(rows: Any, sql: str | None, sql_conn_id: str | None) -> None:
    """At DAG-parse time: exactly one source, and a connection for a query."""
    if (rows is None) == (sql is None):
        raise ValueError("give exactly one of rows (an upstream task's output) or sql (with sql_conn_id)")
    if sql is not None and not sql_conn_id:
        raise ValueError("sql needs sql_conn_id: the connection of the database to query")


def row_chunks(
    *,
    rows: Any = None,
    sql: str | None = None,
    sql_conn_id: str | None = None,
    parameters: Any = None,
    chunk_size: int,
) -> Iterator[list[Any]]:
    """Yield the usage rows in chunks of ``chunk_size``, from ``rows`` or by running ``sql``."""
    if sql is not None:
        yield from _query_chunks(sql, sql_conn_id, parameters, chunk_size)
        return
    if isinstance(rows, str):
        raise ValueError(
            "rows rendered to a string; pass the upstream task's output (usage.output) "
            "or render templates as native objects"
        )
    if isinstance(rows, dict):
        raise ValueError("rows must be a list of rows, got a mapping")
    rows = list(rows or [])
    # SQLExecuteQueryOperator with several statements and return_last=False: a list per statement.
    if rows and all(isinstance(r, list) and r and isinstance(r[0], (list, tuple)) for r in rows):
        rows = [row for statement in rows for row in statement]
    yield from iter_chunks(rows, chunk_size)


def _query_chunks(sql: str, sql_conn_id: str | None, parameters: Any, chunk_size: int) -> Iterator[list[Any]]:
    from airflow.sdk import BaseHook

    if not sql_conn_id:
        raise ValueError("sql needs sql_conn_id: the connection of the database to query")
    hook = BaseHook.get_connection(sql_conn_id).get_hook()
    if not hasattr(hook, "get_conn"):
        raise TypeError(f"Connection {sql_conn_id!r} gives {type(hook).__name__}, not a SQL (DbApiHook) hook")
    with closing(hook.get_conn()) as conn:
        cursor = streaming_cursor(conn, getattr(hook, "conn_type", ""))
        with closing(cursor):
            if parameters:
                cursor.execute(sql, parameters)
            else:
                cursor.execute(sql)
            while chunk := cursor.fetchmany(chunk_size):
                yield chunk


def streaming_cursor(conn: Any, conn_type: str) -> Any:
    """A cursor that streams: a server-side (named) cursor on PostgreSQL, a plain one elsewhere."""
    if conn_type in ("postgres", "postgresql"):
        try:
            cursor = conn.cursor(name="stripe_meter_usage")
        except TypeError:
            return conn.cursor()
        cursor.itersize = 10_000
        return cursor
    return conn.cursor()


#: Where rows are aggregated: ``"auto"`` (in the database where its SQL is generated, else on
#: the worker), ``"database"`` (fail if it cannot be), ``"worker"`` (row by row, always).
AGGREGATE_IN = ("auto", "database", "worker")


def aggregate_usage(
    *,
    rows: Any = None,
    sql: str | None = None,
    sql_conn_id: str | None = None,
    parameters: Any = None,
    chunk_size: int = 10_000,
    event_name: str | None,
    columns: Sequence[str],
    naive_timezone: tzinfo | str | None,
    safety_margin: timedelta,
    sample_limit: int,
    log: logging.Logger | Any,
    keep_too_old: bool = False,
    split: Mapping[tuple[str, str], Sequence[int]] | None = None,
    aggregate_in: str = "auto",
    needs_last: Callable[[set[str]], set[str]] | None = None,
    ledger: Callable[[], LedgerSide | None] | None = None,
) -> UsageAggregator:
    """Read the source and aggregate it per (event name, customer, UTC day), logging progress.

    With ``sql``, the aggregation runs in the database where its SQL is generated
    (:mod:`airflow_provider_stripe_meter.pushdown`; ``aggregate_in``), else the rows stream to
    the worker. Both give the same aggregates, counts and samples; the aggregator's ``path``
    and ``path_reason`` say which ran and why.

    :param needs_last: Of the event names found, those whose meter bills the ``last`` value
        (``None``: all): the database looks up latest values for those only.
    :param ledger: The ledger, where it is in the query's own database: the database subtracts
        it (:mod:`airflow_provider_stripe_meter.pushdown.ledger_diff`), only the customer-days
        that differ come back, the rest are counted in the aggregator's ``unchanged``.
    :raises Unsupported: ``aggregate_in="database"`` and the database cannot aggregate this query.
    """
    if aggregate_in not in AGGREGATE_IN:
        raise ValueError(f"aggregate_in must be one of {AGGREGATE_IN}, got {aggregate_in!r}")

    def fresh() -> UsageAggregator:
        return UsageAggregator(
            event_name=event_name or None,
            now=int(SYSTEM.now()),
            columns=columns,
            naive_timezone=zone(naive_timezone),
            safety_margin=safety_margin,
            sample_limit=sample_limit,
            keep_too_old=keep_too_old,
            split=split,
        )

    reason = "rows come from an upstream task" if sql is None else "aggregate_in='worker'"
    if sql is not None and aggregate_in != "worker":
        aggregator = fresh()
        try:
            _in_database(
                aggregator,
                sql,
                sql_conn_id,
                parameters,
                needs_last,
                log,
                forced=aggregate_in == "database",
                ledger=ledger,
            )
            return aggregator
        except Unsupported as err:
            if aggregate_in == "database":
                raise
            reason = str(err)
        log.info("Aggregating the query's rows on the worker: %s", reason)
    aggregator = fresh()
    aggregator.path_reason = reason
    started = last = time.monotonic()
    with paused_gc():
        for chunk in row_chunks(
            rows=rows, sql=sql, sql_conn_id=sql_conn_id, parameters=parameters, chunk_size=chunk_size
        ):
            aggregator.add_rows(chunk)
            now = time.monotonic()
            if now - last >= PROGRESS_SECONDS:
                last = now
                log.info("Read %d rows (%.0f rows/s)", aggregator.rows, aggregator.rows / (now - started))
    return aggregator


def _in_database(
    aggregator: UsageAggregator,
    sql: str,
    sql_conn_id: str | None,
    parameters: Any,
    needs_last: Callable[[set[str]], set[str]] | None,
    log: logging.Logger | Any,
    *,
    forced: bool,
    ledger: Callable[[], LedgerSide | None] | None = None,
) -> None:
    """Aggregate ``sql`` in its database into ``aggregator``; :class:`Unsupported` says why not
    (unless ``forced``, a database in the worker's own process is left to the worker)."""
    from airflow.sdk import BaseHook

    from airflow_provider_stripe_meter.pushdown.registry import dialect_for
    from airflow_provider_stripe_meter.pushdown.source import aggregate_in_database

    zone_ = aggregator.naive_timezone
    if zone_ is None or zone_.utcoffset(None) != timedelta(0):
        # Another zone's daylight-saving gaps and overlaps are resolved differently by each
        # database: such rows are read on the worker, by Python's rules alone.
        raise Unsupported(
            f"timestamps without a zone are read in {zone_}: SQL is generated for naive_timezone=UTC only"
        )
    hook = BaseHook.get_connection(sql_conn_id).get_hook() if sql_conn_id else None
    conn_type = getattr(hook, "conn_type", "") or ""
    dialect = dialect_for(conn_type)
    if hook is None or not hasattr(hook, "get_conn") or dialect is None:
        raise Unsupported(f"no SQL is generated for connection type {conn_type!r}")
    if dialect.in_process and not forced:
        raise Unsupported(
            f"{dialect.name} runs in the worker's process: its rows cross no network, and the worker "
            'sums them faster (aggregate_in="database" sums them in SQL)'
        )
    # The ledger's side is read first (the meters, the ledger's table created): an error there
    # (a meter that does not exist) is the run's own, not a statement the database refused.
    side = ledger() if ledger is not None and dialect.ledger_diff else None
    with closing(hook.get_conn()) as conn:
        try:
            figures = aggregate_in_database(
                conn,
                dialect,
                sql,
                parameters,
                aggregator,
                placeholder=getattr(hook, "placeholder", "?") or "?",
                needs_last=needs_last,
                # PostgreSQL's results stream through a named cursor on the same session; a
                # DuckDB cursor is a connection of its own (no temporary tables of the run).
                cursor=(lambda c: streaming_cursor(c, conn_type)) if dialect.name == "postgresql" else None,
                ledger=(lambda: side) if side is not None else None,
            )
        except Unsupported:
            raise
        except Exception as err:  # the database refused the generated SQL: the rows stream instead
            raise Unsupported(
                f"the database refused the generated SQL ({type(err).__name__}: {err})"
            ) from err
    aggregator.path = "database"
    aggregator.path_reason = f"aggregated in {dialect.name}"
    aggregator.database = figures.as_dict()
    log.info(
        "Aggregated %d rows in %s: %d customer-day groups back%s, %d rows checked on the worker, "
        "%d statements, %.1f s",
        aggregator.rows,
        dialect.name,
        figures.groups,
        f" ({figures.unchanged} more the ledger already holds)" if figures.unchanged is not None else "",
        figures.rows_checked,
        figures.statements,
        figures.seconds,
    )


def zone(value: tzinfo | str | None) -> tzinfo | None:
    """A timezone from a name (``"Europe/Paris"``) or a tzinfo; ``None`` stays ``None``."""
    if value is None or not isinstance(value, str):
        return value
    import pendulum

    return pendulum.timezone(value)
