"""Sending planned events, journalled before the first leaves and after the last answer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING

from airflow_provider_stripe_meter.billing.book import Phase, days_of
from airflow_provider_stripe_meter.billing.meters import COUNT
from airflow_provider_stripe_meter.billing.outcomes import DayOutcome
from airflow_provider_stripe_meter.billing.plans import PlannedEvent
from airflow_provider_stripe_meter.billing.ports import DayMark
from airflow_provider_stripe_meter.utils import clock
from airflow_provider_stripe_meter.utils.delivery import Deliverer, DeliveryReport
from airflow_provider_stripe_meter.utils.rules import SECONDS_PER_DAY, rfc3339

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.billing.meters import MeterSpec
    from airflow_provider_stripe_meter.billing.plans import Key
    from airflow_provider_stripe_meter.billing.ports import Log, StripeMeters
    from airflow_provider_stripe_meter.billing.settings import RunSettings

STREAM_BATCH = 100  # Stripe's maximum events per stream request
PROGRESS_SECONDS = 10.0  # progress lines at least this often on long runs
#: Days a mark is kept past Stripe's 35-day window (no event can reach an older day).
MARK_DAYS = 36


class Sender(Phase):
    """Delivers a run's events and settles each customer-day's outcome from the answers."""

    def deliver_planned(self) -> None:
        """Send every planned event, with the days journalled around it."""
        planned = [day.plan for day in self.book.days.values() if day.plan.events]
        # Marks of days past Stripe's window only: no event can reach those, so no run needs them.
        oldest_kept = datetime.fromtimestamp(self.book.now - MARK_DAYS * SECONDS_PER_DAY, timezone.utc).date()
        for spec in self.book.specs.values():
            self.state.journal(spec.meter_id).forget_older_than(oldest_kept)
            landings = self.state.landings(spec.meter_id)
            if landings.used():
                landings.forget_landed_before(oldest_kept)
        with self.sending(days_of(plan.key for plan in planned)):
            self.send([e for plan in planned for e in plan.events])

    @contextmanager
    def sending(self, days: dict[str, set[date]]) -> Iterator[None]:
        """Journal ``days`` before the first event leaves and again once every answer is in.

        Before: a retry, re-run, hourly run or overlapping run then looks Stripe up first, and
        waits ``summary_lag`` before it trusts what it reads. After: a new version, so the next
        figure of the day gets identifiers of its own. A process killed in between leaves the
        version as it was: its retry derives the same identifiers, and Stripe refuses copies.
        """
        detail = self.settings.sender
        for name, ds in days.items():
            self.state.journal(self.book.specs[name].meter_id).sending(ds, detail, clock.now())
        try:
            yield
        finally:
            for name, ds in days.items():
                used = {d: self.book.version((name, "", d)) for d in ds}
                self.state.journal(self.book.specs[name].meter_id).sent(used, detail, clock.now())
                for day in ds:
                    # The version this run's later sends (confirming) build on.
                    self.book.journal[name][day] = DayMark(used[day] + 1, clock.now())

    def send(self, events: list[PlannedEvent]) -> None:
        """Send ``events`` (through the stream where allowed) and settle each customer-day's outcome."""
        if not events:
            return
        streamed = self.settings.api == "v2_stream"
        stream = [e for e in events if streamed and e.blind]
        single = [e for e in events if not (streamed and e.blind)]
        for batch, api in ((stream, "v2_stream"), (single, "v1")):
            if batch:
                report = self.deliverer(api).run(batch)
                self.book.reports.append(report)
                self._settle(batch, report)

    def deliverer(self, api: str) -> Deliverer[PlannedEvent]:
        """A deliverer of events through ``api`` (``v1``: one a request; ``v2_stream``: 100)."""
        return make_deliverer(api, self.book.specs, self.settings, self.stripe, self.log)

    def _settle(self, events: list[PlannedEvent], report: DeliveryReport) -> None:
        """Each customer-day's outcome from what happened to its events."""
        failed = {id(e) for e in report.failed_items}
        rejected = {e.key for e in report.rejected_items}
        already = {id(e) for e in report.already}
        by_key: dict[Key, list[PlannedEvent]] = {}
        for event in events:
            by_key.setdefault(event.key, []).append(event)
        for key, group in by_key.items():
            day = self.book.days[key]
            if key in rejected:
                day.outcome = DayOutcome.REJECTED
            elif any(id(e) in failed for e in group):
                day.outcome = DayOutcome.FAILED
            elif any(id(e) in already for e in group) and self.book.specs[key[0]].kind != COUNT:
                # Stripe holds an event with this identifier, built on the figure this plan saw;
                # its own value is not known until the summaries show it.
                day.stale = day.plan.recorded or 0
                day.outcome = DayOutcome.UNCONFIRMED
            elif all(id(e) in already for e in group):
                day.outcome = DayOutcome.ALREADY_RECORDED
            else:
                day.outcome = DayOutcome.SENT


def make_deliverer(
    api: str,
    specs: dict[str, MeterSpec],
    settings: RunSettings,
    stripe: StripeMeters,
    log: Log,
    send: Callable[[Callable[[list[PlannedEvent]], None]], Callable[[list[PlannedEvent]], None]]
    | None = None,
) -> Deliverer[PlannedEvent]:
    """A deliverer of planned events through ``api`` (``v1``: one a request; ``v2_stream``: 100).

    ``send`` may wrap the function that sends a batch (the ledger run notes when each answer came).
    """
    delivery = settings.delivery
    sender = _v1(specs, stripe) if api == "v1" else _stream(specs, stripe)
    return Deliverer(
        send(sender) if send else sender,
        key=lambda e: (e.event_name, e.customer_id),
        describe=PlannedEvent.describe,
        batch_size=1 if api == "v1" else STREAM_BATCH,
        max_rps=settings.max_rps,
        concurrency=delivery.concurrency,
        max_attempts=delivery.max_attempts,
        outage_timeout=delivery.outage_timeout.total_seconds(),
        progress=lambda line: log.info("Delivery (%s): %s", api, line),
        progress_every=PROGRESS_SECONDS,
        sample_limit=settings.sample_limit,
    )


def _v1(specs: dict[str, MeterSpec], stripe: StripeMeters) -> Callable[[list[PlannedEvent]], None]:
    def send(batch: list[PlannedEvent]) -> None:
        [event] = batch
        stripe.create_meter_event(event.as_meter_event(), **specs[event.event_name].payload_keys)

    return send


def _stream(specs: dict[str, MeterSpec], stripe: StripeMeters) -> Callable[[list[PlannedEvent]], None]:
    session = stripe.meter_event_stream()

    def send(batch: list[PlannedEvent]) -> None:
        session.send(
            [
                {
                    "event_name": e.event_name,
                    "identifier": e.identifier,
                    "timestamp": rfc3339(e.timestamp),
                    "payload": {
                        specs[e.event_name].customer_key: e.customer_id,
                        specs[e.event_name].value_key: str(e.value),
                    },
                }
                for e in batch
            ]
        )

    return send
