"""Which recent days this provider has sent usage for, kept in Airflow's metadata database.

Stripe refuses a repeated identifier for at least 24 hours, and its meter summaries settle
within that time. So a day that ended less than a day ago, and that nothing was ever sent for,
can be billed without looking at Stripe first (the cheap nightly case); any other day is looked
up in Stripe's summaries before anything is sent for it. "Nothing was ever sent for it" is what
this store knows: a day is marked *before* its first event leaves, so a task retried on another
worker, a re-run, or a backfill that overlaps last night's run finds the mark and looks first.

Marks are Airflow Variables (``stripe_meter.sent.<account>.<meter id>.<prefix>.<day>``), one per
day, so concurrent tasks never overwrite each other's marks. A mark is only needed while its day
is fresh; :meth:`SentDays.forget_before` removes older ones.

.. seealso:: https://airflow.apache.org/docs/apache-airflow/stable/core-concepts/variables.html
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import date, timedelta
from typing import Any


class _MeterStore:
    """Airflow Variables of one (account, meter, identifier prefix), one per day.

    :param account: The Connect account (``acct_...``) or ``None`` for the platform.
    :param meter_id: The Stripe meter.
    :param prefix: The identifier prefix the operator sends under.
    """

    def __init__(self, account: str | None, meter_id: str, prefix: str) -> None:
        self.account = account or "platform"
        self.meter_id = meter_id
        self.prefix = prefix

    def _key(self, kind: str, day: date) -> str:
        return f"stripe_meter.{kind}.{self.account}.{self.meter_id}.{self.prefix}.{day.isoformat()}"


class SentDays(_MeterStore):
    """Marks of the days sent for one (account, meter, identifier prefix)."""

    def key(self, day: date) -> str:
        """The Variable that marks ``day``."""
        return self._key("sent", day)

    def marked(self, days: Iterable[date]) -> set[date]:
        """Those of ``days`` that have been sent for."""
        from airflow.sdk import Variable

        return {day for day in set(days) if Variable.get(self.key(day), default=None) is not None}

    def mark(self, days: Iterable[date], detail: dict[str, Any]) -> None:
        """Mark ``days`` as sent for (before sending), with who sent them, for the audit trail."""
        from airflow.sdk import Variable

        for day in sorted(set(days)):
            Variable.set(
                self.key(day),
                json.dumps(detail, sort_keys=True),
                description="airflow-provider-stripe-meter: usage of this day was sent to Stripe; "
                "later runs look at Stripe's summaries before sending more.",
            )

    def forget_before(self, oldest_fresh: date, lookback: int = 7) -> None:
        """Remove the marks of the ``lookback`` days before ``oldest_fresh``: those are always looked up."""
        from airflow.sdk import Variable

        for offset in range(1, lookback + 1):
            day = oldest_fresh - timedelta(days=offset)
            if Variable.get(self.key(day), default=None) is not None:
                Variable.delete(self.key(day))


class LateLandings(_MeterStore):
    """Usage older than Stripe's window that was billed late, by the day its events landed on.

    Late usage is sent at the oldest instant Stripe accepts, so it lands on a day inside the
    window and shows in that day's summaries. This store remembers, per landing day, how much of
    which original day each customer was billed there: later runs subtract it from what they look
    up. One Variable per landing day (``stripe_meter.late.<account>.<meter id>.<prefix>.<day>``)
    holds ``{customer: {original day: value}}``; one per original day (``...late-of...``) holds
    ``{customer: value}``, what of that day was billed late, however long ago.
    """

    def key(self, landing_day: date) -> str:
        """The Variable for ``landing_day``."""
        return self._key("late", landing_day)

    @property
    def used_key(self) -> str:
        """Set once, when this meter first billed late: until then nothing landed anywhere."""
        return f"stripe_meter.late-used.{self.account}.{self.meter_id}.{self.prefix}"

    def used(self) -> bool:
        """Whether anything was ever billed late for this meter (one read instead of one a day)."""
        from airflow.sdk import Variable

        return Variable.get(self.used_key, default=None) is not None

    def original_key(self, day: date) -> str:
        """The Variable for what of ``day`` (an original day) was billed late."""
        return self._key("late-of", day)

    def read(self, landing_days: Iterable[date]) -> dict[date, dict[str, dict[str, int]]]:
        """What landed on each of ``landing_days`` (days with nothing are left out)."""
        return self._read(self.key, landing_days)

    def billed(self, original_days: Iterable[date]) -> dict[date, dict[str, int]]:
        """What of each of ``original_days`` was billed late, per customer."""
        return self._read(self.original_key, original_days)

    @staticmethod
    def _read(key: Any, days: Iterable[date]) -> dict[date, Any]:
        from airflow.sdk import Variable

        found = {}
        for day in sorted(set(days)):
            raw = Variable.get(key(day), default=None)
            if raw is not None:
                found[day] = json.loads(raw)
        return found

    def add(self, landing_day: date, amounts: dict[str, dict[str, int]]) -> None:
        """Add ``{customer: {original day: value}}`` to what landed on ``landing_day`` (negative undoes)."""
        from airflow.sdk import Variable

        if not self.used():
            Variable.set(self.used_key, "1", description="airflow-provider-stripe-meter: late billing used.")
        current = self.read([landing_day]).get(landing_day, {})
        for customer, days in amounts.items():
            mine = current.setdefault(customer, {})
            for day, value in days.items():
                mine[day] = mine.get(day, 0) + value
                if not mine[day]:
                    del mine[day]
            if not mine:
                del current[customer]
        Variable.set(
            self.key(landing_day),
            json.dumps(current, sort_keys=True),
            description="airflow-provider-stripe-meter: usage older than 35 days billed late on this day.",
        )
        by_original: dict[str, dict[str, int]] = {}
        for customer, days in amounts.items():
            for day, value in days.items():
                by_original.setdefault(day, {})[customer] = value
        for day, values in by_original.items():
            original = date.fromisoformat(day)
            billed = self.billed([original]).get(original, {})
            for customer, value in values.items():
                billed[customer] = billed.get(customer, 0) + value
            Variable.set(
                self.original_key(original),
                json.dumps({c: v for c, v in sorted(billed.items()) if v}),
                description="airflow-provider-stripe-meter: usage of this old day billed late.",
            )
