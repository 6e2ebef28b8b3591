"""Read the customers' billing periods for a run, listing only what changed since the last one.

Plain Python; Stripe and the subscriptions table are ports
(:class:`~airflow_provider_stripe_meter.hooks.stripe.StripeHook`,
:class:`~airflow_provider_stripe_meter.ledger.subscriptions.SubscriptionCache`). A meter's
subscriptions are listed in full on its first run, when its prices change, once a week, or when
its last sync is older than the events Stripe keeps; otherwise Stripe's
``customer.subscription.*`` events since then bring the table up to date, listed in time ranges
at once (:func:`_cuts`) while the table is read. Draft invoices, which say when a period that
ended locks (:class:`~.periods.DraftLocks`), are listed only once a run asks about such a period.

.. seealso:: https://docs.stripe.com/api/events/list
.. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/configure-grace-period
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

from airflow_provider_stripe_meter.billing.periods import (
    DraftLocks,
    PeriodBook,
    StoredPeriods,
    StoredRow,
    customer_periods,
)
from airflow_provider_stripe_meter.billing.subscription_events import subscription_changes
from airflow_provider_stripe_meter.ledger.subscriptions import (
    SubscriptionCache,
    SubscriptionRow,
    SyncState,
    row_of,
)

#: A meter's subscriptions are listed in full at least this often.
FULL_EVERY = 7 * 86400
#: Stripe lists events of the last 30 days: an older sync lists in full again.
EVENTS_KEPT = 29 * 86400
#: Events read again from before the last run's end (they are listed eventually, not at once).
OVERLAP = 300


class MeterSync(NamedTuple):
    """How one meter's subscriptions are brought up to date this run."""

    meter_id: str
    #: The meter's metered prices.
    prices: tuple[str, ...]
    #: What the table says of the last sync (``None``: never synced).
    state: SyncState | None
    #: Listed in full (the table is new, its prices changed, or it is too old for events).
    stale: bool


def read_periods(
    stripe: Any,
    cache: SubscriptionCache,
    meters: dict[str, str],
    account: str,
    since: int,
    now: int,
    *,
    defer: bool = False,
    prices: list[dict[str, Any]] | None = None,
) -> tuple[PeriodBook, dict[str, int]]:
    """The periods of every customer subscribed on ``meters`` (event name -> meter id).

    Returns the book and what it took: subscriptions ``listed`` in full, ``changes`` read from
    events, ``cached`` rows read from the table. With ``defer`` the table is written by
    :meth:`PeriodBook.save`, later (a run that dies first reads the same changes again).
    ``prices``: the metered prices on ``meters``, if already listed.

    The changes are listed while the table is read: a night waits on the slower of the two, not
    on their sum. Draft invoices are read later, when the run first asks about a period that ended.
    """
    read = _PeriodRead(stripe, cache, account, since, now)
    if prices is None:
        prices = stripe.metered_prices(set(meters.values()))
    if not prices:
        return PeriodBook({}, (), now), read.figures
    plans = read.plan(meters, prices)
    customers = StoredPeriods(DraftLocks(stripe.invoices_created, (p["id"] for p in prices), now))
    changes = read.list_changes_while_reading_the_table(plans, customers)
    writes = [read.bring_up_to_date(name, plan, changes, customers) for name, plan in plans.items()]
    book = PeriodBook(customers, set(plans), now)
    book.pending = writes
    if not defer:
        book.save()
    return book, read.figures


@dataclass(slots=True)
class _PeriodRead:
    """One read of the periods: where from, for which account, over which time, and what it took."""

    stripe: Any
    cache: SubscriptionCache
    account: str
    #: A meter listed in full lists the subscriptions whose current period ends after this.
    since: int
    now: int
    #: Subscriptions ``listed`` in full, ``changes`` read from events, ``cached`` rows kept.
    figures: dict[str, int] = field(default_factory=lambda: {"listed": 0, "changes": 0, "cached": 0})

    def plan(self, meters: dict[str, str], prices: list[dict[str, Any]]) -> dict[str, MeterSync]:
        """How each meter with metered prices among ``prices`` is brought up to date, by event
        name (a meter without any is left out)."""
        plans: dict[str, MeterSync] = {}
        for name, meter_id in meters.items():
            ids = tuple(sorted(p["id"] for p in prices if p["recurring"]["meter"] == meter_id))
            if ids:
                plans[name] = self._sync_of(meter_id, ids)
        return plans

    def _sync_of(self, meter_id: str, ids: tuple[str, ...]) -> MeterSync:
        """How meter ``meter_id`` on prices ``ids`` is brought up to date: in full if the table never
        synced it, its prices changed, or its last full listing or sync is too old."""
        state = self.cache.state(self.account, meter_id)
        stale = (
            state is None
            or state.prices != ids
            or self.now - state.full_at > FULL_EVERY
            or self.now - state.events_to > EVENTS_KEPT
        )
        return MeterSync(meter_id, ids, state, stale)

    def list_changes_while_reading_the_table(
        self, plans: dict[str, MeterSync], customers: StoredPeriods
    ) -> list[dict[str, Any]]:
        """The account's subscription changes since the last sync (none if every meter is listed in
        full), listed in a thread while the table's rows are read into ``customers``.

        Meanwhile a second thread asks whether the key may read invoices, and, when every meter is
        listed in full, events: a key that may not fails here, before anything is sent. Every
        request is waited for; the first error raised is the table's, the changes', the invoices'
        check's, then the events' check's.
        """
        # One listing of the account's changes serves every meter brought up to date from events.
        synced = [p.state.events_to for p in plans.values() if p.state is not None and not p.stale]
        with ThreadPoolExecutor(max_workers=2) as pool:
            invoices_readable = pool.submit(self.stripe.check_invoices_readable)
            changes_read: Future[list[dict[str, Any]]] | None = None
            events_readable: Future[None] | None = None
            if synced:
                after = min(synced) - OVERLAP
                cuts = _cuts(self._renewals(plans, after), PARALLEL)
                changes_read = pool.submit(subscription_changes, self.stripe, after, cuts=cuts)
            else:
                # Listed in full: the next run reads events, so a key that may not is told now.
                events_readable = pool.submit(self.stripe.check_events_readable)
            self._read_the_table(plans, customers)
            changes = changes_read.result() if changes_read is not None else []
            invoices_readable.result()
            if events_readable is not None:
                events_readable.result()
        return changes

    def _renewals(self, plans: dict[str, MeterSync], after: int) -> list[int]:
        """When the table expects the renewals of the meters synced from events, sorted."""
        return sorted(
            moment
            for plan in plans.values()
            if not plan.stale
            for moment in self.cache.renewals(self.account, plan.meter_id, after, self.now)
        )

    def _read_the_table(self, plans: dict[str, MeterSync], customers: StoredPeriods) -> None:
        """The table as the last run left it, into ``customers`` (the changes replace their rows)."""
        for name, plan in plans.items():
            if not plan.stale:
                _add_rows(customers, name, self.cache.periods(self.account, plan.meter_id))

    def bring_up_to_date(
        self, name: str, plan: MeterSync, changes: list[dict[str, Any]], customers: StoredPeriods
    ) -> Callable[[], None]:
        """The rows of meter ``name`` as they are now, into ``customers``: listed in full, or the
        table's with ``changes`` applied. Returns the table's write, left for later."""
        if plan.stale:
            rows, write = self._listed_in_full(plan)
        else:
            rows, write = self._with_changes(plan, changes)
            for subscription in changes:
                customers.forget((name, str(subscription.get("customer"))), str(subscription["id"]))
        _add_rows(customers, name, [_used(row) for row in rows])
        self.figures["cached"] += sum(
            len(entries) for (event_name, _), entries in customers.raw.items() if event_name == name
        )
        return write

    def _listed_in_full(self, plan: MeterSync) -> tuple[list[SubscriptionRow], Callable[[], None]]:
        """The meter's subscriptions listed from Stripe, and the write that replaces its rows."""
        subscriptions = self.stripe.subscriptions_of(plan.prices, self.since)
        self.figures["listed"] += len(subscriptions)
        rows = _rows(self.account, plan.meter_id, subscriptions, plan.prices)
        state = SyncState(plan.prices, self.now, self.now)
        return rows, partial(self.cache.replace, self.account, plan.meter_id, rows, full=True, state=state)

    def _with_changes(
        self, plan: MeterSync, changes: list[dict[str, Any]]
    ) -> tuple[list[SubscriptionRow], Callable[[], None]]:
        """The meter's rows of the changed subscriptions, and the write that replaces them (a
        changed subscription with no item on the meter's prices is removed)."""
        assert plan.state is not None
        self.figures["changes"] += len(changes)
        changed = [str(s["id"]) for s in changes]
        known = (
            {str(row.subscription_id): row for row in self.cache.rows(self.account, plan.meter_id, changed)}
            if changes
            else {}
        )
        rows = _rows(self.account, plan.meter_id, changes, plan.prices, known)
        kept = {row.subscription_id for row in rows}
        removed = [i for i in changed if i not in kept]
        state = SyncState(plan.prices, plan.state.full_at, self.now)
        write = partial(
            self.cache.replace, self.account, plan.meter_id, rows, full=False, state=state, removed=removed
        )
        return rows, write


def _used(row: SubscriptionRow) -> StoredRow:
    """A full table row as :meth:`SubscriptionCache.periods` reads it."""
    ended = row.ended_at if row.ended_at is not None else row.cancel_at
    return (
        row.subscription_id,
        row.price_id,
        row.bounds,
        row.start_date,
        ended,
        row.current_start,
        row.current_end,
        row.customer_id,
    )


#: Time ranges of the changes listed at once.
PARALLEL = 4


def _cuts(moments: list[int], parts: int) -> list[int]:
    """Instants that cut sorted ``moments`` into ``parts`` ranges holding as many each."""
    if len(moments) < 200 * parts:  # a couple of pages each at least, or not worth a range
        parts = max(1, len(moments) // 200)
    return sorted({moments[len(moments) * k // parts] for k in range(1, parts)})


def _add_rows(customers: StoredPeriods, name: str, rows: list[StoredRow]) -> None:
    """Rows as :meth:`SubscriptionCache.periods` reads them into ``customers``: each row is an
    entry as it is (a run reads 100,000; their boundaries are parsed when first needed)."""
    if rows:
        _, _, _, start, _, current_start, current_end, _ = rows[0]
        if not all(type(v) is int for v in (start, current_start, current_end)):
            # A driver that returns its numbers as another type (a ``Decimal``): made ints once.
            rows = [
                (
                    sub,
                    price,
                    bounds,
                    int(start),
                    None if end is None else int(end),
                    int(lo),
                    int(hi),
                    customer,
                )
                for sub, price, bounds, start, end, lo, hi, customer in rows
            ]
    raw = customers.raw
    get = raw.get
    for row in rows:
        _, _, _, _, _, _, _, customer = row
        key = (name, customer)
        found = get(key)
        if found is None:
            raw[key] = [row]
        else:
            found.append(row)


#: How far around the current period the stored boundaries reach (a run looks back 36 days,
#: and a row is written again at each renewal).
HORIZON = 70 * 86400


def _still_holds(text: str, current_start: int, current_end: int) -> bool:
    """Whether stored boundaries serve a renewal: the new current period is one of their periods
    (a run answers from the current period alone, :class:`~.periods.StoredPeriods`), and they
    reach half the horizon past it."""
    if not text:
        return False
    bounds = [int(b) for b in text.split(",")]
    try:
        i = bounds.index(current_start)
    except ValueError:
        return False
    return i + 1 < len(bounds) and bounds[i + 1] == current_end and bounds[-1] >= current_end + HORIZON // 2


def _rows(
    account: str,
    meter_id: str,
    subscriptions: list[dict[str, Any]],
    ids: tuple[str, ...],
    known: dict[str, SubscriptionRow] | None = None,
) -> list[SubscriptionRow]:
    """Table rows of ``subscriptions``' items on ``ids``. A ``known`` row of the same terms
    (a renewal) keeps its boundaries while they reach half the horizon past the new period."""
    rows = []
    for subscription in subscriptions:
        for item in (subscription.get("items") or {}).get("data") or []:
            if (item.get("price") or {}).get("id") not in ids:
                continue
            row = row_of(account, meter_id, subscription, item, ())
            old = (known or {}).get(row.subscription_id)
            kept = str(old.bounds) if old is not None and tuple(old.terms()) == row.terms() else ""
            if kept and _still_holds(kept, row.current_start, row.current_end):
                rows.append(row._replace(bounds=kept))
                continue
            found = customer_periods(
                subscription,
                item,
                int(item["current_period_start"]) - HORIZON,
                {},
                until=int(item["current_period_end"]) + HORIZON,
            )
            rows.append(row_of(account, meter_id, subscription, item, found.boundaries()))
    return rows
