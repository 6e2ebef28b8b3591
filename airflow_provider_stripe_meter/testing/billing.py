"""Subscriptions, metered prices, billing periods and invoices behind the local server.

What Stripe does with meter events once they are in (docs.stripe.com/billing/subscriptions/usage-based):
a **subscription item** whose price is metered on a meter bills, for each billing period, the
meter's aggregate of the customer's events whose *timestamp* lies in the period. Periods start
at the subscription's ``billing_cycle_anchor`` (any time of day); a monthly period whose anchor
day does not exist in a month ends on that month's last day (anchored on the 31st: Feb 28, then
Mar 31). When a period ends its invoice is a **draft** until ``automatically_finalizes_at`` (the
account's finalization grace period, 1 hour by default, up to 72; it moves when finalization is
postponed, and is null when ``auto_advance`` is off), then it is locked: an event stamped in the
period and received later is accepted and billed nowhere. A subscription that ended
(``ended_at``) has no later period.

Objects are rendered as stripe-python 16.1.0 types them for API version ``2026-10-28.endive``
(every field its typed classes declare always present, none they do not declare): since
2025-03-31.basil an invoice names its subscription under ``parent.subscription_details`` and a
line its price under ``pricing.price_details`` (docs.stripe.com/changelog/basil/2025-03-31/
adds-new-parent-field-to-invoicing-objects). Events render their subscription as it was when
they happened, at the account's default API version of that time
(docs.stripe.com/upgrades#how-api-versions-affect-events).

Everything is computed from the events and the clock when asked, so a test that moves the
clock sees invoices draft, then final, exactly as Stripe would show them then.

.. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/configure-grace-period
.. seealso:: https://docs.stripe.com/api/subscriptions/object
.. seealso:: https://docs.stripe.com/api/invoices/object
"""

from __future__ import annotations

import bisect
import calendar
import dataclasses
import itertools
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from operator import attrgetter
from typing import Any

#: Stripe's default finalization grace period.
DEFAULT_GRACE = 3600
#: The API version stripe-python 16.1.0 pins, and the account's default unless a test changes it.
PINNED_API_VERSION = "2026-10-28.endive"
#: The version that moved ``current_period_*`` from the subscription to its items
#: (docs.stripe.com/changelog/basil/2025-03-31/deprecate-subscription-current-period-start-and-end).
BASIL = "2025-03-31.basil"
#: Stripe keeps events for 30 days (docs.stripe.com/api/events/list).
EVENT_RETENTION = 30 * 86400
#: ``GET /v1/events`` takes at most this many ``types`` (docs.stripe.com/api/events/list).
MAX_EVENT_TYPES = 20
#: An invoice embeds this many lines; the rest come from ``GET /v1/invoices/{id}/lines``
#: (docs.stripe.com/api/invoices/object#invoice_object-lines).
EMBEDDED_LINES = 10
#: A one-off draft with ``auto_advance`` finalizes about an hour after it is created
#: (docs.stripe.com/invoicing/integration/automatic-advancement-collection).
ONE_OFF_FINALIZE_AFTER = 3600


def add_months(anchor: int, months: int) -> int:
    """``anchor`` plus ``months`` calendar months, the day clamped to the month's last day."""
    moment = datetime.fromtimestamp(anchor, tz=timezone.utc)
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return int(moment.replace(year=year, month=month, day=day).timestamp())


def version_before(version: str, other: str) -> bool:
    """Whether API ``version`` is older than ``other`` (versions start with their release date)."""
    return version[:10] < other[:10]


# Fields Stripe sends that this model has nothing to say about: the values a plain test-mode
# account has (Stripe's own example objects, stripe/openapi fixtures3.json). Read-only: every
# object shares them, and they are only ever serialized.
_PRICE_FIXED: dict[str, Any] = {
    "object": "price",
    "billing_scheme": "per_unit",
    "currency": "usd",
    "custom_unit_amount": None,
    "livemode": False,
    "lookup_key": None,
    "metadata": {},
    "nickname": None,
    "product": "prod_local",
    "tax_behavior": "unspecified",
    "tiers_mode": None,
    "transform_quantity": None,
    "type": "recurring",
}
_SUBSCRIPTION_FIXED: dict[str, Any] = {
    "object": "subscription",
    "application": None,
    "application_fee_percent": None,
    "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
    "billing_cycle_anchor_config": None,
    "billing_mode": {"flexible": None, "type": "classic", "updated_at": None},
    "billing_schedules": [],
    "billing_thresholds": None,
    "cancel_at_period_end": False,
    "collection_method": "charge_automatically",
    "currency": "usd",
    "customer_account": None,
    "days_until_due": None,
    "default_payment_method": None,
    "default_source": None,
    "default_tax_rates": [],
    "description": None,
    "discounts": [],
    "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
    "latest_invoice": None,
    "livemode": False,
    "metadata": {},
    "next_pending_invoice_item_invoice": None,
    "on_behalf_of": None,
    "pause_collection": None,
    "payment_settings": {
        "payment_method_options": None,
        "payment_method_types": None,
        "save_default_payment_method": "off",
    },
    "pending_invoice_item_interval": None,
    "pending_setup_intent": None,
    "pending_update": None,
    "schedule": None,
    "test_clock": None,
    "transfer_data": None,
    "trial_end": None,
    "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
    "trial_start": None,
}
_ITEM_FIXED: dict[str, Any] = {
    "object": "subscription_item",
    "billing_thresholds": None,
    "discounts": [],
    "metadata": {},
    "tax_rates": [],
}
_INVOICE_FIXED: dict[str, Any] = {
    "object": "invoice",
    "account_country": "US",
    "account_name": "Local Stripe",
    "account_tax_ids": None,
    "amount_overpaid": 0,
    "amount_paid": 0,
    "amount_shipping": 0,
    "application": None,
    "attempt_count": 0,
    "attempted": False,
    "automatic_tax": {
        "disabled_reason": None,
        "enabled": False,
        "liability": None,
        "provider": None,
        "status": None,
    },
    "collection_method": "charge_automatically",
    "currency": "usd",
    "custom_fields": None,
    "customer_account": None,
    "customer_address": None,
    "customer_email": None,
    "customer_name": None,
    "customer_phone": None,
    "customer_shipping": None,
    "customer_tax_exempt": "none",
    "customer_tax_ids": [],
    "default_payment_method": None,
    "default_source": None,
    "default_tax_rates": [],
    "description": None,
    "discounts": [],
    "due_date": None,
    "ending_balance": None,
    "footer": None,
    "from_invoice": None,
    "hosted_invoice_url": None,
    "invoice_pdf": None,
    "issuer": {"type": "self"},
    "last_finalization_error": None,
    "latest_revision": None,
    "livemode": False,
    "metadata": {},
    "on_behalf_of": None,
    "payment_settings": {
        "default_mandate": None,
        "payment_method_options": None,
        "payment_method_types": None,
    },
    "post_payment_credit_notes_amount": 0,
    "pre_payment_credit_notes_amount": 0,
    "receipt_number": None,
    "rendering": None,
    "shipping_cost": None,
    "shipping_details": None,
    "starting_balance": 0,
    "statement_descriptor": None,
    "test_clock": None,
    "total_discount_amounts": [],
    "total_pretax_credit_amounts": [],
    "total_taxes": [],
}
_LINE_FIXED: dict[str, Any] = {
    "object": "line_item",
    "currency": "usd",
    "discount_amounts": [],
    "discountable": True,
    "discounts": [],
    "livemode": False,
    "metadata": {},
    "pretax_credit_amounts": [],
    "taxes": [],
}


@dataclass
class Price:
    """A recurring price: metered on a meter (``meter_id``), or licensed (a seat, billed in advance)."""

    id: str
    meter_id: str | None
    interval: str = "month"
    interval_count: int = 1
    unit_amount: int = 1
    #: ``metered`` (billed in arrears from the meter) or ``licensed`` (a quantity, in advance).
    usage_type: str = "metered"
    #: An archived price (``active=false``) still bills the subscriptions already on it
    #: (docs.stripe.com/products-prices/manage-prices#archive-price).
    active: bool = True
    created: int = 1_700_000_000

    def as_object(self) -> dict[str, Any]:
        """The ``price`` object."""
        return {
            **_PRICE_FIXED,
            "id": self.id,
            "active": self.active,
            "created": self.created,
            "recurring": {
                "interval": self.interval,
                "interval_count": self.interval_count,
                "meter": self.meter_id,
                "trial_period_days": None,
                "usage_type": self.usage_type,
            },
            "unit_amount": self.unit_amount,
            "unit_amount_decimal": str(self.unit_amount),
        }

    def plan_object(self) -> dict[str, Any]:
        """The legacy ``plan`` a subscription item still carries beside its price."""
        return {
            "id": self.id,
            "object": "plan",
            "active": self.active,
            "amount": self.unit_amount,
            "amount_decimal": str(self.unit_amount),
            "billing_scheme": "per_unit",
            "created": self.created,
            "currency": "usd",
            "interval": self.interval,
            "interval_count": self.interval_count,
            "livemode": False,
            "metadata": {},
            "meter": self.meter_id,
            "nickname": None,
            "product": "prod_local",
            "tiers_mode": None,
            "transform_usage": None,
            "trial_period_days": None,
            "usage_type": self.usage_type,
        }


@dataclass
class Subscription:
    """One customer's subscription: one metered item, and ``other_lines`` licensed items before it."""

    id: str
    item_id: str
    customer: str
    price: Price
    start_date: int
    billing_cycle_anchor: int
    #: When it ends (``cancel_at``, or the period end for ``cancel_at_period_end``).
    cancel_at: int | None = None
    #: When the API call that made it happened (Stripe's ``created``; ``start_date`` may be earlier).
    created: int = 0
    #: When the API calls that made and changed it happened: (time, event type). Stripe's
    #: ``customer.subscription.*`` events are stamped with these, not with the subscription's dates.
    changes: list[tuple[int, str]] = field(default_factory=list)
    #: Licensed (seat) items billed on every invoice and preview BEFORE the metered line, so
    #: that with 10 of them the metered line is only reached through the lines endpoint.
    other_lines: int = 0
    #: Every ``cancel_at`` it had: (when it was set, value), oldest first; events render the one
    #: in force at their time.
    cancel_history: list[tuple[int, int | None]] = field(default_factory=list)

    def as_of(self, at: int) -> Subscription:
        """This subscription as it was at ``at`` (the ``cancel_at`` then in force)."""
        cancel_at = self.cancel_history[0][1] if self.cancel_history else self.cancel_at
        for when, value in self.cancel_history:
            if when <= at:
                cancel_at = value
        if cancel_at == self.cancel_at:
            return self
        return dataclasses.replace(self, cancel_at=cancel_at)

    def canceled_at(self, at: int) -> int | None:
        """When the cancellation in force at ``at`` was asked for (Stripe's ``canceled_at``)."""
        found = None
        for when, value in self.cancel_history:
            if when <= at:
                found = when if value is not None else None
        return found

    def licensed_item_ids(self) -> list[str]:
        """The ids of the ``other_lines`` licensed items."""
        return [f"{self.item_id}_l{k}" for k in range(self.other_lines)]

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

    def next_end(self, end: int) -> int:
        """The end of the period that begins at ``end`` (a licensed line bills it in advance)."""
        for start, stop in self.periods(end + 1):
            if start == end:
                return stop
        return end

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

#: The event type of each kind of subscription moment (a renewal is an ``updated`` event).
EVENT_TYPES = {
    "created": "customer.subscription.created",
    "updated": "customer.subscription.updated",
    "renewed": "customer.subscription.updated",
    "deleted": "customer.subscription.deleted",
}


@dataclass
class DraftControl:
    """How one cycle invoice finalizes, when a test changed it (:meth:`BillingModel.postpone` ...)."""

    finalizes_at: int | None
    auto_advance: bool = True
    #: When it was finalized by hand (``POST /v1/invoices/{id}/finalize``).
    finalized_at: int | None = None


@dataclass(frozen=True)
class InvoiceRef:
    """A subscription-cycle invoice before its quantity is read: its subscription, period and state."""

    sub: Subscription
    start: int
    end: int
    status: str
    #: ``automatically_finalizes_at`` while it is a draft (``None``: it waits for a hand).
    finalizes_at: int | None
    #: When it was finalized (``None`` while a draft).
    finalized_at: int | None = None
    auto_advance: bool = True

    @property
    def id(self) -> str:
        return f"in_{self.sub.id[4:]}_{self.end}"

    @property
    def created(self) -> int:
        # A cycle's invoice is made when its period ends.
        return self.end

    @property
    def customer(self) -> str:
        return self.sub.customer


@dataclass
class OtherInvoice:
    """A draft of another kind than a cycle's (``manual``, ``subscription_update``, ...)."""

    id: str
    customer: str
    billing_reason: str
    sub: Subscription | None
    created: int
    finalizes_at: int | None
    auto_advance: bool

    def status_at(self, now: int) -> str:
        """``draft`` until it finalizes, then ``open``."""
        if self.auto_advance and self.finalizes_at is not None and self.finalizes_at <= now:
            return "open"
        return "draft"

    @property
    def start(self) -> int:
        return self.created

    @property
    def end(self) -> int:
        return self.created


@dataclass
class BillingModel:
    """Prices, subscriptions and invoices of one account, read against its meter events."""

    #: The account's :class:`~airflow_provider_stripe_meter.testing.ledger.MeterLedger`.
    ledger: Any
    #: The account's finalization grace period, in seconds (1 hour to 72 hours on Stripe).
    grace: int = DEFAULT_GRACE
    #: The account's default API version now: events created from now on are rendered at it.
    account_api_version: str = PINNED_API_VERSION
    prices: dict[str, Price] = field(default_factory=dict)
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    #: Drafts of other kinds than a cycle's, by id (:meth:`add_draft`).
    other_invoices: dict[str, OtherInvoice] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    #: Cycle invoices whose finalization a test changed, by (subscription id, period end).
    _controls: dict[tuple[str, int], DraftControl] = field(default_factory=dict)
    #: Earlier default API versions: (until when, version), from :meth:`set_account_api_version`.
    _earlier_versions: list[tuple[int, str]] = field(default_factory=list)
    #: Bumped by every change the cached lists cannot see otherwise (a control, an archive).
    _generation: int = 0
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
            tuple(
                sorted(
                    (k, v) for k, v in query.items() if k not in ("starting_after", "ending_before", "limit")
                )
            ),
            len(self.subscriptions),
            len(self.other_invoices),
            self._generation,
            len(self.ledger.events),  # an invoice's quantity moves with every event
            int(self.ledger.clock()) // 60,
        )
        if key not in self._lists:
            if len(self._lists) > 64:
                self._lists.clear()
            self._lists[key] = build()
        return self._lists[key]

    # -- what tests set up -----------------------------------------------------------------

    def add_price(self, event_name: str, *, interval: str = "month", interval_count: int = 1) -> Price:
        """A metered price on the meter of ``event_name``."""
        meter = self.ledger.meter_for(event_name)
        if meter is None:
            raise KeyError(event_name)
        price = Price(
            f"price_local{next(self._ids):04d}", meter.id, interval, interval_count, created=self._now()
        )
        self.prices[price.id] = price
        return price

    def licensed_price(self) -> Price:
        """The account's licensed (seat) price, made on first use: the other lines bill it."""
        price = self.prices.get("price_localseat")
        if price is None:
            price = Price(
                "price_localseat", None, unit_amount=1000, usage_type="licensed", created=self._now()
            )
            self.prices[price.id] = price
        return price

    def archive(self, price: Price) -> None:
        """Archive ``price`` (``active=false``): its subscriptions keep billing on it, as on Stripe
        (docs.stripe.com/products-prices/manage-prices#archive-price)."""
        price.active = False
        self._generation += 1

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

        ``created_at`` is when the API call happened (default now): the subscription's
        ``created`` and its ``customer.subscription.created`` event carry that time.
        """
        n = next(self._ids)
        made = int(self.ledger.clock()) if created_at is None else created_at
        sub = Subscription(
            f"sub_local{n:04d}",
            f"si_local{n:04d}",
            customer,
            price,
            start_date=start if start is not None else anchor,
            billing_cycle_anchor=anchor,
            cancel_at=cancel_at,
            created=made,
        )
        sub.changes.append((made, "created"))
        sub.cancel_history.append((made, cancel_at))
        self.subscriptions[sub.id] = sub
        return sub

    def cancel(self, sub: Subscription, at: int) -> None:
        """Cancel ``sub`` at ``at`` (now or later): a ``customer.subscription.updated`` event now."""
        now = int(self.ledger.clock())
        sub.cancel_at = at  # starts_between() drops the starts from ``at`` on
        sub.changes.append((now, "updated"))
        sub.cancel_history.append((now, at))

    def _draft_ref(self, sub: Subscription, period_end: int) -> InvoiceRef:
        ref = next((r for r in self.invoice_refs(sub) if r.end == period_end), None)
        if ref is None:
            raise ValueError(f"{sub.id} has no invoice for a period ending at {period_end}")
        return ref

    def postpone(self, sub: Subscription, period_end: int, until: int) -> None:
        """Postpone the finalization of the draft for the period ending at ``period_end`` to
        ``until``: it stays a draft, taking usage, until then (docs.stripe.com/invoicing/
        integration/automatic-advancement-collection)."""
        ref = self._draft_ref(sub, period_end)
        control = self._controls.setdefault((sub.id, period_end), DraftControl(ref.finalizes_at))
        control.finalizes_at = until
        self._generation += 1

    def set_auto_advance(self, sub: Subscription, period_end: int, auto_advance: bool) -> None:
        """Turn automatic finalization of that period's draft off (it waits for :meth:`finalize`,
        ``automatically_finalizes_at`` null) or back on."""
        self._draft_ref(sub, period_end)
        control = self._controls.setdefault((sub.id, period_end), DraftControl(period_end + self.grace))
        control.auto_advance = auto_advance
        self._generation += 1

    def finalize(self, sub: Subscription, period_end: int) -> None:
        """Finalize that period's draft now, by hand (possibly before its grace period ends):
        usage received later is not on it (docs.stripe.com/api/invoices/finalize)."""
        ref = self._draft_ref(sub, period_end)
        if ref.status != "draft":
            raise ValueError(f"{ref.id} is {ref.status}, not a draft")
        control = self._controls.setdefault((sub.id, period_end), DraftControl(ref.finalizes_at))
        control.finalized_at = self._now()
        self._generation += 1

    def add_draft(
        self,
        customer: str,
        *,
        billing_reason: str = "manual",
        subscription: Subscription | str | None = None,
        created: int | None = None,
        finalizes_at: int | None = None,
        auto_advance: bool = True,
    ) -> str:
        """A draft of another kind than a cycle's: a one-off ``manual`` invoice, or for
        ``subscription`` one made by an update (``subscription_update``) or a usage threshold
        (``subscription_threshold``). It bills one licensed line, no metered line; it finalizes
        at ``finalizes_at`` (default an hour after ``created``) if ``auto_advance``. Its id."""
        sub = self.subscriptions[subscription] if isinstance(subscription, str) else subscription
        made = self._now() if created is None else created
        if auto_advance and finalizes_at is None:
            finalizes_at = made + ONE_OFF_FINALIZE_AFTER
        invoice = OtherInvoice(
            f"in_localx{next(self._ids):04d}",
            customer,
            billing_reason,
            sub,
            made,
            finalizes_at if auto_advance else None,
            auto_advance,
        )
        self.licensed_price()
        self.other_invoices[invoice.id] = invoice
        return invoice.id

    def set_account_api_version(self, version: str, since: int | None = None) -> None:
        """Make ``version`` the account's default API version from ``since`` on (``None``: always):
        events that happened from then on are rendered at it (docs.stripe.com/upgrades)."""
        if since is None:
            self._earlier_versions = []
        else:
            self._earlier_versions.append((since, self.account_api_version))
            self._earlier_versions.sort()
        self.account_api_version = version

    def api_version_at(self, at: int) -> str:
        """The account's default API version at ``at`` (what an event of then is rendered at)."""
        for until, version in self._earlier_versions:
            if at < until:
                return version
        return self.account_api_version

    # -- events ----------------------------------------------------------------------------

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
                    found.extend((start, "renewed", sub) for start in sub.starts_between(made, horizon))
                    ended = sub.ended_at(horizon)
                    if ended is not None:
                        found.append((ended, "deleted", sub))
                found.sort(key=lambda f: f[0], reverse=True)
                self._moments, self._moment_times = found, [-f[0] for f in found]
                self._moments_key = (horizon, len(self.subscriptions), changes)
            return self._moments

    @staticmethod
    def event_id(moment: tuple[int, str, Subscription]) -> str:
        """The id of the event of ``moment``."""
        at, kind, sub = moment
        return f"evt_{sub.id[4:]}_{at}_{kind}"

    def event_object(self, moment: tuple[int, str, Subscription]) -> dict[str, Any]:
        """One ``event`` object: its subscription as it was at the event's time, rendered at the
        account's default API version of that time (docs.stripe.com/api/events/object)."""
        at, kind, sub = moment
        version = self.api_version_at(at)
        data: dict[str, Any] = {"object": self.subscription_object(sub, at=at, api_version=version)}
        if kind == "renewed" and version_before(version, BASIL):
            # What the renewal changed, when the periods were on the subscription. (Since basil
            # Stripe repeats the whole items list as it was; left out, as a night reads thousands.)
            before = [p for p in sub.as_of(at).periods(at) if p[1] <= at]
            if before:
                data["previous_attributes"] = {
                    "current_period_start": before[-1][0],
                    "current_period_end": before[-1][1],
                }
        return {
            "id": self.event_id(moment),
            "object": "event",
            "api_version": version,
            "created": at,
            "data": data,
            "livemode": False,
            "pending_webhooks": 0,
            # A renewal is Stripe's own doing; the others answer an API call.
            "request": {
                "id": None if kind in ("renewed", "deleted") else f"req_local{at}",
                "idempotency_key": None,
            },
            "type": EVENT_TYPES[kind],
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
            out.append(self._cycle_ref(sub, start, end, now))
        return list(reversed(out))

    def _cycle_ref(self, sub: Subscription, start: int, end: int, now: int) -> InvoiceRef:
        control = self._controls.get((sub.id, end))
        if control is None:
            finalizes_at: int | None = end + self.grace
            auto_advance, by_hand = True, None
        else:
            finalizes_at, auto_advance, by_hand = (
                control.finalizes_at,
                control.auto_advance,
                control.finalized_at,
            )
        if by_hand is not None and by_hand <= now:
            return InvoiceRef(sub, start, end, "open", None, by_hand, auto_advance)
        if auto_advance and finalizes_at is not None and finalizes_at <= now:
            return InvoiceRef(sub, start, end, "open", None, finalizes_at, True)
        return InvoiceRef(
            sub, start, end, "draft", finalizes_at if auto_advance else None, None, auto_advance
        )

    def controlled(self) -> set[str]:
        """Subscriptions one of whose invoices a test changed (a draft of theirs may outlive the grace)."""
        return {key[0] for key in self._controls}

    def all_invoice_refs(self, subs: list[Subscription]) -> list[InvoiceRef | OtherInvoice]:
        """The invoices of ``subs`` and every other draft, newest first by ``created``."""
        refs: list[InvoiceRef | OtherInvoice] = [r for s in subs for r in self.invoice_refs(s)]
        refs.extend(self.other_invoices.values())
        refs.sort(key=attrgetter("created"), reverse=True)  # stable: ties keep their order
        return refs

    def status_of(self, ref: InvoiceRef | OtherInvoice) -> str:
        """The invoice's ``status`` now."""
        return ref.status if isinstance(ref, InvoiceRef) else ref.status_at(self._now())

    def find_invoice(self, invoice_id: str) -> InvoiceRef | OtherInvoice | None:
        """The invoice ``invoice_id`` (a cycle's, or another draft), if it exists now."""
        if invoice_id in self.other_invoices:
            return self.other_invoices[invoice_id]
        if not invoice_id.startswith("in_") or "_" not in invoice_id[3:]:
            return None
        sub_part, _, end = invoice_id[3:].rpartition("_")
        sub = self.subscriptions.get(f"sub_{sub_part}")
        if sub is None or not end.isdigit():
            return None
        return next((r for r in self.invoice_refs(sub) if r.end == int(end)), None)

    def render_invoice(self, ref: InvoiceRef | OtherInvoice) -> dict[str, Any]:
        """The ``invoice`` object of ``ref``: a final one holds what was received before it finalized."""
        if isinstance(ref, OtherInvoice):
            return self._other_invoice(ref)
        invoice, _ = self._cycle_invoice(ref)
        return invoice

    def invoice_lines(self, invoice_id: str) -> list[dict[str, Any]] | None:
        """Every line of ``invoice_id`` (a preview's too), for ``GET /v1/invoices/{id}/lines``."""
        if invoice_id.startswith("upcoming_in_"):
            sub = self.subscriptions.get(f"sub_{invoice_id[len('upcoming_in_') :].rpartition('_')[0]}")
            if sub is None or sub.ended_at(self._now()) is not None:
                return None
            return self._preview(sub)[1]
        ref = self.find_invoice(invoice_id)
        if ref is None:
            return None
        if isinstance(ref, OtherInvoice):
            return [self._other_line(ref)]
        return self._cycle_invoice(ref)[1]

    def _cycle_invoice(self, ref: InvoiceRef) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        received = ref.finalized_at if ref.finalized_at is not None else self._received_by()
        quantity = self.quantity(ref.sub, ref.start, ref.end, received)
        lines = self._lines(ref.sub, ref.id, ref.start, ref.end, quantity)
        invoice = self._invoice(
            ref.id,
            ref.sub.customer,
            ref.sub,
            lines,
            created=ref.end,
            period=(ref.start, ref.end),
            status=ref.status,
            finalizes_at=ref.finalizes_at if ref.status == "draft" else None,
            finalized_at=ref.finalized_at,
            auto_advance=ref.auto_advance,
            billing_reason="subscription_cycle",
        )
        return invoice, lines

    def preview(self, sub: Subscription) -> dict[str, Any]:
        """``POST /v1/invoices/create_preview``: the current period's invoice as it stands now."""
        return self._preview(sub)[0]

    def _preview(self, sub: Subscription) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        now = self._now()
        start, end = self.current_period(sub, now)
        quantity = self.quantity(sub, start, end, self._received_by())
        # A preview's id starts with ``upcoming_in`` (docs.stripe.com/api/invoices/create_preview).
        invoice_id = f"upcoming_in_{sub.id[4:]}_{end}"
        lines = self._lines(sub, invoice_id, start, end, quantity)
        invoice = self._invoice(
            invoice_id,
            sub.customer,
            sub,
            lines,
            created=end,
            period=(start, end),
            status="draft",
            finalizes_at=None,
            finalized_at=None,
            auto_advance=True,
            billing_reason="upcoming",
        )
        return invoice, lines

    def _lines(
        self, sub: Subscription, invoice_id: str, start: int, end: int, quantity: int
    ) -> list[dict[str, Any]]:
        """A cycle invoice's lines: the licensed items, billed in advance for the next period (none
        once the subscription ends there), then the metered item, in arrears for ``[start, end)``."""
        # A preview's lines have temporary ids (``il_tmp_...``), as on Stripe.
        base = (
            f"tmp_{invoice_id[len('upcoming_in_') :]}"
            if invoice_id.startswith("upcoming_in_")
            else invoice_id[3:]
        )
        lines = []
        if sub.other_lines and (sub.cancel_at is None or end < sub.cancel_at):
            seat = self.licensed_price()
            ahead = (end, sub.next_end(end))
            for k, item_id in enumerate(sub.licensed_item_ids()):
                lines.append(self._line(f"il_{base}_l{k}", invoice_id, sub, item_id, seat, ahead, 1, False))
        lines.append(
            self._line(f"il_{base}", invoice_id, sub, sub.item_id, sub.price, (start, end), quantity, False)
        )
        return lines

    @staticmethod
    def _line(
        line_id: str,
        invoice_id: str | None,
        sub: Subscription | None,
        item_id: str | None,
        price: Price,
        period: tuple[int, int],
        quantity: int,
        proration: bool,
    ) -> dict[str, Any]:
        amount = quantity * price.unit_amount
        if sub is not None and item_id is not None:
            parent: dict[str, Any] = {
                "invoice_item_details": None,
                "subscription_item_details": {
                    "invoice_item": None,
                    "proration": proration,
                    "proration_details": {"credited_items": None},
                    "subscription": sub.id,
                    "subscription_item": item_id,
                },
                "type": "subscription_item_details",
            }
        else:
            parent = {
                "invoice_item_details": {
                    "invoice_item": f"ii_{line_id[3:]}",
                    "proration": False,
                    "proration_details": {"credited_items": None},
                    "subscription": None,
                },
                "subscription_item_details": None,
                "type": "invoice_item_details",
            }
        return {
            **_LINE_FIXED,
            "id": line_id,
            "amount": amount,
            "description": f"{quantity} x {price.id}",
            "invoice": invoice_id,
            "parent": parent,
            "period": {"end": period[1], "start": period[0]},
            "pricing": {
                "price_details": {"price": price.id, "product": "prod_local"},
                "type": "price_details",
                "unit_amount_decimal": str(price.unit_amount),
            },
            "quantity": quantity,
            "quantity_decimal": str(quantity),
            "subtotal": amount,
        }

    def _other_line(self, ref: OtherInvoice) -> dict[str, Any]:
        sub = ref.sub
        item = (sub.licensed_item_ids() or [f"{sub.item_id}_l0"])[0] if sub is not None else None
        period = (
            (ref.created, self.current_period(sub, ref.created)[1])
            if sub is not None
            else (ref.created, ref.created)
        )
        return self._line(
            f"il_{ref.id[3:]}",
            ref.id,
            sub,
            item,
            self.licensed_price(),
            period,
            1,
            ref.billing_reason == "subscription_update",
        )

    def _other_invoice(self, ref: OtherInvoice) -> dict[str, Any]:
        status = ref.status_at(self._now())
        return self._invoice(
            ref.id,
            ref.customer,
            ref.sub,
            [self._other_line(ref)],
            created=ref.created,
            period=(ref.created, ref.created),
            status=status,
            finalizes_at=ref.finalizes_at if status == "draft" else None,
            finalized_at=ref.finalizes_at if status != "draft" else None,
            auto_advance=ref.auto_advance,
            billing_reason=ref.billing_reason,
        )

    def _invoice(
        self,
        invoice_id: str,
        customer: str,
        sub: Subscription | None,
        lines: list[dict[str, Any]],
        *,
        created: int,
        period: tuple[int, int],
        status: str,
        finalizes_at: int | None,
        finalized_at: int | None,
        auto_advance: bool,
        billing_reason: str,
    ) -> dict[str, Any]:
        amount = sum(line["amount"] for line in lines)
        return {
            **_INVOICE_FIXED,
            "id": invoice_id,
            "amount_due": amount,
            "amount_remaining": amount,
            "auto_advance": auto_advance,
            "automatically_finalizes_at": finalizes_at,
            "billing_reason": billing_reason,
            "created": created,
            "customer": customer,
            "effective_at": finalized_at,
            "lines": {
                "object": "list",
                "data": lines[:EMBEDDED_LINES],
                "has_more": len(lines) > EMBEDDED_LINES,
                "url": f"/v1/invoices/{invoice_id}/lines",
            },
            "next_payment_attempt": None if status != "open" else finalized_at,
            "number": None if status == "draft" else f"LOCAL-{invoice_id[-8:]}",
            # Since 2025-03-31.basil the subscription is here, not on the invoice
            # (docs.stripe.com/changelog/basil/2025-03-31/adds-new-parent-field-to-invoicing-objects).
            "parent": None
            if sub is None
            else {
                "quote_details": None,
                "subscription_details": {"metadata": {}, "subscription": sub.id},
                "type": "subscription_details",
            },
            "period_end": period[1],
            "period_start": period[0],
            "status": status,
            "status_transitions": {
                "finalized_at": finalized_at,
                "marked_uncollectible_at": None,
                "paid_at": None,
                "voided_at": None,
            },
            "subtotal": amount,
            "subtotal_excluding_tax": amount,
            "total": amount,
            "total_excluding_tax": amount,
            "webhooks_delivered_at": None if status == "draft" else created,
        }

    def _item(
        self,
        sub: Subscription,
        item_id: str,
        price: Price,
        period: tuple[int, int],
        quantity: int | None,
        old: bool,
    ) -> dict[str, Any]:
        item = {
            **_ITEM_FIXED,
            "id": item_id,
            "created": sub.created,
            "plan": price.plan_object(),
            "price": price.as_object(),
            "quantity": quantity,
            "subscription": sub.id,
        }
        if not old:
            # On the item since 2025-03-31.basil, on the subscription before.
            item["current_period_start"], item["current_period_end"] = period
        return item

    def _items_list(self, sub: Subscription, period: tuple[int, int], version: str) -> dict[str, Any]:
        old = version_before(version, BASIL)
        items = [
            self._item(sub, item_id, self.licensed_price(), period, 1, old)
            for item_id in sub.licensed_item_ids()
        ]
        items.append(self._item(sub, sub.item_id, sub.price, period, None, old))
        return {
            "object": "list",
            "data": items,
            "has_more": False,
            "url": f"/v1/subscription_items?subscription={sub.id}",
        }

    def subscription_object(
        self, sub: Subscription, *, at: int | None = None, api_version: str = PINNED_API_VERSION
    ) -> dict[str, Any]:
        """The ``subscription`` object as it is now, or as it was at ``at`` (for an event), rendered
        at ``api_version``: before 2025-03-31.basil the periods are on the subscription, since
        then on its items."""
        now = self._now() if at is None else at
        then = sub if at is None else sub.as_of(at)
        period = self.current_period(then, now)
        ended = then.ended_at(now)
        out = {
            **_SUBSCRIPTION_FIXED,
            "id": sub.id,
            "billing_cycle_anchor": sub.billing_cycle_anchor,
            "cancel_at": then.cancel_at,
            "canceled_at": sub.canceled_at(now),
            "cancellation_details": {
                "comment": None,
                "feedback": None,
                "reason": "cancellation_requested" if then.cancel_at is not None else None,
            },
            "created": sub.created,
            "customer": sub.customer,
            "ended_at": ended,
            "items": self._items_list(then, period, api_version),
            "start_date": sub.start_date,
            "status": "canceled" if ended else "active",
        }
        if version_before(api_version, BASIL):
            out["current_period_start"], out["current_period_end"] = period
        return out

    # -- for tests -------------------------------------------------------------------------

    def invoice_quantities(self) -> dict[tuple[str, int, int], tuple[int, str]]:
        """Per (customer, period start, period end): the invoice's metered quantity and status, every
        period that began so far (the current one as its preview shows it)."""
        now = self._now()
        out: dict[tuple[str, int, int], tuple[int, str]] = {}
        for sub in self.subscriptions.values():
            for ref in self.invoice_refs(sub):
                received = ref.finalized_at if ref.finalized_at is not None else self._received_by()
                out[(sub.customer, ref.start, ref.end)] = (
                    self.quantity(sub, ref.start, ref.end, received),
                    ref.status,
                )
            if sub.ended_at(now) is None:
                start, end = self.current_period(sub, now)
                out[(sub.customer, start, end)] = (
                    self.quantity(sub, start, end, self._received_by()),
                    "upcoming",
                )
        return out
