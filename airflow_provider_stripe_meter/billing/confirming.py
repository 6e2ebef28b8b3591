"""After sending: what a run checks before it calls a customer-day billed."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from airflow_provider_stripe_meter.billing.book import CustomerDay, Phase, days_of
from airflow_provider_stripe_meter.billing.outcomes import IN_STRIPE, Action, DayOutcome
from airflow_provider_stripe_meter.billing.plans import PlannedEvent, plan_day

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.billing.lookup import SummaryReader
    from airflow_provider_stripe_meter.billing.plans import Key
    from airflow_provider_stripe_meter.billing.sending import Sender


class Confirmer(Phase):
    """Settles duplicate answers, checks the meters, and (``confirm="summaries"``) reads back."""

    def __init__(self, phase: Phase, reader: SummaryReader, sender: Sender) -> None:
        super().__init__(phase.book, phase.settings, phase.stripe, phase.state, phase.log)
        self.reader, self.sender = reader, sender

    def settle_duplicates(self) -> None:
        """Wait for the summaries to show what duplicate answers hid, then send what is still missing."""
        book = self.book
        stale = self._stale()
        if not stale:
            return
        deadline = time.monotonic() + self.settings.settle_seconds
        # Our own sends (and the copy Stripe refused) must have had time to show.
        self.reader.await_settled(days_of(stale))
        first = True
        while stale:
            if not first:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(5.0, remaining))
            first = False
            recorded, unknown = self.reader.look_up(set(stale))
            again: list[PlannedEvent] = []
            for key, day in list(stale.items()):
                figure = recorded.get(key, 0)
                if figure == day.plan.expected:
                    del stale[key]
                    day.stale, day.outcome = None, DayOutcome.ALREADY_RECORDED
                elif figure != day.stale:
                    # The summaries moved: plan again from what they show now.
                    del stale[key]
                    day.stale = None
                    day.plan = plan_day(
                        day.aggregate,
                        book.specs[key[0]],
                        figure,
                        prefix=self.settings.prefix,
                        now=book.now,
                        correct_over=self.settings.correct_over,
                        customer_unknown=(key[0], key[1]) in unknown,
                        version=book.version(key),
                    )
                    if day.plan.action == Action.REPORT:
                        day.outcome = day.plan.reported
                    elif day.plan.action == Action.LEAVE_ALONE:
                        day.outcome = DayOutcome.ALREADY_RECORDED
                    again.extend(day.plan.events)
            if again:
                with self.sender.sending(days_of(e.key for e in again)):
                    self.sender.send(again)
            # Sending again may meet duplicate answers of its own.
            stale = self._stale()
        for key, day in stale.items():
            book.samples.add(
                DayOutcome.UNCONFIRMED,
                {
                    "event_name": key[0],
                    "customer_id": key[1],
                    "day": key[2].isoformat(),
                    "expected": day.plan.expected,
                    "reason": "Stripe holds an event for this day that its summaries do not show yet",
                },
            )

    def _stale(self) -> dict[Key, CustomerDay]:
        return {key: day for key, day in self.book.days.items() if day.stale is not None}

    def check_meters(self) -> None:
        """Read each meter sent to once more: Stripe drops events of a meter deactivated meanwhile.

        One request per meter. A meter that is inactive now, or whose last deactivation is not the
        one the run saw when it planned (deactivated and reactivated meanwhile), leaves every
        customer-day sent to it unconfirmed.
        """
        book = self.book
        sent_to = {key[0] for key in book.with_outcome(*IN_STRIPE)}
        sent_to |= {key[0] for key, day in book.late.items() if day.outcome == DayOutcome.SENT}
        for name in sorted(sent_to):
            spec = book.specs[name]
            meter = self.stripe.retrieve_meter(spec.meter_id)
            deactivated_at = (meter.get("status_transitions") or {}).get("deactivated_at")
            if meter.get("status") == "active" and deactivated_at == book.deactivated_at.get(name):
                continue
            book.deactivated.add(name)
            for key in book.with_outcome(DayOutcome.SENT):
                if key[0] != name:
                    continue
                day = book.days[key]
                day.outcome = DayOutcome.UNCONFIRMED
                book.samples.add(
                    DayOutcome.UNCONFIRMED,
                    {
                        "event_name": name,
                        "customer_id": key[1],
                        "day": key[2].isoformat(),
                        "expected": day.plan.expected,
                        "reason": f"meter {spec.meter_id} was deactivated during the run",
                    },
                )

    def read_back(self) -> None:
        """Read back every customer-day sent to, once settled (``confirm="summaries"``)."""
        keys = set(self.book.with_outcome(DayOutcome.SENT))
        if not keys:
            return
        self.reader.await_settled(days_of(keys))
        recorded, unknown = self.reader.look_up(keys)
        for key in keys:
            day = self.book.days[key]
            if (key[0], key[1]) in unknown:
                day.outcome = DayOutcome.CUSTOMER_UNKNOWN
                self.book.samples.add(day.outcome, {**day.plan.line(), "reason": "Stripe does not know it"})
            elif recorded.get(key, 0) == day.plan.expected:
                day.confirmed = True
            else:
                day.outcome = DayOutcome.UNCONFIRMED
                self.book.samples.add(
                    day.outcome,
                    {
                        **day.plan.line(),
                        "recorded_after": recorded.get(key, 0),
                        "reason": "Stripe accepted the events but its settled summary differs",
                    },
                )
