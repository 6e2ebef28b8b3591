"""Usage older than Stripe's window that was billed late, kept in Airflow Variables.

Late usage is sent at the oldest instant Stripe accepts, so it lands on a day inside the window
and shows in that day's summaries. These records remember, per landing day, how much of which
original day each customer was billed there: later runs subtract it from what they look up.

* ``stripe_meter.late.<account>.<meter id>.<prefix>.<landing day>``: what landed on that day,
  ``{identifier: [customer, original day, value]}``, removed once the day is past Stripe's window;
* ``...late-of...<original day>``: ``{identifier: [customer, value]}``, what of that day was
  billed late, however long ago;
* ``...late-pending...``: ``{identifier: entry}``, late events sent (or about to be) whose fate
  Stripe has not told yet;
* ``...late-used...``: set once, when the meter first billed late (one read instead of one a day).

The first three hold an entry per customer billed late, so each is a :class:`.ShardedRecord`:
Variables of a bounded number of entries, however many customers are billed late. Entries are
keyed by the event's Stripe identifier, so a merge (:mod:`.variables`) that is applied twice, or
on top of another run's, counts each event once.

Nothing counts as billed late before Stripe answers for it. What is about to be sent is first
written as *pending* (with the one-minute window the events land in and what Stripe's summary
showed there before), moved to the records above once Stripe accepts it (or answers that it
holds it), and dropped if Stripe rejects it. A pending entry left by a process that was killed,
or whose answer was lost, is settled by the next run from Stripe's own summary of that minute,
never assumed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import date, timedelta
from typing import Any

from airflow_provider_stripe_meter.state.shards import ShardedRecord
from airflow_provider_stripe_meter.state.variables import Records

_WHY = "airflow-provider-stripe-meter: "


class LateLandings(Records):
    """The late-billing records of one (account, meter, identifier prefix)."""

    @property
    def pending_key(self) -> str:
        """The index Variable of late events whose fate Stripe has not told yet."""
        return self.key("late-pending")

    @property
    def used_key(self) -> str:
        """Set once, when this meter first billed late: until then nothing landed anywhere."""
        return self.key("late-used")

    def landing_key(self, landing_day: date) -> str:
        """The index Variable of what landed on ``landing_day``."""
        return self.key("late", landing_day.isoformat())

    def original_key(self, day: date) -> str:
        """The index Variable of what of ``day`` (an original day) was billed late."""
        return self.key("late-of", day.isoformat())

    def used(self) -> bool:
        """Whether anything was ever billed late for this meter."""
        return self.exists(self.used_key)

    def pending(self) -> list[dict[str, Any]]:
        """Late events whose fate is not known: ``customer``, ``day``, ``value``, ``identifier``,
        ``at`` (their timestamp), ``baseline`` (the minute's figure before), ``written_at``."""
        return sorted(self._pending().read().values(), key=lambda e: e["identifier"])

    def add_pending(self, entries: list[dict[str, Any]]) -> None:
        """Write ``entries`` as pending, before their events are sent."""
        if not entries:
            return
        self._mark_used()
        self._pending().add({e["identifier"]: e for e in entries})

    def drop_pending(self, identifiers: Iterable[str]) -> None:
        """Forget the pending entries of ``identifiers`` (settled one way or the other)."""
        self._pending().remove(identifiers)

    def confirm(self, entries: Iterable[dict[str, Any]]) -> None:
        """Count pending ``entries`` as billed (Stripe holds them), and drop them from pending."""
        entries = list(entries)
        if not entries:
            return
        self._mark_used()
        by_landing: dict[str, dict[str, Any]] = defaultdict(dict)
        by_original: dict[str, dict[str, Any]] = defaultdict(dict)
        for e in entries:
            by_landing[e["landing_day"]][e["identifier"]] = [e["customer"], e["day"], int(e["value"])]
            by_original[e["day"]][e["identifier"]] = [e["customer"], int(e["value"])]
        for landing_day, landed in sorted(by_landing.items()):
            self._landed_on(date.fromisoformat(landing_day)).add(landed)
        for day, billed in sorted(by_original.items()):
            self._billed_of(date.fromisoformat(day)).add(billed)
        self.drop_pending(e["identifier"] for e in entries)

    def read(self, landing_days: Iterable[date]) -> dict[date, dict[str, dict[str, int]]]:
        """What landed on each of ``landing_days``: ``{customer: {original day: value}}``."""
        found = {}
        for day in sorted(set(landing_days)):
            by_customer: dict[str, dict[str, int]] = {}
            for customer, original, value in self._landed_on(day).read().values():
                days = by_customer.setdefault(customer, {})
                days[original] = days.get(original, 0) + int(value)
            if by_customer:
                found[day] = by_customer
        return found

    def billed(self, original_days: Iterable[date]) -> dict[date, dict[str, int]]:
        """What of each of ``original_days`` was billed late, per customer."""
        found = {}
        for day in sorted(set(original_days)):
            by_customer: dict[str, int] = {}
            for customer, value in self._billed_of(day).read().values():
                by_customer[customer] = by_customer.get(customer, 0) + int(value)
            if by_customer:
                found[day] = by_customer
        return found

    def forget_landed_before(self, oldest_kept: date, lookback: int = 7) -> None:
        """Remove what landed on the ``lookback`` days before ``oldest_kept`` (past Stripe's window).

        No run looks such a day up again. What was billed of each original day is kept: a later
        backfill of that day must still know it.
        """
        for offset in range(1, lookback + 1):
            self._landed_on(oldest_kept - timedelta(days=offset)).delete()

    def _pending(self) -> ShardedRecord:
        return ShardedRecord(self, self.pending_key, _WHY + "late usage sent, not yet confirmed by Stripe.")

    def _landed_on(self, day: date) -> ShardedRecord:
        return ShardedRecord(
            self, self.landing_key(day), _WHY + "usage older than 35 days billed late on this day."
        )

    def _billed_of(self, day: date) -> ShardedRecord:
        return ShardedRecord(self, self.original_key(day), _WHY + "usage of this old day billed late.")

    def _mark_used(self) -> None:
        if not self.used():
            self.merge(self.used_key, lambda _: 1, _WHY + "late billing used.")
