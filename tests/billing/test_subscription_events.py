"""The walk over subscription events, in-process: pages from a list, as ``GET /v1/events`` gives them."""

from __future__ import annotations

import threading

from airflow_provider_stripe_meter.billing.subscription_events import (
    SUBSCRIPTION_EVENTS,
    items_with_periods,
    subscription_changes,
)

NOW = 1_780_000_000


def event(n: int, created: int, subscription: dict) -> dict:
    return {
        "id": f"evt_{n:05d}",
        "created": created,
        "type": "customer.subscription.updated",
        "data": {"object": subscription},
    }


def sub(sid: str, start: int, end: int, *, on_items: bool = True) -> dict:
    item = {
        "id": f"si_{sid}",
        **({"current_period_start": start, "current_period_end": end} if on_items else {}),
    }
    top = {} if on_items else {"current_period_start": start, "current_period_end": end}
    return {"id": sid, "object": "subscription", **top, "items": {"object": "list", "data": [item]}}


class Events:
    """Stripe's events, newest first, 100 a page; counts the pages and the ranges asked for."""

    def __init__(self, events: list[dict], subscriptions: dict[str, dict] | None = None) -> None:
        self.events = sorted(events, key=lambda e: (e["created"], e["id"]), reverse=True)
        self.subscriptions = subscriptions or {}
        self.pages: list[tuple[int, int | None]] = []
        self.retrieved: list[str] = []
        self.lock = threading.Lock()

    def events_page(self, types, after, until, starting_after=None):
        assert tuple(types) == SUBSCRIPTION_EVENTS
        with self.lock:
            self.pages.append((after, until))
        inside = [e for e in self.events if e["created"] > after and (until is None or e["created"] <= until)]
        if starting_after is not None:
            inside = inside[[e["id"] for e in inside].index(starting_after) + 1 :]
        return {"object": "list", "data": inside[:100], "has_more": len(inside) > 100}

    def retrieve_subscription(self, subscription_id):
        self.retrieved.append(subscription_id)
        return self.subscriptions[subscription_id]


def test_each_subscription_comes_back_as_its_newest_event_shows_it():
    old, new = sub("sub_1", NOW - 100, NOW), sub("sub_1", NOW, NOW + 100)
    stripe = Events([event(1, NOW - 50, old), event(2, NOW - 10, new), event(3, NOW - 5, sub("sub_2", 1, 2))])

    found = subscription_changes(stripe, NOW - 60)

    assert sorted(found, key=lambda s: s["id"]) == [new, sub("sub_2", 1, 2)]
    assert stripe.pages == [(NOW - 60, None)]


def test_an_older_rendering_has_its_period_moved_to_the_items_and_one_without_is_read_again():
    basil = sub("sub_bare", NOW, NOW + 10)
    stripe = Events(
        [
            event(1, NOW - 5, sub("sub_old", NOW, NOW + 10, on_items=False)),
            event(2, NOW - 4, {"id": "sub_bare", "items": {"data": [{"id": "si_bare"}]}}),
        ],
        {"sub_bare": basil},
    )

    found = {s["id"]: s for s in subscription_changes(stripe, NOW - 60)}

    assert found["sub_old"]["items"]["data"][0]["current_period_end"] == NOW + 10
    assert found["sub_old"] == items_with_periods(sub("sub_old", NOW, NOW + 10, on_items=False))
    assert found["sub_bare"] is basil
    assert stripe.retrieved == ["sub_bare"]


def test_a_crowded_range_is_split_and_the_ranges_are_cut_where_asked():
    # 2,000 changes in the last hour: twenty pages, read in several ranges at once.
    events = [event(n, NOW - 3600 + n, sub(f"sub_{n:05d}", NOW, NOW + 86400)) for n in range(2000)]
    stripe = Events(events)

    found = subscription_changes(stripe, NOW - 86400, cuts=[NOW - 1800, NOW - 999_999_999])

    assert len(found) == 2000
    assert (NOW - 86400, NOW - 1800) in stripe.pages
    assert (NOW - 1800, None) in stripe.pages
    assert len(set(stripe.pages)) > 2, "a crowded range is halved while it is read"
    assert len(stripe.pages) <= 30
