"""Before planning: settle the ledger rows an earlier run left open.

A run killed between writing a row and learning Stripe's answer leaves it ``pending``; a run
that saw its meter deactivated, or read back a figure that differed, leaves ``unverified`` rows;
a cancel cut short leaves ``cancelling``. Each is settled the cheapest exact way:

* ``pending`` while Stripe still refuses a repeat of its identifier: sent again under the same
  identifier. Stripe either takes it now or says it holds it; either way it is ``accepted``.
* ``cancelling``: cancelled again (a cancel of a cancelled event changes nothing).
* ``unverified``, and ``pending`` older than the identifier window: read from Stripe's meter
  event summaries, once they have had ``summary_lag`` to settle, per (customer, day the events
  were stamped in). The events of one customer reach Stripe one at a time, so those that landed
  are the first ones answered: the ledger takes the first ``k`` whose total makes Stripe's
  figure, and marks the rest ``dropped`` (billed nowhere; the plan sends their usage again).
  A figure no ``k`` explains stays open and is reported: something else sends to this meter.

.. seealso:: https://docs.stripe.com/api/billing/meter-event-summary/list
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.billing.meters import ADD, COUNT
from airflow_provider_stripe_meter.billing.plans import PlannedEvent, day_end
from airflow_provider_stripe_meter.billing.settings import FRESH_MARGIN
from airflow_provider_stripe_meter.ledger.entries import (
    ACCEPTED,
    CANCELLED,
    CANCELLING,
    DROPPED,
    LIVE,
    PENDING,
    REJECTED,
    Entry,
)
from airflow_provider_stripe_meter.utils import clock
from airflow_provider_stripe_meter.utils.errors import Rejected

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.billing.meters import MeterSpec
    from airflow_provider_stripe_meter.billing.run import BillingRun

Change = tuple[str, str, float | None, str]


def stamp_day(stamp: int) -> date:
    """The UTC day an event stamped at ``stamp`` counts in."""
    return datetime.fromtimestamp(stamp, timezone.utc).date()


class Settler:
    """Settles one meter's open rows for a :class:`~.ledger_run.BillingRun`."""

    def __init__(self, run: BillingRun, spec: MeterSpec) -> None:
        self.run, self.spec = run, spec
        self.ledger, self.account = run.ledger, run.account
        #: How many open rows were settled, and how many could not be.
        self.settled = 0
        self.unsettled: list[Entry] = []

    def settle(self) -> None:
        """Settle every open row of the meter (of any earlier run)."""
        open_rows = [e for e in self.ledger.open_entries(self.account, self.spec.meter_id)]
        if not open_rows:
            return
        self.run.log.info("Settling %d ledger rows earlier runs left open", len(open_rows))
        window = self.run.settings.timing.identifier_window
        now = clock.now()
        resend, cancel, read = [], [], []
        for entry in open_rows:
            if entry.state == CANCELLING:
                cancel.append(entry)
            elif (
                entry.state == PENDING
                and window is not None
                and now - entry.sent_at < (window - FRESH_MARGIN).total_seconds()
            ):
                resend.append(entry)
            else:
                read.append(entry)
        self._cancel(cancel)
        self._resend(resend)
        self._read(read)

    def _cancel(self, entries: list[Entry]) -> None:
        changes: list[Change] = []
        for entry in entries:
            try:
                self.run.stripe.cancel_meter_event(entry.event_name, entry.identifier)
                changes.append((entry.identifier, CANCELLED, clock.now(), "cancelled"))
            except Rejected as err:
                # Past Stripe's 24 hours: the event stands, and the plan reports the day over.
                changes.append(
                    (entry.identifier, ACCEPTED, entry.answered_at, f"cancel refused: {err}"[:250])
                )
        self.ledger.resolve(self.account, changes)
        self.settled += len(changes)

    def _resend(self, entries: list[Entry]) -> None:
        if not entries:
            return
        events = [
            PlannedEvent(
                e.event_name, e.customer_id, e.day, e.value, e.identifier, e.stamp, e.seq, e.source_at
            )
            for e in entries
        ]
        changes, failed = self.run.deliver(events)
        self.ledger.resolve(self.account, changes)
        self.settled += len(changes)
        self.unsettled.extend(e for e in entries if e.identifier in failed)

    def _read(self, entries: list[Entry]) -> None:
        """Settle ``entries`` from Stripe's summaries (see the module's docstring)."""
        if not entries:
            return
        run = self.run
        if not wait_for_summaries(run, max((e.answered_at or e.sent_at) for e in entries)):
            self.unsettled.extend(entries)
            return
        customers = sorted({e.customer_id for e in entries})
        days = sorted({stamp_day(e.stamp) for e in entries})
        found, unknown = run.stripe.recorded_per_day(
            self.spec.meter_id, customers, days[0], days[-1], max_rps=run.settings.read_rps
        )
        run.book.summary_requests += len(customers)
        start, end = day_end(days[0]) - 86400, day_end(days[-1])
        others = [
            e
            for e in self.ledger.entries_stamped(self.account, self.spec.meter_id, customers, start, end)
            if e.state in LIVE and e.identifier not in {x.identifier for x in entries}
        ]
        certain: dict[tuple[str, date], list[Entry]] = defaultdict(list)
        for entry in others:
            certain[(entry.customer_id, stamp_day(entry.stamp))].append(entry)
        groups: dict[tuple[str, date], list[Entry]] = defaultdict(list)
        for entry in entries:
            groups[(entry.customer_id, stamp_day(entry.stamp))].append(entry)
        changes: list[Change] = []
        now = clock.now()
        for (customer, day), group in groups.items():
            group.sort(key=lambda e: (e.answered_at or e.sent_at, e.seq))
            if customer in unknown:
                changes += [(e.identifier, DROPPED, now, "customer unknown to Stripe") for e in group]
                continue
            landed = self._landed(group, certain[(customer, day)], found.get((customer, day), 0))
            if landed is None:
                self.unsettled.extend(group)
                continue
            changes += [
                (e.identifier, ACCEPTED, e.answered_at or now, "settled from summaries")
                for e in group[:landed]
            ]
            changes += [(e.identifier, DROPPED, now, "not in Stripe's summaries") for e in group[landed:]]
        self.ledger.resolve(self.account, changes)
        self.settled += len(changes)

    def _landed(self, group: list[Entry], certain: list[Entry], stripe_figure: int) -> int | None:
        """How many of ``group`` (in the order Stripe took them) landed, given Stripe's figure."""
        kind = self.spec.kind
        if kind == COUNT:
            landed = stripe_figure - len(certain)
            return landed if 0 <= landed <= len(group) else None
        if kind == ADD:
            total = sum(e.value for e in certain)
            for landed in range(len(group) + 1):
                if total == stripe_figure:
                    return landed
                if landed < len(group):
                    total += group[landed].value
            return None
        # The newest event decides: all landed if Stripe shows the newest open one's figure;
        # otherwise none is counted (sending the figure again changes nothing if one did land).
        newest = max(group, key=lambda e: (e.stamp, e.seq))
        return len(group) if newest.value == stripe_figure else 0


def wait_for_summaries(run: BillingRun, latest: float) -> bool:
    """Sleep until Stripe's summaries show what was answered at ``latest`` (``summary_lag`` on).

    ``False`` without sleeping when that is further away than ``settle_timeout``: the caller
    leaves the rows open for a later run.
    """
    wait = latest + run.settings.summary_lag - clock.now()
    if wait > run.settings.settle_seconds:
        return False
    if wait > 0:
        run.log.info("Waiting %.1f s for Stripe's summaries to show the events in question", wait)
        time.sleep(wait)
    return True


def stripe_view(spec: MeterSpec, entries: list[Entry]) -> int:
    """What Stripe bills for live ``entries`` stamped in one day, by the meter's formula."""
    live = [e for e in entries if e.state in LIVE]
    if spec.kind == ADD:
        return sum(e.value for e in live)
    if spec.kind == COUNT:
        return len(live)
    if not live:
        return 0
    if spec.event_time_window is None:
        return max(live, key=lambda e: (e.stamp, e.seq)).value
    return max(live, key=lambda e: (e.answered_at or e.sent_at, e.seq)).value


def resolved_states(
    events: list[PlannedEvent], answered: dict[int, float], rejected: set[int], failed: set[int]
) -> tuple[list[Change], set[str]]:
    """Ledger changes from a delivery: answered events are accepted, rejected ones rejected.

    Failed events stay ``pending`` (no change): the next run sends them again under the same
    identifier. Returns the changes and the identifiers that failed.
    """
    changes: list[Change] = []
    failed_ids: set[str] = set()
    for event in events:
        if id(event) in failed:
            failed_ids.add(event.identifier)
        elif id(event) in rejected:
            changes.append((event.identifier, REJECTED, answered.get(id(event)), "rejected by Stripe"))
        else:
            changes.append((event.identifier, ACCEPTED, answered.get(id(event), clock.now()), ""))
    return changes, failed_ids


def describe(entry: Entry) -> dict[str, Any]:
    """A JSON-safe sample of a ledger row."""
    return {
        "event_name": entry.event_name,
        "customer_id": entry.customer_id,
        "day": entry.day.isoformat(),
        "identifier": entry.identifier,
        "value": entry.value,
        "state": entry.state,
    }
