"""The billing ledger on an Airflow connection: any common-sql (``DbApiHook``) database.

.. seealso:: https://airflow.apache.org/docs/apache-airflow-providers-common-sql/stable/index.html
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING

from airflow_provider_stripe_meter.ledger.schema import DEFAULT_TABLE
from airflow_provider_stripe_meter.ledger.store import SqlLedger
from airflow_provider_stripe_meter.utils.clock import SYSTEM

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_stripe_meter.billing.context import Writer

#: Connection types whose SQL the ledger writes natively; any other DB-API database goes row by row.
DIALECTS = {"sqlite": "sqlite", "postgres": "postgres", "postgresql": "postgres"}


def ledger_on(conn_id: str, table: str = DEFAULT_TABLE) -> SqlLedger:
    """The ledger in ``table`` of the database behind ``conn_id`` (created on first use).

    :raises TypeError: the connection's hook is not a SQL (``DbApiHook``) hook.
    """
    from airflow.sdk import BaseHook

    hook = BaseHook.get_connection(conn_id).get_hook()
    if not hasattr(hook, "get_conn"):
        raise TypeError(
            f"ledger_conn_id {conn_id!r} gives {type(hook).__name__}, not a SQL (DbApiHook) hook: the "
            "ledger needs a database the team owns (PostgreSQL, SQLite, Snowflake, ...)"
        )
    conn_type = getattr(hook, "conn_type", "") or ""
    return SqlLedger(
        hook.get_conn,
        placeholder=getattr(hook, "placeholder", "%s") or "%s",
        dialect=DIALECTS.get(conn_type, "generic"),
        table=table,
    )


def ledger_writer(account: str, context: Context) -> Writer:
    """Who writes a task's ledger rows: ``account``, its Airflow run, and this try of the task."""
    import uuid

    from airflow_provider_stripe_meter.billing.context import Writer

    ti = context["ti"]
    map_index = ti.map_index if ti.map_index is not None else -1
    return Writer(
        account=account,
        run_id=ti.run_id,
        # Unique per execution: a retry, or a second worker, writes as someone else.
        attempt=f"{ti.dag_id}:{ti.task_id}:{map_index}:{ti.try_number}:{uuid.uuid4().hex[:12]}",
    )


def mark_dropped(
    ledger: SqlLedger, account: str, meter_id: str, keys: set[tuple[str, date]], note: str
) -> int:
    """Mark the live events of ``keys`` (customer, day) ``dropped``: Stripe holds none of them."""
    from airflow_provider_stripe_meter.ledger.entries import DROPPED, LIVE, Change

    if not keys:
        return 0
    entries = ledger.entries_of(
        account,
        meter_id,
        {customer for customer, _ in keys},
        min(day for _, day in keys),
        max(day for _, day in keys),
    )
    now = SYSTEM.now()
    changes = [
        Change(e.identifier, DROPPED, now, note)
        for e in entries
        if (e.customer_id, e.day) in keys and e.state in LIVE
    ]
    ledger.resolve(account, changes)
    return len(changes)
