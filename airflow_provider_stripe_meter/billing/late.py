"""Usage older than Stripe's 35-day window, billed once at the oldest instant Stripe accepts.

Only for raw ``sum`` meters (``too_old="bill_at_oldest"``): the event lands on a day inside
the window, and the late-billing records say what landed where, so look-ups of that day take it
off and the usage is never billed twice. Events are written as pending before they leave and
count as billed only once Stripe answers; a later run settles what a killed run left pending
from Stripe's summary of the minute the events landed in.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from datetime import date, datetime, timezone
from itertools import combinations
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.billing.book import CustomerDay, Phase
from airflow_provider_stripe_meter.billing.meters import ADD, MeterSpec, MeterUnsupportedError
from airflow_provider_stripe_meter.billing.outcomes import DayOutcome
from airflow_provider_stripe_meter.billing.plans import PlannedEvent, plan_late
from airflow_provider_stripe_meter.utils import clock
from airflow_provider_stripe_meter.utils.errors import Incomplete

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.billing.lookup import SummaryReader
    from airflow_provider_stripe_meter.billing.plans import Key
    from airflow_provider_stripe_meter.billing.sending import Sender
    from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate

#: Pending late events of one customer and minute settled by trying every subset, at most.
MAX_PENDING_GROUP = 12


class LateBilling(Phase):
    """Plans, sends and settles a run's usage older than Stripe's window."""

    def __init__(self, phase: Phase, reader: SummaryReader, sender: Sender) -> None:
        super().__init__(phase.book, phase.settings, phase.stripe, phase.state, phase.log)
        self.reader, self.sender = reader, sender
        self.oldest = phase.book.now

    def plan(self, late: list[DailyAggregate], oldest: int) -> None:
        """Plan each late customer-day from what of it was billed late before."""
        # A minute inside the window, so the event cannot expire between planning and sending.
        self.oldest = oldest + 60
        names = {a.event_name for a in late}
        for name in names:
            spec = self.book.specs[name]
            if spec.kind != ADD:
                raise MeterUnsupportedError(
                    f"too_old='bill_at_oldest' needs a raw sum meter; meter {spec.meter_id} ({name!r}) "
                    f"aggregates by {spec.formula!r} (event_time_window={spec.event_time_window!r}), where "
                    "a late event would change another day's figure. Use too_old='skip'.",
                    {"type": "meter_unsupported", "meter_id": spec.meter_id},
                )
        billed: dict[Key, int] = {}
        for name in names:
            days = {a.day for a in late if a.event_name == name}
            landings = self.state.landings(self.book.specs[name].meter_id)
            for original, by_customer in landings.billed(days).items():
                billed.update({(name, customer, original): value for customer, value in by_customer.items()})
        for aggregate in late:
            key = (aggregate.event_name, aggregate.customer_id, aggregate.day)
            plan = plan_late(aggregate, billed.get(key, 0), prefix=self.settings.prefix, at=self.oldest)
            self.book.late[key] = CustomerDay(aggregate, plan)

    def send(self) -> None:
        """Send the late events: written as pending first, counted once Stripe answers."""
        events = [e for day in self.book.late.values() for e in day.plan.events]
        if not events:
            return
        at = self._landing_instant(events)
        events = [replace(e, timestamp=at) for e in events]
        for event in events:
            self.book.late[event.key].plan.events = [event]
        entries = self._write_pending(events, at)
        landing = {name: {_day_of(at)} for name in {e.event_name for e in events}}
        with self.sender.sending(landing):
            report = self.sender.deliverer("v1").run(events)
        self.book.reports.append(report)
        failed = {id(e) for e in report.failed_items}
        rejected = {id(e) for e in report.rejected_items}
        already = {id(e) for e in report.already}
        for name in sorted({e.event_name for e in events}):
            landings = self.state.landings(self.book.specs[name].meter_id)
            mine = [e for e in events if e.event_name == name]
            # Answered: Stripe holds it. Rejected: it never landed. Failed: unknown, so it stays
            # pending and the next run settles it from the landing minute's summary.
            landings.confirm(entries[e.identifier] for e in mine if id(e) not in failed | rejected)
            landings.drop_pending(e.identifier for e in mine if id(e) in rejected)
        for event in events:
            self.book.late[event.key].outcome = (
                DayOutcome.FAILED
                if id(event) in failed
                else DayOutcome.REJECTED
                if id(event) in rejected
                else DayOutcome.ALREADY_RECORDED
                if id(event) in already
                else DayOutcome.SENT
            )

    def _write_pending(self, events: list[PlannedEvent], at: int) -> dict[str, dict[str, Any]]:
        """Write ``events`` as pending, with the landing minute's figure before they land."""
        minute = at - at % 60
        entries: dict[str, dict[str, Any]] = {}
        for name in sorted({e.event_name for e in events}):
            spec = self.book.specs[name]
            customers = sorted({e.customer_id for e in events if e.event_name == name})
            # What the landing minute holds before: the settled figure the next run compares
            # with, should this run never learn what became of its events.
            baselines = {
                c: self.stripe.usage_between(spec.meter_id, c, minute, minute + 60) for c in customers
            }
            mine = [
                {
                    "event_name": name,
                    "customer": e.customer_id,
                    "day": e.day.isoformat(),
                    "value": e.value,
                    "identifier": e.identifier,
                    "at": at,
                    "landing_day": _day_of(at).isoformat(),
                    "baseline": baselines[e.customer_id] or 0,
                    "written_at": clock.now(),
                }
                for e in events
                if e.event_name == name
            ]
            self.state.landings(spec.meter_id).add_pending(mine)
            entries.update({str(entry["identifier"]): entry for entry in mine})
        return entries

    def _landing_instant(self, events: list[PlannedEvent]) -> int:
        """The oldest instant Stripe takes, moved to a minute none of this run's other events use.

        The landing minute is how a later run tells whether a pending late event landed, so no
        event of the same customers planned by this run may share it.
        """
        customers = {(e.event_name, e.customer_id) for e in events}
        taken = {
            e.timestamp // 60
            for day in self.book.days.values()
            for e in day.plan.events
            if (e.event_name, e.customer_id) in customers
        }
        at = self.oldest
        while at // 60 in taken:
            at += 60
        return at

    def settle_pending(self, spec: MeterSpec) -> None:
        """Decide, from Stripe's summary of each landing minute, which pending late events landed.

        It reads the summaries once they can be trusted: ``summary_lag`` after this run started
        (an earlier run's events may have landed until it stopped, just before).

        The minute's figure less what it held before the send is what of the pending events
        landed: the combination of them whose values add up to it is counted as billed late,
        the rest is forgotten (and billed again). A figure no combination explains fails the
        run before anything is sent.
        """
        landings = self.state.landings(spec.meter_id)
        pending = landings.pending()
        if not pending:
            return
        # The run that wrote them may have sent them up to the moment it died, which is before
        # this run started: the summaries show them summary_lag after that, not after the write.
        written = max(float(e["written_at"]) for e in pending)
        self.reader.sleep_until(
            max(written, self.book.now) + self.settings.summary_lag, "a cut-off late send"
        )
        groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
        for entry in pending:
            groups[(entry["customer"], int(entry["at"]))].append(entry)
        landed: list[dict[str, Any]] = []
        lost: list[dict[str, Any]] = []
        for (customer, at), group in sorted(groups.items()):
            minute = at - at % 60
            figure = self.stripe.usage_between(spec.meter_id, customer, minute, minute + 60)
            arrived = (figure or 0) - group[0]["baseline"]
            chosen = combination(group, arrived)
            if chosen is None:
                raise Incomplete(
                    f"Cannot tell which late events of {customer} landed: Stripe's figure for the minute "
                    f"{datetime.fromtimestamp(minute, timezone.utc).isoformat()} grew by {arrived}, which no "
                    f"combination of the pending values {[e['value'] for e in group]} explains",
                    {"type": "late_unsettled", "customer_id": customer, "arrived": arrived},
                )
            landed += chosen
            lost += [e for e in group if e not in chosen]
        self.log.info(
            "Late events left pending by an earlier run: %d landed in Stripe, %d did not (sent again)",
            len(landed),
            len(lost),
        )
        self.book.late_settled += len(landed)
        landings.confirm(landed)
        landings.drop_pending(e["identifier"] for e in lost)


def combination(entries: list[dict[str, Any]], total: int) -> list[dict[str, Any]] | None:
    """The smallest combination of ``entries`` whose values add up to ``total`` (first found), or ``None``."""
    if total == 0:
        return []
    if len(entries) > MAX_PENDING_GROUP:
        return entries if sum(e["value"] for e in entries) == total else None
    for size in range(1, len(entries) + 1):
        for chosen in combinations(entries, size):
            if sum(e["value"] for e in chosen) == total:
                return list(chosen)
    return None


def _day_of(seconds: int) -> date:
    """The UTC day of unix ``seconds``."""
    return datetime.fromtimestamp(seconds, timezone.utc).date()
