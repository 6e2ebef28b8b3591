"""The subscriptions a meter bills through, kept beside the ledger so a run reads only what changed.

Listing every subscription on every run costs a request per 100 subscriptions: for the v2 stream,
which sends 100 events a request, that doubles a nightly run. So the subscriptions of each
(account, meter) are kept in a table of the ledger's database (``<ledger table>_subscriptions``),
listed in full once a week, and brought up to date on every other run from Stripe's
``customer.subscription.*`` events since the last run (one request per 100 changes).

Plain Python over DB-API, through the ledger's connection.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.ledger.store import SqlLedger

COLUMNS = (
    ("account", "VARCHAR(64) NOT NULL"),
    ("meter_id", "VARCHAR(64) NOT NULL"),
    ("subscription_id", "VARCHAR(255) NOT NULL"),
    ("customer_id", "VARCHAR(255) NOT NULL"),
    ("price_id", "VARCHAR(255) NOT NULL"),
    ("anchor", "BIGINT NOT NULL"),
    ("start_date", "BIGINT NOT NULL"),
    ("ended_at", "BIGINT"),
    ("cancel_at", "BIGINT"),
    ("interval_unit", "VARCHAR(8) NOT NULL"),
    ("interval_count", "INTEGER NOT NULL"),
    ("current_start", "BIGINT NOT NULL"),
    ("current_end", "BIGINT NOT NULL"),
    # The period boundaries around the current period (a few intervals either side), computed
    # when the row is written, so a run reads them instead of working them out again.
    ("bounds", "VARCHAR(2000) NOT NULL"),
)
NAMES = tuple(name for name, _ in COLUMNS)
SYNC_COLUMNS = (
    ("account", "VARCHAR(64) NOT NULL"),
    ("meter_id", "VARCHAR(64) NOT NULL"),
    ("prices", "VARCHAR(2000) NOT NULL"),
    ("full_at", "BIGINT NOT NULL"),
    ("events_to", "BIGINT NOT NULL"),
)


@dataclass(frozen=True)
class SyncState:
    """When a meter's subscriptions were last listed in full, and up to when events were read."""

    prices: tuple[str, ...]
    full_at: int
    events_to: int


class SubscriptionRow(NamedTuple):
    """One row of the subscriptions table (:data:`COLUMNS`, in order)."""

    account: str
    meter_id: str
    subscription_id: str
    customer_id: str
    price_id: str
    anchor: int
    start_date: int
    ended_at: int | None
    cancel_at: int | None
    interval_unit: str
    interval_count: int
    current_start: int
    current_end: int
    bounds: str

    def terms(self) -> tuple[Any, ...]:
        """What decides the row's boundaries apart from its current period: customer, price,
        anchor, start, end, cancellation, interval (a renewal keeps them)."""
        return self[3:11]


def row_of(
    account: str, meter_id: str, subscription: dict[str, Any], item: dict[str, Any], bounds: Sequence[int]
) -> SubscriptionRow:
    """A table row from a ``subscription`` object, its metered ``item`` and its period ``bounds``."""
    recurring = (item.get("price") or {}).get("recurring") or {}
    anchor = int(subscription.get("billing_cycle_anchor") or item["current_period_start"])
    ended = subscription.get("ended_at")
    cancel = subscription.get("cancel_at")
    return SubscriptionRow(
        account,
        meter_id,
        str(subscription["id"]),
        str(subscription["customer"]),
        str((item.get("price") or {}).get("id") or ""),
        anchor,
        int(subscription.get("start_date") or anchor),
        int(ended) if ended is not None else None,
        int(cancel) if cancel is not None else None,
        str(recurring.get("interval") or "month"),
        int(recurring.get("interval_count") or 1),
        int(item["current_period_start"]),
        int(item["current_period_end"]),
        ",".join(str(b) for b in bounds),
    )


class SubscriptionCache:
    """The subscriptions table and its sync state, on the ledger's connection."""

    def __init__(self, ledger: SqlLedger) -> None:
        self.ledger = ledger
        self.table = f"{ledger.table}_subscriptions"
        self.sync_table = f"{ledger.table}_subscriptions_sync"
        self._created = False

    def _create(self) -> None:
        if self._created or not self.ledger.create:  # a team that creates its tables itself
            self._created = True
            return
        base = self.table.replace(".", "_")
        cursor = self.ledger.conn.cursor()
        columns = ",\n  ".join(f"{n} {t}" for n, t in COLUMNS)
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} (\n  {columns},\n"
            "  PRIMARY KEY (account, meter_id, subscription_id)\n)"
        )
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {base}_customer ON {self.table} (account, meter_id, customer_id)"
        )
        sync = ",\n  ".join(f"{n} {t}" for n, t in SYNC_COLUMNS)
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {self.sync_table} (\n  {sync},\n  PRIMARY KEY (account, meter_id)\n)"
        )
        cursor.close()
        self.ledger.conn.commit()
        self._created = True

    def state(self, account: str, meter_id: str) -> SyncState | None:
        """The meter's sync state, if it was ever listed in full."""
        self._create()
        rows = self.ledger._query(
            f"SELECT prices, full_at, events_to FROM {self.sync_table} WHERE account = ? AND meter_id = ?",
            (account, meter_id),
        )
        if not rows:
            return None
        prices, full_at, events_to = rows[0]
        return SyncState(tuple(p for p in str(prices).split(",") if p), int(full_at), int(events_to))

    def rows(
        self, account: str, meter_id: str, subscriptions: Sequence[str] | None = None
    ) -> list[SubscriptionRow]:
        """The meter's subscription rows (only those of ``subscriptions``, if given)."""
        self._create()
        query = f"SELECT {', '.join(NAMES)} FROM {self.table} WHERE account = ? AND meter_id = ?"
        if subscriptions is None:
            return [SubscriptionRow._make(row) for row in self.ledger._query(query, (account, meter_id))]
        ids = sorted(set(subscriptions))
        out: list[SubscriptionRow] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            out += map(
                SubscriptionRow._make,
                self.ledger._query(
                    f"{query} AND subscription_id IN ({self.ledger._marks(len(chunk))})",
                    (account, meter_id, *chunk),
                ),
            )
        return out

    def periods(self, account: str, meter_id: str) -> list[tuple[Any, ...]]:
        """What a run needs of each of the meter's rows: (subscription, price, boundaries, start,
        end or cancellation, current period start and end, customer), and nothing else (a run
        reads 100,000, and keeps each row as it comes)."""
        self._create()
        return self.ledger._query(
            f"SELECT subscription_id, price_id, bounds, start_date, COALESCE(ended_at, cancel_at), "
            f"current_start, current_end, customer_id FROM {self.table} WHERE account = ? AND meter_id = ?",
            (account, meter_id),
        )

    def renewals(self, account: str, meter_id: str, after: int, upto: int) -> list[int]:
        """When the meter's subscriptions renew or end in ``(after, upto]``, as the table knows
        them (each a ``customer.subscription.*`` event): where a night's changes will be."""
        self._create()
        rows = self.ledger._query(
            f"SELECT current_end, cancel_at FROM {self.table} WHERE account = ? AND meter_id = ? "
            "AND ((current_end > ? AND current_end <= ?) OR (cancel_at > ? AND cancel_at <= ?))",
            (account, meter_id, after, upto, after, upto),
        )
        return [int(c if c is not None and after < int(c) <= upto else e) for e, c in rows]

    def replace(
        self,
        account: str,
        meter_id: str,
        rows: Iterable[Sequence[Any]],
        *,
        full: bool,
        state: SyncState,
        removed: Iterable[str] = (),
    ) -> None:
        """Write ``rows`` (all of the meter's with ``full``, else the changed ones) and the state, at once.

        A failure rolls back what was written: the connection carries on with the ledger's own
        work, which must not commit half of this.
        """
        self._create()
        try:
            named = list(map(SubscriptionRow._make, rows))
            self._replace(account, meter_id, named, full=full, state=state, removed=removed)
        except BaseException:
            with suppress(Exception):  # a connection that broke: the write's own error says more
                self.ledger.conn.rollback()
            raise

    def _replace(
        self,
        account: str,
        meter_id: str,
        rows: list[SubscriptionRow],
        *,
        full: bool,
        state: SyncState,
        removed: Iterable[str],
    ) -> None:
        ledger = self.ledger
        if full:
            ledger._execute(
                f"DELETE FROM {self.table} WHERE account = ? AND meter_id = ?", (account, meter_id)
            )
        else:
            gone = sorted({r.subscription_id for r in rows} | set(removed))
            for start in range(0, len(gone), 500):
                chunk = gone[start : start + 500]
                ledger._execute(
                    f"DELETE FROM {self.table} WHERE account = ? AND meter_id = ? "
                    f"AND subscription_id IN ({ledger._marks(len(chunk))})",
                    (account, meter_id, *chunk),
                )
        marks = f"({ledger._marks(len(NAMES))})"
        for start in range(0, len(rows), 500):
            batch = rows[start : start + 500]
            ledger._execute(
                f"INSERT INTO {self.table} ({', '.join(NAMES)}) VALUES {', '.join([marks] * len(batch))}",
                [value for row in batch for value in row],
            )
        ledger._execute(
            f"DELETE FROM {self.sync_table} WHERE account = ? AND meter_id = ?", (account, meter_id)
        )
        ledger._execute(
            f"INSERT INTO {self.sync_table} (account, meter_id, prices, full_at, events_to) "
            "VALUES (?, ?, ?, ?, ?)",
            (account, meter_id, ",".join(state.prices), state.full_at, state.events_to),
        )
        ledger.conn.commit()
