"""The subscriptions that changed since an instant, from Stripe's events, listed in time ranges at once.

Plain Python: each request is one hook call (:class:`EventReads`). Pages of one listing follow
one another, so a night's thousands of renewals are listed in time ranges in parallel, split
where the renewals are expected, and a range that turns out to be crowded is halved while it is
being read.

.. seealso:: https://docs.stripe.com/api/events/list
.. seealso:: https://docs.stripe.com/api/pagination
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

#: The events that change a subscription's items or periods (a renewal is an update).
SUBSCRIPTION_EVENTS = (
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
)
#: Pages left in a range, at least, before it is halved.
SPLIT_PAGES = 8
PAGE = 100


class EventReads(Protocol):
    """The hook's calls the walk makes: a page of events, and one subscription."""

    def events_page(
        self, types: Sequence[str], after: int, until: int | None, starting_after: str | None
    ) -> dict[str, Any]: ...

    def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]: ...


def subscription_changes(
    stripe: EventReads, since: int, *, cuts: Sequence[int] = (), parallel: int = 4
) -> list[dict[str, Any]]:
    """The subscriptions created, updated (a renewal too) or deleted after ``since``, each as
    its newest event shows it: about one request per 100 events (Stripe keeps 30 days).

    The events are listed in time ranges, up to ``parallel`` at once, split at ``cuts``
    (instants after ``since``): where the renewals expected are evenly shared, as they cluster
    where the anchors do. A range that turns out to hold many more pages than the others (a
    burst of changes nobody expected) is halved, once at least eight pages remain in it and a
    worker is spare.
    """
    found = _EventWalk(stripe, parallel).run(since, cuts)
    events = sorted(found.values(), key=lambda e: (int(e["created"]), str(e["id"])), reverse=True)
    newest_of: dict[str, dict[str, Any]] = {}
    for event in events:  # newest first
        subscription = (event.get("data") or {}).get("object") or {}
        if subscription.get("id") and subscription["id"] not in newest_of:
            newest_of[subscription["id"]] = items_with_periods(subscription)
    # An event rendered at a version that has the periods on neither the subscription nor its
    # items: the subscription is read as the pinned version shows it (one request each).
    for sub_id, subscription in newest_of.items():
        if not has_item_periods(subscription):
            newest_of[sub_id] = stripe.retrieve_subscription(sub_id)
    return list(newest_of.values())


class _EventWalk:
    """Every subscription event after an instant, by id, read by up to ``parallel`` walkers."""

    def __init__(self, stripe: EventReads, parallel: int) -> None:
        self.stripe = stripe
        self.parallel = parallel
        self.found: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.busy = 0
        self.futures: list[Future[None]] = []
        self.pool = ThreadPoolExecutor(max_workers=parallel)

    def run(self, since: int, cuts: Sequence[int]) -> dict[str, dict[str, Any]]:
        """Walk ``(since, cut1], (cut1, cut2], ... (cutN, now]`` at once; the events by id."""
        with self.pool:
            bounds = [since, *sorted({c for c in cuts if c > since})]
            for lo, hi in zip(bounds, [*bounds[1:], None], strict=True):
                self.start(lo, hi)
            done = 0
            while done < len(self.futures):  # a walker adds its split before it ends
                self.futures[done].result()
                done += 1
        return self.found

    def start(self, lo: int, hi: int | None) -> None:
        """Walk ``(lo, hi]`` on a worker of the pool."""
        with self.lock:
            self.busy += 1
            self.futures.append(self.pool.submit(self.walk, lo, hi))

    def walk(self, lo: int, hi: int | None) -> None:
        """Every event created in ``(lo, hi]`` (``hi`` ``None``: up to now and later)."""
        after: str | None = None
        try:
            while True:
                page = self.stripe.events_page(SUBSCRIPTION_EVENTS, lo, hi, after)
                data = page.get("data") or []
                with self.lock:
                    for event in data:
                        self.found[str(event["id"])] = event
                if not page.get("has_more") or not data:
                    return
                # Newest first: what is left of the range is (lo, oldest], the events of the
                # second ``oldest`` partly seen already (they are kept once, by id).
                newest, oldest = int(data[0]["created"]), int(data[-1]["created"])
                left = (oldest - lo) * len(data) / max(1, newest - oldest) / PAGE
                with self.lock:
                    spare = self.busy < self.parallel
                if spare and newest > oldest and left >= SPLIT_PAGES:
                    mid = lo + (oldest - lo) // 2
                    self.start(lo, mid)
                    lo, hi, after = mid, oldest, None
                else:
                    after = str(data[-1]["id"])
        finally:
            with self.lock:
                self.busy -= 1


def has_item_periods(subscription: dict[str, Any]) -> bool:
    """Whether every item of ``subscription`` carries its billing period."""
    items = (subscription.get("items") or {}).get("data") or []
    return all(
        i.get("current_period_start") is not None and i.get("current_period_end") is not None for i in items
    )


def items_with_periods(subscription: dict[str, Any]) -> dict[str, Any]:
    """A subscription from an event, its billing period on each item, as the pinned version has it.

    An event renders its object at the event's own ``api_version`` (the account's default when it
    happened), not at the version a request pins. Before 2025-03-31.basil the period lived on the
    subscription (``current_period_start``/``_end``) and no item carried one; since then it lives on
    each item and the subscription has none. An older rendering is moved to the items (every item
    of a subscription shared its period then).

    .. seealso:: https://docs.stripe.com/api/events/object#event_object-api_version
    .. seealso:: https://docs.stripe.com/changelog/basil/2025-03-31/deprecate-subscription-current-period-start-and-end
    """
    if has_item_periods(subscription):
        return subscription
    start, end = subscription.get("current_period_start"), subscription.get("current_period_end")
    if start is None or end is None:
        return subscription  # neither shape: read again at the pinned version
    items = (subscription.get("items") or {}).get("data") or []
    moved = [
        {
            **i,
            "current_period_start": i.get("current_period_start") or start,
            "current_period_end": i.get("current_period_end") or end,
        }
        for i in items
    ]
    return {**subscription, "items": {**(subscription.get("items") or {}), "data": moved}}
