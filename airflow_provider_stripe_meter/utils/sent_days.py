"""What this provider has sent to each day, kept in Airflow's metadata database.

Stripe refuses a repeated identifier for at least 24 hours, and its meter summaries settle
within that time. So a day that ended less than a day ago, and that nothing was ever sent for,
can be billed without looking at Stripe first (the cheap nightly case); any other day is looked
up in Stripe's summaries before anything is sent for it. "Nothing was ever sent for it" is what
this journal knows: a day is marked *before* its first event leaves, so a task retried on another
worker, a re-run, an hourly "day so far" run or a backfill that overlaps last night's run finds
the mark and looks first.

Each mark (one Airflow Variable per day, ``stripe_meter.sent.<account>.<meter id>.<prefix>.<day>``,
so concurrent tasks never overwrite each other's days) also says

* ``last_send``: when a run last started sending to the day. Stripe's summaries are eventually
  consistent, so a summary read less than ``summary_lag`` after that may not show those events
  yet: the operator waits until it can trust it.
* ``version``: how many runs have finished sending to the day. It is part of every look-up based
  identifier, so a figure that returns to an earlier value gets a new identifier, while a retry
  of a send cut short (no new version yet) repeats the same one.

Marks are kept until their day is past Stripe's 35-day window and so can receive no more
events (:meth:`SentDays.forget_older_than`); a day still inside the identifier window by any
clock keeps its mark.

.. seealso:: https://airflow.apache.org/docs/apache-airflow/stable/core-concepts/variables.html
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class DayMark:
    """What the journal knows of one day: sent to at all, when last, how many runs finished."""

    version: int
    last_send: float


class SentDays(_MeterStore):
    """The journal of the days sent to, for one (account, meter, identifier prefix)."""

    def key(self, day: date) -> str:
        """The Variable that marks ``day``."""
        return self._key("sent", day)

    def read(self, days: Iterable[date]) -> dict[date, DayMark]:
        """The marks of those of ``days`` that have been sent to (unmarked days are left out)."""
        from airflow.sdk import Variable

        found = {}
        for day in sorted(set(days)):
            raw = Variable.get(self.key(day), default=None)
            if raw is not None:
                found[day] = _mark(_loads(raw))
        return found

    def sending(self, days: Iterable[date], detail: dict[str, Any], now: float) -> None:
        """Before sending to ``days``: mark them, and say when, so a reader knows to let Stripe settle."""
        self._write(days, detail, now, bump=False)

    def sent(self, days: Iterable[date], detail: dict[str, Any], now: float) -> None:
        """After every answer for ``days`` is in: a new version, so the next figure gets new identifiers."""
        self._write(days, detail, now, bump=True)

    def _write(self, days: Iterable[date], detail: dict[str, Any], now: float, *, bump: bool) -> None:
        from airflow.sdk import Variable

        for day in sorted(set(days)):
            raw = Variable.get(self.key(day), default=None)
            current = _loads(raw) if raw is not None else {}
            mark = _mark(current) if current else DayMark(0, 0.0)
            record = {
                **detail,
                "marked_at": current.get("marked_at", int(now)),
                "last_send": max(mark.last_send, now),
                "version": mark.version + 1 if bump else mark.version,
            }
            Variable.set(
                self.key(day),
                json.dumps(record, sort_keys=True),
                description="airflow-provider-stripe-meter: usage of this day was sent to Stripe; "
                "later runs look at Stripe's summaries (once settled) before sending more.",
            )

    def forget_older_than(self, oldest_kept: date, lookback: int = 7) -> None:
        """Remove the marks of the ``lookback`` days before ``oldest_kept`` (past Stripe's window)."""
        from airflow.sdk import Variable

        for offset in range(1, lookback + 1):
            day = oldest_kept - timedelta(days=offset)
            if Variable.get(self.key(day), default=None) is not None:
                Variable.delete(self.key(day))


def _loads(raw: str) -> dict[str, Any]:
    # A mark that cannot be read (edited by hand, written under another Fernet key) still says
    # the day was sent to: the day is looked up, which is always safe.
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _mark(record: dict[str, Any]) -> DayMark:
    # Marks written before versions existed carry only ``marked_at``.
    return DayMark(int(record.get("version", 0)), float(record.get("last_send", record.get("marked_at", 0))))


class LateLandings(_MeterStore):
    """Usage older than Stripe's window that was billed late, by the day its events landed on.

    Late usage is sent at the oldest instant Stripe accepts, so it lands on a day inside the
    window and shows in that day's summaries. This store remembers, per landing day, how much of
    which original day each customer was billed there: later runs subtract it from what they look
    up. One Variable per landing day (``stripe_meter.late.<account>.<meter id>.<prefix>.<day>``)
    holds ``{customer: {original day: value}}``; one per original day (``...late-of...``) holds
    ``{customer: value}``, what of that day was billed late, however long ago.

    Nothing counts as billed late before Stripe answers for it. What is about to be sent is first
    written as *pending* (``...late-pending...``, with the one-minute window the events land in
    and what Stripe's summary showed there before), moved to the records above once Stripe
    accepts it (or answers that it holds it), and dropped if Stripe rejects it. A pending entry
    left by a process that was killed, or whose answer was lost, is settled by the next run from
    Stripe's own summary of that minute (by the batch operator), never assumed.
    """

    def key(self, landing_day: date) -> str:
        """The Variable for ``landing_day``."""
        return self._key("late", landing_day)

    @property
    def pending_key(self) -> str:
        """The Variable of late events sent (or about to be) whose fate Stripe has not told yet."""
        return f"stripe_meter.late-pending.{self.account}.{self.meter_id}.{self.prefix}"

    def pending(self) -> list[dict[str, Any]]:
        """Late events whose fate is not known: ``customer``, ``day``, ``value``, ``identifier``,
        ``at`` (their timestamp), ``baseline`` (the minute's figure before), ``written_at``."""
        from airflow.sdk import Variable

        raw = Variable.get(self.pending_key, default=None)
        return json.loads(raw) if raw else []

    def add_pending(self, entries: list[dict[str, Any]]) -> None:
        """Write ``entries`` as pending, before their events are sent."""
        self._set_pending([*self.pending(), *entries])

    def drop_pending(self, identifiers: Iterable[str]) -> None:
        """Forget the pending entries of ``identifiers`` (settled one way or the other)."""
        gone = set(identifiers)
        self._set_pending([e for e in self.pending() if e["identifier"] not in gone])

    def _set_pending(self, entries: list[dict[str, Any]]) -> None:
        from airflow.sdk import Variable

        if not entries:
            Variable.delete(self.pending_key)
            return
        if not self.used():
            Variable.set(self.used_key, "1", description="airflow-provider-stripe-meter: late billing used.")
        Variable.set(
            self.pending_key,
            json.dumps(entries, sort_keys=True),
            description="airflow-provider-stripe-meter: late usage sent, not yet confirmed by Stripe.",
        )

    def confirm(self, entries: Iterable[dict[str, Any]]) -> None:
        """Count pending ``entries`` as billed (Stripe holds them), and drop them from pending."""
        entries = list(entries)
        by_landing: dict[str, dict[str, dict[str, int]]] = {}
        for entry in entries:
            amounts = by_landing.setdefault(entry["landing_day"], {}).setdefault(entry["customer"], {})
            amounts[entry["day"]] = amounts.get(entry["day"], 0) + int(entry["value"])
        for landing_day, amounts in sorted(by_landing.items()):
            self.add(date.fromisoformat(landing_day), amounts)
        self.drop_pending(e["identifier"] for e in entries)

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
