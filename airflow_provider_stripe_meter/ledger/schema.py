"""The ledger table: its columns, keys and the DDL for each database.

The primary key (account, meter, customer, day, sequence number) is what keeps concurrent runs
and mapped instances apart: two runs that planned the same next event for a customer-day both
insert the same key, and the database lets one of them in. SQLite and PostgreSQL enforce it;
Snowflake and BigQuery accept the constraint but do not enforce it (the docs say how to keep
one writer per meter there).
"""

from __future__ import annotations

import re

DEFAULT_TABLE = "stripe_meter_ledger"

#: Column name and portable type, in the order rows are written.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("account", "VARCHAR(64) NOT NULL"),
    ("meter_id", "VARCHAR(64) NOT NULL"),
    ("event_name", "VARCHAR(100) NOT NULL"),
    ("customer_id", "VARCHAR(255) NOT NULL"),
    ("day", "CHAR(10) NOT NULL"),
    ("seq", "INTEGER NOT NULL"),
    ("identifier", "VARCHAR(100) NOT NULL"),
    ("value", "BIGINT NOT NULL"),
    ("stamp", "BIGINT NOT NULL"),
    ("source_at", "BIGINT NOT NULL"),
    ("state", "VARCHAR(16) NOT NULL"),
    ("run_id", "VARCHAR(250) NOT NULL"),
    ("attempt", "VARCHAR(250) NOT NULL"),
    ("sent_at", "DOUBLE PRECISION NOT NULL"),
    ("answered_at", "DOUBLE PRECISION"),
    ("note", "VARCHAR(255)"),
    ("part", "BIGINT NOT NULL"),
    ("period_end", "BIGINT"),
)
COLUMN_NAMES = tuple(name for name, _ in COLUMNS)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")


def check_table_name(table: str) -> str:
    """Return ``table`` if it is a plain (optionally schema-qualified) SQL name; it goes into SQL text."""
    if not isinstance(table, str) or not _NAME.fullmatch(table):
        raise ValueError(
            f"ledger_table must be a table name, optionally with its schema (billing.stripe_meter_ledger), "
            f"got {table!r}"
        )
    return table


def ddl(table: str = DEFAULT_TABLE) -> list[str]:
    """The statements that create the table and its indexes if they do not exist (SQLite, PostgreSQL)."""
    check_table_name(table)
    base = table.replace(".", "_")
    columns = ",\n  ".join(f"{name} {kind}" for name, kind in COLUMNS)
    return [
        f"CREATE TABLE IF NOT EXISTS {table} (\n  {columns},\n"
        "  PRIMARY KEY (account, meter_id, customer_id, day, seq)\n)",
        f"CREATE UNIQUE INDEX IF NOT EXISTS {base}_identifier ON {table} (account, identifier)",
        f"CREATE INDEX IF NOT EXISTS {base}_day ON {table} (account, meter_id, day)",
        f"CREATE INDEX IF NOT EXISTS {base}_state ON {table} (account, meter_id, state)",
    ]
