"""What a run's source covers: the UTC days, and up to which instant, where the source is the truth.

There a customer-day (or a part of a split day) with fewer, smaller or no rows than the ledger
billed is a correction, whatever row was deleted; elsewhere it is an older view of the day (an
hourly run retried after the nightly one) and changes nothing. The rule, for a customer-day whose
ledger events were planned from source rows up to ``source_at``: the source is the truth if the
coverage holds the day from its start through an instant past ``source_at``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timezone

from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY, day_of, day_start


@dataclass(frozen=True)
class Coverage:
    """Per UTC day the source covers from its start, the instant (exclusive) it covers it up to."""

    through: dict[date, int] = field(default_factory=dict)
    #: Whether the source holds every customer of the meter on those days (a declared window),
    #: or only those it returned rows of (the default: a DAG sharded by customer, or a query that
    #: filters customers, must not correct the customers it does not read down to nothing).
    every_customer: bool = True

    @classmethod
    def between(
        cls, start: int, end: int, now: int, *, days: set[date] | None = None, every_customer: bool = True
    ) -> Coverage:
        """The days whose start lies in ``[start, end)``, each covered up to ``end`` (at most its
        own end, and no later than ``now``, past which no row can exist yet).

        A day that began before ``start`` is not covered: the query shows only part of it.
        ``days``: only these days (the days the source returned rows for).
        """
        through: dict[date, int] = {}
        first = day_of(start) if start % SECONDS_PER_DAY == 0 else day_of(start + SECONDS_PER_DAY)
        start_of = day_start(first)
        limit = min(end, now + 1)
        while start_of < limit:
            day = day_of(start_of)
            if days is None or day in days:
                through[day] = min(start_of + SECONDS_PER_DAY, limit)
            start_of += SECONDS_PER_DAY
        return cls(through, every_customer)

    def __bool__(self) -> bool:
        return bool(self.through)

    @property
    def days(self) -> list[date]:
        """The covered days, ascending."""
        return sorted(self.through)

    def truth(self, day: date, source_at: int) -> bool:
        """Whether the source is the truth for ``day``, whose ledger events were planned from
        rows up to ``source_at`` (``-1``: none, or adopted from Stripe)."""
        through = self.through.get(day)
        return through is not None and through > source_at

    def describe(self) -> dict[str, str] | None:
        """JSON-safe: the first and last covered day and the instant the last is covered up to."""
        if not self.through:
            return None
        days = self.days
        end = datetime.fromtimestamp(self.through[days[-1]], timezone.utc)
        return {
            "first_day": days[0].isoformat(),
            "last_day": days[-1].isoformat(),
            "through": end.isoformat().replace("+00:00", "Z"),
        }


#: Nothing covered: every day keeps the stale-view rule (a smaller source changes nothing).
NOTHING = Coverage()
