"""The customers Stripe has shown to exist, kept beside the ledger so a run asks Stripe only about new ones.

Stripe answers 200 to a meter event for a customer it does not know and drops the event later,
reported only in the meter's asynchronous error reports. So a run checks, before it sends, that
Stripe knows each customer of the source; a customer found is written here
(``<ledger table>_customers``: account, customer, when it was seen) and never asked about again.
A steady night, every customer known before, asks Stripe nothing.

.. seealso:: https://docs.stripe.com/api/customers/retrieve

Plain Python over DB-API, through the ledger's connection.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import suppress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.ledger.store import SqlLedger

COLUMNS = (
    ("account", "VARCHAR(64) NOT NULL"),
    ("customer_id", "VARCHAR(255) NOT NULL"),
    ("seen_at", "BIGINT NOT NULL"),
)
NAMES = tuple(name for name, _ in COLUMNS)
#: Customers asked about per ``IN (...)`` query; past a few of those, the account's rows are read at once.
CHUNK = 500


class CustomerTable:
    """The known-customers table, on the ledger's connection."""

    def __init__(self, ledger: SqlLedger) -> None:
        self.ledger = ledger
        self.table = f"{ledger.table}_customers"
        self._created = False

    def _create(self) -> None:
        if self._created or not self.ledger.create:  # a team that creates its tables itself
            self._created = True
            return
        cursor = self.ledger.conn.cursor()
        columns = ",\n  ".join(f"{n} {t}" for n, t in COLUMNS)
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} (\n  {columns},\n"
            "  PRIMARY KEY (account, customer_id)\n)"
        )
        cursor.close()
        self.ledger.conn.commit()
        self._created = True

    def known(self, account: str, customers: Iterable[str]) -> set[str]:
        """Which of ``customers`` Stripe has shown to exist for ``account``."""
        self._create()
        wanted = sorted(set(customers))
        if not wanted:
            return set()
        ledger = self.ledger
        if len(wanted) > 4 * CHUNK:
            # A night of 100,000 customers: one read of the account's rows beats 200 queries.
            rows = ledger._query(f"SELECT customer_id FROM {self.table} WHERE account = ?", (account,))
            return {str(c) for (c,) in rows} & set(wanted)
        found: set[str] = set()
        for start in range(0, len(wanted), CHUNK):
            chunk = wanted[start : start + CHUNK]
            found |= {
                str(c)
                for (c,) in ledger._query(
                    f"SELECT customer_id FROM {self.table} WHERE account = ? "
                    f"AND customer_id IN ({ledger._marks(len(chunk))})",
                    (account, *chunk),
                )
            }
        return found

    def every(self, account: str) -> set[str]:
        """Every customer Stripe has shown to exist for ``account`` (what an adopting run asks about)."""
        self._create()
        rows = self.ledger._query(f"SELECT customer_id FROM {self.table} WHERE account = ?", (account,))
        return {str(c) for (c,) in rows}

    def add(self, account: str, customers: Iterable[str], seen_at: int) -> None:
        """Write ``customers`` as known (those already there are left as they are).

        Two runs may write the same customer at once: the key lets one row in. A failure rolls
        back what was written, as the ledger's own work carries on on the connection.
        """
        self._create()
        rows = [(account, c, int(seen_at)) for c in sorted(set(customers))]
        if not rows:
            return
        ledger = self.ledger
        try:
            if ledger.dialect in ("sqlite", "postgres"):
                for start in range(0, len(rows), CHUNK):
                    batch = rows[start : start + CHUNK]
                    ledger._execute(
                        f"INSERT INTO {self.table} ({', '.join(NAMES)}) VALUES "
                        f"{', '.join(['(?, ?, ?)'] * len(batch))} ON CONFLICT DO NOTHING",
                        [v for row in batch for v in row],
                    )
                ledger.conn.commit()
                return
            # Databases without ON CONFLICT: row by row, a row whose key is taken is skipped.
            for row in rows:
                try:
                    ledger._execute(f"INSERT INTO {self.table} ({', '.join(NAMES)}) VALUES (?, ?, ?)", row)
                    ledger.conn.commit()
                except Exception:  # the key is taken (each driver names its own IntegrityError)
                    ledger.conn.rollback()
        except BaseException:
            with suppress(Exception):  # a connection that broke: the write's own error says more
                ledger.conn.rollback()
            raise
