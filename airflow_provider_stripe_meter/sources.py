"""Where usage rows come from: an upstream task's output or a query streamed from any SQL hook.

Shared by the batch operator (what to bill) and reconciliation (what should have been billed), so
both read and aggregate the source by the same rules.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from datetime import timedelta, tzinfo
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.utils.aggregation import UsageAggregator, iter_chunks, paused_gc
from airflow_provider_stripe_meter.utils.clock import SYSTEM

if TYPE_CHECKING:
    import logging

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
) -> UsageAggregator:
    """Read the source and aggregate it per (event name, customer, UTC day), logging progress."""
    aggregator = UsageAggregator(
        event_name=event_name or None,
        now=int(SYSTEM.now()),
        columns=columns,
        naive_timezone=zone(naive_timezone),
        safety_margin=safety_margin,
        sample_limit=sample_limit,
        keep_too_old=keep_too_old,
        split=split,
    )
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


def zone(value: tzinfo | str | None) -> tzinfo | None:
    """A timezone from a name (``"Europe/Paris"``) or a tzinfo; ``None`` stays ``None``."""
    if value is None or not isinstance(value, str):
        return value
    import pendulum

    return pendulum.timezone(value)
