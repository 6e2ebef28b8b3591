"""Read the customers' billing periods for a run, listing only what changed since the last one.

Plain Python; Stripe and the subscriptions table are ports
(:class:`~airflow_provider_stripe_meter.hooks.stripe.StripeHook`,
:class:`~airflow_provider_stripe_meter.ledger.subscriptions.SubscriptionCache`). Per run:

* the account's metered prices on the meters (one request per 100 prices);
* when each period that ended locks, from that period's own draft invoice
  (:class:`~.periods.DraftLocks`): drafts are listed only once a run asks about a period that
  ended, from that period's UTC day on, about one request per 100 drafts;
* per meter, its subscriptions: listed in full on the first run, when its prices change, once a
  week, or when the last run is older than the 30 days Stripe keeps events; otherwise the
  ``customer.subscription.*`` events since the last run (five minutes overlap, as events are
  listed eventually) bring the table up to date, one request per 100 changes, listed in time
  ranges at once, cut where the table expects the renewals (:func:`_cuts`).

The table is read while the changes are listed; a customer's boundaries are parsed only when a
run asks about an instant outside its current period. With ``defer`` the table is written later
(by the batch operator, while its first events are out).

.. seealso:: https://docs.stripe.com/api/events/list
.. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/configure-grace-period
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    figures = {"listed": 0, "changes": 0, "cached": 0}
    if prices is None:
        prices = stripe.metered_prices(set(meters.values()))
    if not prices:
        return PeriodBook({}, (), now), figures
    plans: dict[str, MeterSync] = {}
    for name, meter_id in meters.items():
        ids = tuple(sorted(p["id"] for p in prices if p["recurring"]["meter"] == meter_id))
        if not ids:
            continue
        state = cache.state(account, meter_id)
        stale = (
            state is None
            or state.prices != ids
            or now - state.full_at > FULL_EVERY
            or now - state.events_to > EVENTS_KEPT
        )
        plans[name] = MeterSync(meter_id, ids, state, stale)
    # One listing of the account's changes serves every meter brought up to date from events.
    synced = [p.state.events_to for p in plans.values() if p.state is not None and not p.stale]
    customers = StoredPeriods(DraftLocks(stripe.invoices_created, (p["id"] for p in prices), now))
    with ThreadPoolExecutor(max_workers=2) as pool:
        # The drafts are listed while planning; a key that may not read them fails here, before
        # anything is sent (one request, made while the changes are listed).
        readable = pool.submit(stripe.check_invoices_readable)
        changes_read = None
        if synced:
            after = min(synced) - OVERLAP
            expected = sorted(
                moment
                for plan in plans.values()
                if not plan.stale
                for moment in cache.renewals(account, plan.meter_id, after, now)
            )
            changes_read = pool.submit(subscription_changes, stripe, after, cuts=_cuts(expected, PARALLEL))
        else:
            # Listed in full: the next run reads events, so a key that may not is told now.
            readable_events = pool.submit(stripe.check_events_readable)
        # Meanwhile: the table as the last run left it, parsed (the changes replace their rows).
        for name, plan in plans.items():
            if not plan.stale:
                _add_rows(customers, name, cache.periods(account, plan.meter_id))
        changes = changes_read.result() if changes_read is not None else []
        readable.result()
        if changes_read is None:
            readable_events.result()
    writes: list[Callable[[], None]] = []
    for name, (meter_id, ids, state, stale) in plans.items():
        if stale:
            subscriptions = stripe.subscriptions_of(ids, since)
            figures["listed"] += len(subscriptions)
            rows = _rows(account, meter_id, subscriptions, ids)
            writes.append(
                partial(cache.replace, account, meter_id, rows, full=True, state=SyncState(ids, now, now))
            )
        else:
            assert state is not None
            figures["changes"] += len(changes)
            changed = [str(s["id"]) for s in changes]
            known = (
                {str(row.subscription_id): row for row in cache.rows(account, meter_id, changed)}
                if changes
                else {}
            )
            rows = _rows(account, meter_id, changes, ids, known)
            kept = {row.subscription_id for row in rows}
            removed = [i for i in changed if i not in kept]
            writes.append(
                partial(
                    cache.replace,
                    account,
                    meter_id,
                    rows,
                    full=False,
                    state=SyncState(ids, state.full_at, now),
                    removed=removed,
                )
            )
            for subscription in changes:
                customers.forget((name, str(subscription.get("customer"))), str(subscription["id"]))
        _add_rows(customers, name, [_used(row) for row in rows])
        figures["cached"] += sum(len(entries) for key, entries in customers.raw.items() if key[0] == name)
    book = PeriodBook(customers, set(plans), now)
    book.pending = writes
    if not defer:
        book.save()
    return book, figures


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
