"""Usage older than Stripe's window that was billed late, kept in Airflow Variables.

Late usage is sent at the oldest instant Stripe accepts, so it lands on a day inside the window
and shows in that day's summaries. These records remember, per landing day, how much of which
original day each customer was billed there: later runs subtract it from what they look up.

* ``stripe_meter.late.<account>.<meter id>.<prefix>.<landing day>``:
  ``{customer: {original day: {identifier: value}}}``;
* ``...late-of...<original day>``: ``{customer: {identifier: value}}``, what of that day was
  billed late, however long ago;
* ``...late-pending...``: ``{identifier: entry}``, late events sent (or about to be) whose fate
  Stripe has not told yet;
* ``...late-used...``: set once, when the meter first billed late (one read instead of one a day).

Amounts are keyed by the event's Stripe identifier, so a merge (:mod:`.variables`) that is
applied twice, or on top of another run's, counts each event once.

Nothing counts as billed late before Stripe answers for it. What is about to be sent is first
written as *pending* (with the one-minute window the events land in and what Stripe's summary
showed there before), moved to the records above once Stripe accepts it (or answers that it
holds it), and dropped if Stripe rejects it. A pending entry left by a process that was killed,
or whose answer was lost, is settled by the next run from Stripe's own summary of that minute,
never assumed.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from typing import Any

from airflow_provider_stripe_meter.state.variables import Records

_WHY = "airflow-provider-stripe-meter: "


class LateLandings(Records):
    """The late-billing records of one (account, meter, identifier prefix)."""

    @property
    def pending_key(self) -> str:
        """The Variable of late events whose fate Stripe has not told yet."""
        return self.key("late-pending")

    @property
    def used_key(self) -> str:
        """Set once, when this meter first billed late: until then nothing landed anywhere."""
        return self.key("late-used")

    def landing_key(self, landing_day: date) -> str:
        """The Variable of what landed on ``landing_day``."""
        return self.key("late", landing_day.isoformat())

    def original_key(self, day: date) -> str:
        """The Variable of what of ``day`` (an original day) was billed late."""
        return self.key("late-of", day.isoformat())

    def used(self) -> bool:
        """Whether anything was ever billed late for this meter."""
        return self.exists(self.used_key)

    def pending(self) -> list[dict[str, Any]]:
        """Late events whose fate is not known: ``customer``, ``day``, ``value``, ``identifier``,
        ``at`` (their timestamp), ``baseline`` (the minute's figure before), ``written_at``."""
        record = self.get(self.pending_key)
        return sorted((record or {}).values(), key=lambda e: e["identifier"])

    def add_pending(self, entries: list[dict[str, Any]]) -> None:
        """Write ``entries`` as pending, before their events are sent."""
        if not entries:
            return
        self._mark_used()
        added = {e["identifier"]: e for e in entries}
        self.merge(
            self.pending_key,
            lambda record: {**(record or {}), **added},
            _WHY + "late usage sent, not yet confirmed by Stripe.",
        )

    def drop_pending(self, identifiers: Iterable[str]) -> None:
        """Forget the pending entries of ``identifiers`` (settled one way or the other)."""
        gone = set(identifiers)
        if not gone:
            return

        def change(record: Any) -> dict[str, Any] | None:
            left = {k: v for k, v in (record or {}).items() if k not in gone}
            return left or None

        self.merge(self.pending_key, change, _WHY + "late usage sent, not yet confirmed by Stripe.")

    def confirm(self, entries: Iterable[dict[str, Any]]) -> None:
        """Count pending ``entries`` as billed (Stripe holds them), and drop them from pending."""
        entries = list(entries)
        if not entries:
            return
        self._mark_used()
        by_landing: dict[str, list[dict[str, Any]]] = {}
        by_original: dict[str, list[dict[str, Any]]] = {}
        for entry in entries:
            by_landing.setdefault(entry["landing_day"], []).append(entry)
            by_original.setdefault(entry["day"], []).append(entry)
        for landing_day, landed in sorted(by_landing.items()):
            self.merge(
                self.landing_key(date.fromisoformat(landing_day)),
                _add_landed(landed),
                _WHY + "usage older than 35 days billed late on this day.",
            )
        for day, billed in sorted(by_original.items()):
            self.merge(
                self.original_key(date.fromisoformat(day)),
                _add_billed(billed),
                _WHY + "usage of this old day billed late.",
            )
        self.drop_pending(e["identifier"] for e in entries)

    def read(self, landing_days: Iterable[date]) -> dict[date, dict[str, dict[str, int]]]:
        """What landed on each of ``landing_days``: ``{customer: {original day: value}}``."""
        found = {}
        for day in sorted(set(landing_days)):
            record = self.get(self.landing_key(day))
            if record:
                found[day] = {
                    customer: {orig: sum(by_id.values()) for orig, by_id in days.items()}
                    for customer, days in record.items()
                }
        return found

    def billed(self, original_days: Iterable[date]) -> dict[date, dict[str, int]]:
        """What of each of ``original_days`` was billed late, per customer."""
        found = {}
        for day in sorted(set(original_days)):
            record = self.get(self.original_key(day))
            if record:
                found[day] = {customer: sum(by_id.values()) for customer, by_id in record.items()}
        return found

    def _mark_used(self) -> None:
        if not self.used():
            self.merge(self.used_key, lambda _: 1, _WHY + "late billing used.")


def _add_landed(entries: list[dict[str, Any]]) -> Any:
    def change(record: Any) -> dict[str, Any]:
        merged: dict[str, Any] = {
            c: {d: dict(ids) for d, ids in days.items()} for c, days in (record or {}).items()
        }
        for e in entries:
            merged.setdefault(e["customer"], {}).setdefault(e["day"], {})[e["identifier"]] = int(e["value"])
        return merged

    return change


def _add_billed(entries: list[dict[str, Any]]) -> Any:
    def change(record: Any) -> dict[str, Any]:
        merged: dict[str, Any] = {c: dict(ids) for c, ids in (record or {}).items()}
        for e in entries:
            merged.setdefault(e["customer"], {})[e["identifier"]] = int(e["value"])
        return merged

    return change
