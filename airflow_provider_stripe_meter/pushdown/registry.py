"""Which SQL is generated for an Airflow connection type."""

from __future__ import annotations

from airflow_provider_stripe_meter.pushdown.dialects import (
    DuckdbDialect,
    PostgresDialect,
    SqlDialect,
    SqliteDialect,
)
from airflow_provider_stripe_meter.pushdown.warehouses import WAREHOUSES

#: The dialect of each connection type (the tests run the first three; see :mod:`.warehouses`).
DIALECTS: dict[str, SqlDialect] = {
    conn_type: dialect
    for dialect in (SqliteDialect(), PostgresDialect(), DuckdbDialect(), *WAREHOUSES)
    for conn_type in dialect.conn_types
}


def dialect_for(conn_type: str) -> SqlDialect | None:
    """The SQL generated for an Airflow connection type; ``None``: not generated for it."""
    return DIALECTS.get((conn_type or "").lower())
