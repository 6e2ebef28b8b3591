"""Customer-days the ledger already holds exactly as the source has them: counted, never planned.

Where the usage and the ledger live in one database, the database subtracts one from the other
(:mod:`airflow_provider_stripe_meter.pushdown.ledger_diff`) and only the customer-days that
differ reach the worker. The others are summed up here, per event name and day, so the run's
result still counts them (customer-days already recorded, the source's totals) without one
object per customer-day: a re-run of billed nights costs the worker a few rows, whatever the
number of customers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date


@dataclass
class Unchanged:
    """What the database found already in the ledger, per event name."""

    #: Customer-days per event name and UTC day.
    days: dict[str, dict[date, int]] = field(default_factory=dict)
    #: The source's figure of those days per event name, by its meter's formula (the sum of the
    #: values on a ``sum`` meter, the rows on a ``count`` one): what the ledger holds of them.
    value: dict[str, int] = field(default_factory=dict)
    #: Source rows those days were aggregated from.
    rows: int = 0
    #: Per event name, the customers of the run's usage (unchanged days and the others alike).
    customers: dict[str, int] = field(default_factory=dict)
    #: The customers of the run's usage across event names.
    all_customers: int = 0

    def add_days(self, event_name: str, day: date, count: int, value: int, rows: int) -> None:
        """Count ``count`` unchanged customer-days of ``event_name`` on ``day``."""
        per_day = self.days.setdefault(event_name, {})
        per_day[day] = per_day.get(day, 0) + count
        self.value[event_name] = self.value.get(event_name, 0) + value
        self.rows += rows

    def groups(self, event_name: str | None = None) -> int:
        """Unchanged customer-days, of one event name or of all."""
        names = [event_name] if event_name is not None else list(self.days)
        return sum(sum(self.days.get(name, {}).values()) for name in names)

    @property
    def event_names(self) -> set[str]:
        """The event names with unchanged customer-days."""
        return {name for name, per_day in self.days.items() if per_day}

    def __bool__(self) -> bool:
        return bool(self.event_names)
