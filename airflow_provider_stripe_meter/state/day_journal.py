"""The day journal: what this provider has sent to each day, kept in Airflow Variables.

Stripe refuses a repeated identifier for at least 24 hours, and its meter summaries settle
within that time. So a day that ended less than a day ago, and that nothing was ever sent for,
can be billed without looking at Stripe first (the cheap nightly case); any other day is looked
up in Stripe's summaries before anything is sent for it. "Nothing was ever sent for it" is what
this journal knows: a day is marked *before* its first event leaves, so a task retried on another
worker, a re-run, an hourly "day so far" run or a backfill that overlaps last night's run finds
the mark and looks first.

Each mark (one Variable per day, ``stripe_meter.sent.<account>.<meter id>.<prefix>.<day>``)
also says

* ``last_send``: when a run last started sending to the day. Stripe's summaries are eventually
  consistent, so a summary read less than ``summary_lag`` after that may not show those events
  yet: the operator waits until it can trust it.
* ``version``: higher than that of every run that finished sending to the day. It is part of
  every look-up based identifier, so a figure that returns to an earlier value gets a new
  identifier, while a retry of a send cut short (no new version yet) repeats the same one.

Writes are merges (:mod:`.variables`): ``last_send`` only moves later and ``version`` only up,
so two runs marking the same day at once both leave their mark.

Marks are kept until their day is past Stripe's 35-day window and so can receive no more
events (:meth:`SentDays.forget_older_than`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date, timedelta
from typing import Any

from airflow_provider_stripe_meter.billing.ports import DayMark
from airflow_provider_stripe_meter.state.variables import Records

DESCRIPTION = (
    "airflow-provider-stripe-meter: usage of this day was sent to Stripe; later runs look at "
    "Stripe's summaries (once settled) before sending more."
)


class SentDays(Records):
    """The journal of the days sent to, for one (account, meter, identifier prefix)."""

    def day_key(self, day: date) -> str:
        """The Variable that marks ``day``."""
        return self.key("sent", day.isoformat())

    def read(self, days: Iterable[date]) -> dict[date, DayMark]:
        """The marks of those of ``days`` that have been sent to (unmarked days are left out)."""
        found = {}
        for day in sorted(set(days)):
            record = self.get(self.day_key(day))
            if record is not None:
                found[day] = _mark(record)
        return found

    def sending(self, days: Iterable[date], detail: dict[str, Any], now: float) -> None:
        """Before sending to ``days``: mark them, and say when, so a reader knows to let Stripe settle."""
        for day in sorted(set(days)):
            self.merge(self.day_key(day), _marked(detail, now, next_version=0), DESCRIPTION)

    def sent(self, versions: Mapping[date, int], detail: dict[str, Any], now: float) -> None:
        """After every answer is in: each day's version moves past the one its events were sent under."""
        for day, used in sorted(versions.items()):
            self.merge(self.day_key(day), _marked(detail, now, next_version=used + 1), DESCRIPTION)

    def forget_older_than(self, oldest_kept: date, lookback: int = 7) -> None:
        """Remove the marks of the ``lookback`` days before ``oldest_kept`` (past Stripe's window)."""
        for offset in range(1, lookback + 1):
            self.delete(self.day_key(oldest_kept - timedelta(days=offset)))


def _marked(detail: dict[str, Any], now: float, *, next_version: int) -> Any:
    """The merge of one write: later ``last_send``, higher ``version``, first ``marked_at`` kept."""

    def change(record: Any) -> dict[str, Any]:
        current = record if isinstance(record, dict) else {}
        mark = _mark(current)
        return {
            **detail,
            "marked_at": current.get("marked_at", int(now)),
            "last_send": max(mark.last_send, now),
            "version": max(mark.version, next_version),
        }

    return change


def _mark(record: Any) -> DayMark:
    # A mark that cannot be read still says the day was sent to: the day is looked up.
    if not isinstance(record, dict):
        return DayMark(0, 0.0)
    return DayMark(
        int(record.get("version") or 0), float(record.get("last_send") or record.get("marked_at") or 0)
    )
