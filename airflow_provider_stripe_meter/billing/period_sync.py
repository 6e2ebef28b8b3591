"""Read the customers' billing periods for a run, listing only what changed since the last one.

Plain Python; Stripe and the subscriptions table are ports
(:class:`~airflow_provider_stripe_meter.hooks.stripe.StripeHook`,
:class:`~airflow_provider_stripe_meter.ledger.subscriptions.SubscriptionCache`). Per run:

* the account's metered prices on the meters (one request per 100 prices);
* the account's finalization grace period, from one draft invoice (one request): a period that
  ended finalizes that long after its end; with no draft at all, every period that ended is final;
* per meter, its subscriptions: listed in full on the first run, when its prices change, once a
  week, or when the last run is older than the 30 days Stripe keeps events; otherwise the
  ``customer.subscription.*`` events since the last run (five minutes overlap, as events are
  listed eventually) bring the table up to date, one request per 100 changes.

.. seealso:: https://docs.stripe.com/api/events/list
.. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/configure-grace-period
"""

from __future__ import annotations

from typing import Any

from airflow_provider_stripe_meter.billing.periods import PeriodBook, StoredPeriods, customer_periods
from airflow_provider_stripe_meter.ledger.subscriptions import (
    SubscriptionCache,
    SyncState,
    row_of,
)

#: A meter's subscriptions are listed in full at least this often.
FULL_EVERY = 7 * 86400
#: Stripe lists events of the last 30 days: an older sync lists in full again.
EVENTS_KEPT = 29 * 86400
#: Events read again from before the last run's end (they are listed eventually, not at once).
OVERLAP = 300


def read_periods(
    stripe: Any,
    cache: SubscriptionCache,
    meters: dict[str, str],
    account: str,
    since: int,
    now: int,
) -> tuple[PeriodBook, dict[str, int]]:
    """The periods of every customer subscribed on ``meters`` (event name -> meter id).

    Returns the book and what it took: subscriptions ``listed`` in full, ``changes`` read from
    events, ``cached`` rows read from the table.
    """
    figures = {"listed": 0, "changes": 0, "cached": 0}
    prices = stripe.metered_prices(set(meters.values()))
    if not prices:
        return PeriodBook({}, (), now), figures
    grace = stripe.finalization_grace()
    changes: list[dict[str, Any]] | None = None
    customers = StoredPeriods(grace)
    metered = set()
    for name, meter_id in meters.items():
        ids = tuple(sorted(p["id"] for p in prices if p["recurring"]["meter"] == meter_id))
        if not ids:
            continue
        metered.add(name)
        state = cache.state(account, meter_id)
        stale = (
            state is None
            or state.prices != ids
            or now - state.full_at > FULL_EVERY
            or now - state.events_to > EVENTS_KEPT
        )
        if stale:
            subscriptions = stripe.subscriptions_of(ids, since)
            figures["listed"] += len(subscriptions)
            rows = _rows(account, meter_id, subscriptions, ids)
            cache.replace(account, meter_id, rows, full=True, state=SyncState(ids, now, now))
        else:
            assert state is not None
            if changes is None:
                changes = stripe.subscription_changes(state.events_to - OVERLAP)
            figures["changes"] += len(changes)
            rows = _rows(account, meter_id, changes, ids)
            kept = {r[2] for r in rows}
            removed = [str(s["id"]) for s in changes if str(s["id"]) not in kept]
            cache.replace(
                account, meter_id, rows, full=False, state=SyncState(ids, state.full_at, now), removed=removed
            )
        cached = cache.rows(account, meter_id)
        figures["cached"] += len(cached)
        for row in cached:
            # (account, meter, subscription, customer, price, anchor, start, ended, cancel, ..., bounds)
            ended = row[7] if row[7] is not None else row[8]
            customers.add(
                (name, str(row[3])),
                str(row[2]),
                str(row[4]),
                tuple(int(b) for b in str(row[-1]).split(",") if b),
                int(row[6]),
                int(ended) if ended is not None else None,
            )
    return PeriodBook(customers, metered, now), figures


#: How far around the current period the stored boundaries reach (a run looks back 36 days,
#: and a row is written again at each renewal).
HORIZON = 70 * 86400


def _rows(
    account: str, meter_id: str, subscriptions: list[dict[str, Any]], ids: tuple[str, ...]
) -> list[Any]:
    rows = []
    for subscription in subscriptions:
        for item in (subscription.get("items") or {}).get("data") or []:
            if (item.get("price") or {}).get("id") in ids:
                found = customer_periods(
                    subscription,
                    item,
                    int(item["current_period_start"]) - HORIZON,
                    {},
                    until=int(item["current_period_end"]) + HORIZON,
                )
                rows.append(row_of(account, meter_id, subscription, item, found.boundaries()))
    return rows
