"""Reading what Stripe holds per customer-day, only once its summaries can be trusted."""

from __future__ import annotations

import time
from datetime import date
from typing import TYPE_CHECKING

from airflow_provider_stripe_meter.billing.book import Phase, days_of
from airflow_provider_stripe_meter.utils import clock

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.billing.plans import Key
    from airflow_provider_stripe_meter.billing.ports import DayMark

#: Re-reads of summaries when another run sent to the same days while this one read them.
MAX_REREADS = 3

Figures = tuple[dict["Key", int], set[tuple[str, str]]]


class SummaryReader(Phase):
    """Stripe's figures for customer-days: one summaries request per (meter, customer)."""

    def look_up(self, keys: set[Key]) -> Figures:
        """Stripe's figures for ``keys`` (late usage landed on them taken off), and unknown customers."""
        recorded: dict[Key, int] = {}
        unknown: set[tuple[str, str]] = set()
        by_meter: dict[str, dict[str, list[date]]] = {}
        for name, customer, day in keys:
            by_meter.setdefault(name, {}).setdefault(customer, []).append(day)
        for name, customers in by_meter.items():
            spec = self.book.specs[name]
            days = [day for listed in customers.values() for day in listed]
            found, missing = self.stripe.recorded_per_day(
                spec.meter_id, sorted(customers), min(days), max(days), max_rps=self.settings.read_rps
            )
            self.book.summary_requests += len(customers)
            recorded.update({(name, c, d): v for (c, d), v in found.items()})
            # Late usage billed onto these days (too_old="bill_at_oldest") is not theirs.
            landings = self.state.landings(spec.meter_id)
            landed = landings.read(days) if landings.used() else {}
            for landing_day, by_customer in landed.items():
                for customer, amounts in by_customer.items():
                    key = (name, customer, landing_day)
                    if key in recorded:
                        recorded[key] -= sum(amounts.values())
            unknown.update((name, c) for c in missing)
        self.book.looked_up |= keys
        return recorded, unknown

    def read_settled(self, keys: set[Key]) -> Figures:
        """Stripe's figures for ``keys``, read only once its summaries can be trusted.

        A summary read less than ``summary_lag`` after a send to its day may not show that send
        yet, so the read waits for it. A run that starts sending to one of the days while this
        one reads is caught by reading the journal again afterwards; those days are read again
        once settled.
        """
        journal = self.book.journal
        by_meter = days_of(keys)
        self.await_settled(by_meter)
        recorded, unknown = self.look_up(keys)
        for _ in range(MAX_REREADS):
            moved: dict[str, dict[date, DayMark]] = {}
            for name, days in by_meter.items():
                now_marks = self.state.journal(self.book.specs[name].meter_id).read(days)
                changed = {d: m for d, m in now_marks.items() if m != journal[name].get(d)}
                if changed:
                    moved[name] = changed
                    journal[name].update(changed)
            if not moved:
                break
            again = {k for k in keys if k[2] in moved.get(k[0], {})}
            self.log.info(
                "Another run sent to %d of these customer-days while they were read; reading them again",
                len(again),
            )
            self.await_settled({name: set(marks) for name, marks in moved.items()})
            fresh_figures, fresh_unknown = self.look_up(again)
            for key in again:
                recorded.pop(key, None)
            recorded.update(fresh_figures)
            unknown |= fresh_unknown
        return recorded, unknown

    def await_settled(self, days: dict[str, set[date]]) -> None:
        """Sleep until ``summary_lag`` has passed since the last send (by any run) to ``days``."""
        journal = self.book.journal
        last = max(
            (
                journal[name][d].last_send
                for name, ds in days.items()
                for d in ds
                if d in journal.get(name, {})
            ),
            default=0.0,
        )
        self.sleep_until(last + self.settings.summary_lag, "the last send to these days")

    def sleep_until(self, moment: float, why: str) -> None:
        """Sleep until unix time ``moment``, saying why."""
        wait = moment - clock.now()
        if wait > 0:
            self.log.info("Waiting %.1f s for Stripe's summaries to settle after %s", wait, why)
            time.sleep(wait)
