"""OpenLineage facets: the usage table feeds the Stripe meter.

Used only when the ``apache-airflow-providers-openlineage`` package is installed: its listener
asks each task for ``get_openlineage_facets_on_complete``, and only then is anything of
OpenLineage imported. Without it the operators never import it, and the methods return ``None``.

* Inputs: the tables the usage query reads. The query is parsed by the OpenLineage provider's
  ``SQLParser`` with the database facts the common-sql hook gives (``get_openlineage_database_info``,
  dialect, default schema), as ``SQLExecuteQueryOperator`` does. With ``rows=`` from an upstream
  task, the upstream task's own facets give them. A database whose hook gives no such facts
  (SQLite, for one) yields no input.
* Output: the meter, as the dataset ``meters/<event name>`` in the namespace
  ``stripe://<account>`` (``platform`` or the connected account): the same name the ``stripe://``
  Asset of the meter converts to.

.. seealso:: https://airflow.apache.org/docs/apache-airflow-providers-openlineage/stable/guides/developer.html
.. seealso:: https://openlineage.io/docs/spec/naming
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.assets.stripe import meter_dataset

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage

log = logging.getLogger(__name__)
#: DB-API ``pyformat``/``format`` placeholders (``%(since)s``, ``%s``), which the SQL parser
#: cannot read: it then names no table at all. Tables never come from parameters.
_PLACEHOLDER = re.compile(r"%\([^)]*\)s|%s")


def usage_lineage(operator: Any) -> OperatorLineage | None:
    """Facets of a task that reads usage (``sql`` or upstream ``rows``) and bills (or checks) a meter.

    ``None`` without the OpenLineage provider. Never raises: lineage must not fail billing.
    """
    try:
        from airflow.providers.openlineage.extractors import OperatorLineage
    except ImportError:  # an optional provider, with no common-compat stand-in for this class
        return None
    inputs: list[Any] = []
    outputs: list[Any] = []
    try:
        inputs = _source_tables(operator)
    except Exception:  # a lineage gap is logged, never a failed billing run
        log.warning("OpenLineage: could not tell which tables the usage query reads", exc_info=True)
    event_name = getattr(operator, "event_name", None)
    if isinstance(event_name, str) and event_name and "{{" not in event_name:
        outputs.append(meter_dataset(event_name, _account(operator)))
    return OperatorLineage(inputs=inputs, outputs=outputs)


def _account(operator: Any) -> str | None:
    """The connected account billed: the task's own, else its connection's (no Stripe request)."""
    billed_account = getattr(operator, "billed_account", None)
    return billed_account() if callable(billed_account) else None


def _source_tables(operator: Any) -> list[Any]:
    upstream_id = getattr(operator, "rows_task_id", None)
    if upstream_id and getattr(operator, "dag", None) is not None:
        upstream = operator.dag.get_task(upstream_id)
        facets = getattr(upstream, "get_openlineage_facets_on_start", None)
        lineage = facets() if callable(facets) else None
        return list(lineage.inputs) if lineage is not None else []
    sql, conn_id = getattr(operator, "sql", None), getattr(operator, "sql_conn_id", None)
    if not (isinstance(sql, str) and sql.strip() and conn_id):
        return []
    return _parse(sql, conn_id)


def _parse(sql: str, conn_id: str) -> list[Any]:
    """The tables ``sql`` reads, by common-sql's lineage support for ``conn_id``'s database."""
    from airflow.providers.openlineage.sqlparser import SQLParser
    from airflow.sdk import BaseHook

    connection = BaseHook.get_connection(conn_id)
    hook = connection.get_hook()
    info = getattr(hook, "get_openlineage_database_info", None)
    database_info = info(connection) if callable(info) else None
    if database_info is None:
        log.debug("OpenLineage: %s gives no database facts; no input dataset", type(hook).__name__)
        return []
    parser = SQLParser(
        dialect=hook.get_openlineage_database_dialect(connection),
        default_schema=hook.get_openlineage_default_schema(),
    )
    lineage = parser.generate_openlineage_metadata_from_sql(
        sql=_PLACEHOLDER.sub("NULL", sql),
        hook=hook,
        database_info=database_info,
        sqlalchemy_engine=hook.get_sqlalchemy_engine(),
    )
    return list(lineage.inputs)
