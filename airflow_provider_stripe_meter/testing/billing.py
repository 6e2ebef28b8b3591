"""Subscriptions, metered prices, billing periods and invoices behind the local server.

What Stripe does with meter events once they are in (docs.stripe.com/billing/subscriptions/usage-based):
a **subscription item** whose price is metered on a meter bills, for each billing period, the
meter's aggregate of the customer's events whose *timestamp* lies in the period. Periods start
at the subscription's ``billing_cycle_anchor`` (any time of day); a monthly period whose anchor
day does not exist in a month ends on that month's last day (anchored on the 31st: Feb 28, then
Mar 31). When a period ends its invoice is a **draft** until ``automatically_finalizes_at`` (the
account's finalization grace period, 1 hour by default, up to 72), then it is locked: an event
stamped in the period and received later is accepted and billed nowhere. A subscription that
ended (``ended_at``) has no later period.

Everything is computed from the events and the clock when asked, so a test that moves the
clock sees invoices draft, then final, exactly as Stripe would show them then.

.. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/configure-grace-period
.. seealso:: https://docs.stripe.com/api/subscriptions/object
"""

from __future__ import annotations

import bisect
import calendar
import itertools
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

#: Stripe's default finalization grace period.
DEFAULT_GRACE = 3600


def add_months(anchor: int, months: int) -> int:
    """``anchor`` plus ``months`` calendar months, the day clamped to the month's last day."""
    moment = datetime.fromtimestamp(anchor, tz=timezone.utc)
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return int(moment.replace(year=year, month=month, day=day).timestamp())


@dataclass
class Price:
    """A recurring metered price on a meter."""

    id: str
    meter_id: str
    interval: str = "month"
    interval_count: int = 1
    unit_amount: int = 1

    def as_object(self) -> dict[str, Any]:
        """The ``price`` object."""
        return {
            "id": self.id,
            "object": "price",
            "active": True,
            "billing_scheme": "per_unit",
            "created": 1_700_000_000,
            "currency": "usd",
            "custom_unit_amount": None,
            "livemode": False,
            "lookup_key": None,
            "metadata": {},
            "nickname": None,
            "product": "prod_local",
            "recurring": {
                "interval": self.interval,
                "interval_count": self.interval_count,
                "meter": self.meter_id,
                "trial_period_days": None,
                "usage_type": "metered",
            },
            "tax_behavior": "unspecified",
            "tiers_mode": None,
            "transform_quantity": None,
            "type": "recurring",
            "unit_amount": self.unit_amount,
            "unit_amount_decimal": str(self.unit_amount),
        }


@dataclass
class Subscription:
    """One customer's subscription with one metered item."""

    id: str
    item_id: str
    customer: str
    price: Price
    start_date: int
    billing_cycle_anchor: int
    #: When it ends (``cancel_at``, or the period end for ``cancel_at_period_end``).
    cancel_at: int | None = None
    created: int = 0
    #: When the API calls that made and changed it happened: (time, event type). Stripe's
    #: ``customer.subscription.*`` events are stamped with these, not with the subscription's dates.
    changes: list[tuple[int, str]] = field(default_factory=list)

    def step(self, start: int, count: int) -> int:
        """The period boundary ``count`` intervals after ``start`` (anchor-based for months)."""
        p = self.price
        if p.interval == "month":
            return add_months(self.billing_cycle_anchor, count * p.interval_count)
        seconds = {"day": 86400, "week": 7 * 86400}[p.interval] * p.interval_count
        return self.billing_cycle_anchor + count * seconds

    def periods(self, until: int) -> list[tuple[int, int]]:
        """Every billing period ``[start, end)`` that began before ``until``, oldest first."""
        out: list[tuple[int, int]] = []
        start = self.start_date
        if start < self.billing_cycle_anchor:
            out.append((start, self.billing_cycle_anchor))  # the prorated first period
            start = self.billing_cycle_anchor
        for k in itertools.count(1):
            if start >= until or (self.cancel_at is not None and start >= self.cancel_at):
                break
            end = self.step(self.billing_cycle_anchor, k)
            if end <= start:
                continue
            out.append((start, end))
            start = end
        if self.cancel_at is not None and out:
            out = [(s, min(e, self.cancel_at)) for s, e in out if s < self.cancel_at]
        return out

    def starts_between(self, lo: int, hi: int) -> list[int]:
        """The instants in ``(lo, hi]`` where a period began (a renewal), found without walking
        every period since the anchor: the first 400 days of starts are worked out once."""
        starts = self.__dict__.get("_starts")
        if starts is None:
            horizon = self.billing_cycle_anchor + 400 * 86400
            starts = self._walk_starts(self.start_date - 1, horizon)
            self.__dict__["_starts"] = (starts, horizon)
        else:
            starts, horizon = starts
        if hi <= horizon:
            found = starts[bisect.bisect_right(starts, lo) : bisect.bisect_right(starts, hi)]
            return [b for b in found if self.cancel_at is None or b < self.cancel_at]
        return self._walk_starts(lo, hi)

    def _walk_starts(self, lo: int, hi: int) -> list[int]:
        out = [self.start_date] if lo < self.start_date <= hi else []
        days = {"month": 31, "week": 7, "day": 1}[self.price.interval] * self.price.interval_count
        k = max(0, (lo - self.billing_cycle_anchor) // (days * 86400))
        while True:
            b = self.step(self.billing_cycle_anchor, k)
            if b > hi or (self.cancel_at is not None and b >= self.cancel_at):
                return out
            if b > lo and b > self.start_date:
                out.append(b)
            k += 1

    def ended_at(self, now: int) -> int | None:
        """When the subscription ended, if it has."""
        return self.cancel_at if self.cancel_at is not None and self.cancel_at <= now else None


#: How far ahead of now the subscription events are worked out (each request bisects by time).
MOMENTS_AHEAD = 3600


@dataclass(frozen=True)
class InvoiceRef:
    """An invoice before its quantity is read: its subscription, period and status."""

    sub: Subscription
    start: int
    end: int
    status: str
    finalizes_at: int

    @property
    def id(self) -> str:
        return f"in_{self.sub.id[4:]}_{self.end}"


@dataclass
class BillingModel:
    """Prices, subscriptions and invoices of one account, read against its meter events."""

    #: The account's :class:`~airflow_provider_stripe_meter.testing.ledger.MeterLedger`.
    ledger: Any
    #: The account's finalization grace period, in seconds (1 hour to 72 hours on Stripe).
    grace: int = DEFAULT_GRACE
    prices: dict[str, Price] = field(default_factory=dict)
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    #: Filtered lists by query, for the pages that follow the first (a benchmark lists 100,000).
    _lists: dict[Any, list[Any]] = field(default_factory=dict)
    #: Every subscription event, newest first, and what they were worked out for.
    _moments: list[Any] = field(default_factory=list)
    _moment_times: list[int] = field(default_factory=list)
    _moments_key: Any = None
    _moments_lock: Any = field(default_factory=threading.Lock)

    def listing(self, query: dict[str, str], build: Any) -> list[Any]:
        """``build()``'s list for ``query`` (its paging left out), kept while nothing changes and
        for the minute it was built."""
        key = (
            tuple(sorted((k, v) for k, v in query.items() if k not in ("starting_after", "limit"))),
            len(self.subscriptions),
            len(self.ledger.events),  # an invoice's quantity moves with every event
            int(self.ledger.clock()) // 60,
        )
        if key not in self._lists:
            if len(self._lists) > 64:
                self._lists.clear()
            self._lists[key] = build()
        return self._lists[key]

    def add_price(self, event_name: str, *, interval: str = "month", interval_count: int = 1) -> Price:
        """A metered price on the meter of ``event_name``."""
        meter = self.ledger.meter_for(event_name)
        if meter is None:
            raise KeyError(event_name)
        price = Price(f"price_local{next(self._ids):04d}", meter.id, interval, interval_count)
        self.prices[price.id] = price
        return price

    def subscribe(
        self,
        customer: str,
        price: Price,
        *,
        anchor: int,
        start: int | None = None,
        cancel_at: int | None = None,
        created_at: int | None = None,
    ) -> Subscription:
        """Subscribe ``customer`` to ``price``, periods starting at ``anchor`` (``start``: when it began).

        ``created_at`` is when the API call happened (default now): its
        ``customer.subscription.created`` event carries that time.
        """
        n = next(self._ids)
        sub = Subscription(
            f"sub_local{n:04d}",
            f"si_local{n:04d}",
            customer,
            price,
            start_date=start if start is not None else anchor,
            billing_cycle_anchor=anchor,
            cancel_at=cancel_at,
            created=start if start is not None else anchor,
        )
        sub.changes.append((int(self.ledger.clock()) if created_at is None else created_at, "created"))
        self.subscriptions[sub.id] = sub
        return sub

    def cancel(self, sub: Subscription, at: int) -> None:
        """Cancel ``sub`` at ``at`` (now or later): a ``customer.subscription.updated`` event now."""
        sub.cancel_at = at  # starts_between() drops the starts from ``at`` on
        sub.changes.append((int(self.ledger.clock()), "updated"))

    def event_moments(self, after: int, upto: int | None = None) -> list[tuple[int, str, Subscription]]:
        """``customer.subscription.*`` events created in ``(after, upto]``, newest first, as (time,
        kind, subscription), not rendered yet (:meth:`event_object` renders one): each call that
        made or changed a subscription, each renewal (a new period began), each end.

        Every subscription's events are worked out once (while nothing changes, within the
        minute) and each request takes its time range from them: a night lists its renewals in
        several slices at once.
        """
        now = self._now()
        top = now if upto is None else min(upto, now)
        every = self._all_moments(now)
        times = self._moment_times
        # ``every`` is newest first; ``times`` holds the negated times, ascending, to bisect.
        lo = bisect.bisect_left(times, -top)
        hi = bisect.bisect_left(times, -after)
        return every[lo:hi]

    def _all_moments(self, now: int) -> list[tuple[int, str, Subscription]]:
        """Every subscription event up to an hour ahead of ``now``, newest first: Stripe stores
        its events as they happen, so they are worked out once (again when a subscription is
        made or changed, or the hour runs out), not per request; a request bisects by time."""
        changes = sum(len(s.changes) for s in self.subscriptions.values())
        with self._moments_lock:
            key = self._moments_key
            if key is None or key[1:] != (len(self.subscriptions), changes) or now > key[0]:
                horizon = now + MOMENTS_AHEAD
                found: list[tuple[int, str, Subscription]] = []
                for sub in self.subscriptions.values():
                    made = sub.changes[0][0] if sub.changes else sub.created
                    found.extend((at, kind, sub) for at, kind in sub.changes if at <= horizon)
                    found.extend((start, "updated", sub) for start in sub.starts_between(made, horizon))
                    ended = sub.ended_at(horizon)
                    if ended is not None:
                        found.append((ended, "deleted", sub))
                found.sort(key=lambda f: f[0], reverse=True)
                self._moments, self._moment_times = found, [-f[0] for f in found]
                self._moments_key = (horizon, len(self.subscriptions), changes)
            return self._moments

    def event_object(self, moment: tuple[int, str, Subscription]) -> dict[str, Any]:
        """One ``event`` object, its subscription as it is now."""
        at, kind, sub = moment
        return {
            "id": f"evt_{sub.id[4:]}_{at}_{kind}",
            "object": "event",
            "type": f"customer.subscription.{kind}",
            "created": at,
            "livemode": False,
            "data": {"object": self.subscription_object(sub)},
        }

    # -- what Stripe shows -----------------------------------------------------------------

    def _now(self) -> int:
        return int(self.ledger.clock())

    def _received_by(self) -> float:
        # Events received within this very second count: receipt times are not whole seconds.
        return float(self.ledger.clock())

    def current_period(self, sub: Subscription, now: int) -> tuple[int, int]:
        """The item's ``current_period_start`` and ``current_period_end`` (the last one, once ended)."""
        periods = sub.periods(now + 1) or [(sub.start_date, sub.step(sub.billing_cycle_anchor, 1))]
        return periods[-1]

    def quantity(self, sub: Subscription, start: int, end: int, received_before: float) -> int:
        """The meter's figure for the customer's events stamped in ``[start, end)``, received in time."""
        meter = next((m for m in self.ledger.meters.values() if m.id == sub.price.meter_id), None)
        if meter is None or meter.status != "active":
            return 0
        with self.ledger.lock:
            events = [
                e
                for e in self.ledger._by_payload.get((meter.event_name, meter.customer_key, sub.customer), [])
                if not e.cancelled
                and not e.dropped
                and start <= e.timestamp < end
                and e.received_at <= received_before
            ]
        return int(self.ledger.aggregate(meter, events))

    def invoices(self, sub: Subscription) -> list[dict[str, Any]]:
        """The subscription's invoices for periods that ended, newest first: draft, then final."""
        return [self.render_invoice(ref) for ref in self.invoice_refs(sub)]

    def invoice_refs(self, sub: Subscription) -> list[InvoiceRef]:
        """What :meth:`invoices` holds, its quantities not read yet (a list renders one page)."""
        now = self._now()
        out = []
        for start, end in sub.periods(now):
            if end > now:
                continue
            finalizes_at = end + self.grace
            out.append(InvoiceRef(sub, start, end, "open" if now >= finalizes_at else "draft", finalizes_at))
        return list(reversed(out))

    def render_invoice(self, ref: InvoiceRef) -> dict[str, Any]:
        """The ``invoice`` object of ``ref``: a final one holds what was received before it finalized."""
        received = ref.finalizes_at if ref.status != "draft" else self._received_by()
        quantity = self.quantity(ref.sub, ref.start, ref.end, received)
        return self._invoice(ref.sub, ref.start, ref.end, quantity, ref.status, ref.finalizes_at)

    def preview(self, sub: Subscription) -> dict[str, Any]:
        """``POST /v1/invoices/create_preview``: the current period's invoice as it stands now."""
        now = self._now()
        start, end = self.current_period(sub, now)
        quantity = self.quantity(sub, start, end, self._received_by())
        invoice = self._invoice(sub, start, end, quantity, "draft", None)
        invoice["id"] = None  # an upcoming invoice has no id
        return invoice

    def _invoice(
        self, sub: Subscription, start: int, end: int, quantity: int, status: str, finalizes_at: int | None
    ) -> dict[str, Any]:
        amount = quantity * sub.price.unit_amount
        invoice_id = f"in_{sub.id[4:]}_{end}"
        line = {
            "id": f"il_{sub.id[4:]}_{end}",
            "object": "line_item",
            "amount": amount,
            "currency": "usd",
            "description": f"{quantity} units",
            "discount_amounts": [],
            "discountable": True,
            "discounts": [],
            "invoice": invoice_id,
            "livemode": False,
            "metadata": {},
            "parent": {
                "type": "subscription_item_details",
                "subscription_item_details": {
                    "subscription": sub.id,
                    "subscription_item": sub.item_id,
                    "proration": False,
                    "invoice_item": None,
                    "proration_details": {"credited_items": None},
                },
                "invoice_item_details": None,
            },
            "period": {"start": start, "end": end},
            "pretax_credit_amounts": [],
            "pricing": {
                "type": "price_details",
                "price_details": {"price": sub.price.id, "product": "prod_local"},
                "unit_amount_decimal": str(sub.price.unit_amount),
            },
            "quantity": quantity,
            "quantity_decimal": str(quantity),
            "subscription": sub.id,
            "subtotal": amount,
            "taxes": [],
        }
        return {
            "id": invoice_id,
            "object": "invoice",
            "automatically_finalizes_at": finalizes_at if status == "draft" else None,
            "billing_reason": "subscription_cycle",
            "created": end,
            "currency": "usd",
            "customer": sub.customer,
            "lines": {
                "object": "list",
                "data": [line],
                "has_more": False,
                "url": f"/v1/invoices/{invoice_id}/lines",
            },
            "livemode": False,
            "parent": {
                "type": "subscription_details",
                "subscription_details": {"subscription": sub.id, "metadata": {}},
                "quote_details": None,
            },
            "period_end": end,
            "period_start": start,
            "status": status,
            "status_transitions": {"finalized_at": (end + self.grace) if status != "draft" else None},
            "subscription": sub.id,
            "subtotal": amount,
            "total": amount,
            "amount_due": amount,
        }

    def subscription_object(self, sub: Subscription) -> dict[str, Any]:
        """The ``subscription`` object, its item embedded (periods on the item, as since 2025-03-31)."""
        now = self._now()
        start, end = self.current_period(sub, now)
        ended = sub.ended_at(now)
        return {
            "id": sub.id,
            "object": "subscription",
            "billing_cycle_anchor": sub.billing_cycle_anchor,
            "cancel_at": sub.cancel_at,
            "cancel_at_period_end": False,
            "canceled_at": sub.cancel_at if ended else None,
            "created": sub.created,
            "currency": "usd",
            "customer": sub.customer,
            "ended_at": ended,
            "items": {
                "object": "list",
                "data": [
                    {
                        "id": sub.item_id,
                        "object": "subscription_item",
                        "created": sub.created,
                        "current_period_start": start,
                        "current_period_end": end,
                        "metadata": {},
                        "price": sub.price.as_object(),
                        "quantity": None,
                        "subscription": sub.id,
                    }
                ],
                "has_more": False,
                "url": f"/v1/subscription_items?subscription={sub.id}",
            },
            "livemode": False,
            "metadata": {},
            "start_date": sub.start_date,
            "status": "canceled" if ended else "active",
        }

    # -- for tests -------------------------------------------------------------------------

    def invoice_quantities(self) -> dict[tuple[str, int, int], tuple[int, str]]:
        """Per (customer, period start, period end): the invoice's quantity and status, every
        period that began so far (the current one as its preview shows it)."""
        now = self._now()
        out: dict[tuple[str, int, int], tuple[int, str]] = {}
        for sub in self.subscriptions.values():
            for invoice in self.invoices(sub):
                out[(sub.customer, invoice["period_start"], invoice["period_end"])] = (
                    invoice["lines"]["data"][0]["quantity"],
                    invoice["status"],
                )
            if sub.ended_at(now) is None:
                preview = self.preview(sub)
                out[(sub.customer, preview["period_start"], preview["period_end"])] = (
                    preview["lines"]["data"][0]["quantity"],
                    "upcoming",
                )
        return out
