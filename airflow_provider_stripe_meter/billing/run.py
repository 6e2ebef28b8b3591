"""One billing run, top to bottom: read the meters, plan, deliver, confirm, report.

Exactly once, whatever the history of runs: the source's figure for each customer-day is
computed with the meter's own formula (:mod:`.plans`). A day that ended less than
``identifier_window`` ago and was never sent for is sent straight away, protected by Stripe's
identifier rule; every other day is first looked up in Stripe's meter event summaries, once
they can be trusted (:mod:`.lookup`), and only the difference is sent, under an identifier that
names what it builds on (:mod:`.sending`). After the last answer the run confirms
(:mod:`.confirming`): duplicate answers are settled from the summaries, every meter sent to is
read again (Stripe drops events of a meter deactivated meanwhile), and with
``confirm="summaries"`` every customer-day sent to is read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from airflow_provider_stripe_meter.billing.book import CustomerDay, Phase, RunBook
from airflow_provider_stripe_meter.billing.confirming import Confirmer
from airflow_provider_stripe_meter.billing.late import LateBilling
from airflow_provider_stripe_meter.billing.lookup import SummaryReader
from airflow_provider_stripe_meter.billing.meters import COUNT, MeterUnsupportedError, meter_spec
from airflow_provider_stripe_meter.billing.plans import Key, is_fresh, plan_day
from airflow_provider_stripe_meter.billing.result import BatchResult, SourceFigures, summarize
from airflow_provider_stripe_meter.billing.sending import Sender
from airflow_provider_stripe_meter.billing.settings import FRESH_MARGIN

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.billing.ports import Log, RunState, StripeMeters
    from airflow_provider_stripe_meter.billing.settings import RunSettings
    from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate

#: Events a run may plan for count meters (one event per row) before it refuses to start.
MAX_COUNT_EVENTS = 1_000_000


@dataclass(frozen=True)
class Usage:
    """What the source holds, aggregated per (event name, customer, UTC day)."""

    aggregates: list[DailyAggregate]
    source: SourceFigures
    #: Customer-days older than Stripe's window (``too_old="bill_at_oldest"``).
    late: tuple[DailyAggregate, ...] = ()
    #: The oldest instant Stripe still accepts, as the source was read.
    oldest: int = 0


class BillingRun:
    """One run of the batch operator, in plain Python: Stripe and the state come in as ports."""

    def __init__(
        self,
        settings: RunSettings,
        stripe: StripeMeters,
        state: RunState,
        log: Log,
        now: int,
    ) -> None:
        self.settings, self.stripe, self.state, self.log = settings, stripe, state, log
        self.book = RunBook(now=now, sample_limit=settings.sample_limit)
        sees = (self.book, settings, stripe, state, log)
        phase = Phase(*sees)
        self.reader = SummaryReader(*sees)
        self.sender = Sender(*sees)
        self.late = LateBilling(phase, self.reader, self.sender)
        self.confirmer = Confirmer(phase, self.reader, self.sender)

    def execute(self, usage: Usage) -> BatchResult:
        """Bill ``usage``: read -> plan -> deliver -> confirm -> result."""
        if usage.aggregates or usage.late:
            self.read_meters({a.event_name for a in [*usage.aggregates, *usage.late]})
            self.plan(usage)
            if not self.settings.dry_run:
                self.sender.deliver_planned()
                self.late.send()
                self.confirmer.settle_duplicates()
                self.confirmer.check_meters()
                if self.settings.confirm == "summaries":
                    self.confirmer.read_back()
        return summarize(self.book, self.settings, usage.source)

    def read_meters(self, event_names: set[str]) -> None:
        """Each meter's settings; an unknown or inactive meter fails before anything is sent."""
        for name in sorted(event_names):
            meter = self.stripe.active_meter(name)
            self.book.deactivated_at[name] = (meter.get("status_transitions") or {}).get("deactivated_at")
            self.book.specs[name] = meter_spec(
                meter,
                customer_key=self.settings.customer_payload_key,
                value_key=self.settings.value_payload_key,
            )

    def plan(self, usage: Usage) -> None:
        """Look up the days that need it, and plan every customer-day."""
        book = self.book
        count_events = sum(a.rows for a in usage.aggregates if book.specs[a.event_name].kind == COUNT)
        if count_events > MAX_COUNT_EVENTS:
            raise MeterUnsupportedError(
                f"{count_events} rows on count meters would be {count_events} events (one per row), over "
                f"the {MAX_COUNT_EVENTS} a run sends; count rows in SQL and bill them on a sum meter",
                {"type": "meter_unsupported", "count_events": count_events},
            )
        aggregates = {(a.event_name, a.customer_id, a.day): a for a in usage.aggregates}
        for name, spec in book.specs.items():
            book.journal[name] = self.state.journal(spec.meter_id).read(
                k[2] for k in aggregates if k[0] == name
            )
            if self.state.landings(spec.meter_id).used():
                # Late events whose fate a killed or cut-off run never learnt: settled from
                # Stripe before anything reads the days they landed on.
                self.late.settle_pending(spec)
        if usage.late:
            self.late.plan(list(usage.late), usage.oldest)
        to_look_up = self._days_to_look_up(aggregates)
        recorded, unknown = self.reader.read_settled(to_look_up)
        for key, aggregate in aggregates.items():
            looked = key in to_look_up
            plan = plan_day(
                aggregate,
                book.specs[key[0]],
                recorded.get(key, 0) if looked else None,
                prefix=self.settings.prefix,
                now=book.now,
                correct_over=self.settings.correct_over,
                customer_unknown=looked and (key[0], key[1]) in unknown,
                version=book.version(key),
            )
            book.days[key] = CustomerDay(aggregate, plan)

    def _days_to_look_up(self, aggregates: dict[Key, DailyAggregate]) -> set[Key]:
        """Customer-days whose Stripe figure must be read before sending: old, or marked as sent."""
        window = self.settings.timing.identifier_window
        if window is None:
            return set(aggregates)  # nothing sent blind: every day is looked up
        fresh_days = {key[2] for key in aggregates if is_fresh(key[2], self.book.now, window - FRESH_MARGIN)}
        journal = self.book.journal
        return {key for key in aggregates if key[2] not in fresh_days or key[2] in journal[key[0]]}
