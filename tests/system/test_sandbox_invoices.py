"""The invoice guarantee against a real Stripe sandbox; runs only when STRIPE_SANDBOX_API_KEY is set.

A UTC day that a billing period ends inside is billed in two parts, each on its own invoice:
the invoice of the period that ended holds exactly the source's usage before the boundary, and
the next period the rest. Stripe decides which invoice an event lands on from the event's
timestamp and the subscription item's period, so only real Stripe can say this holds.

The story runs on a test clock (https://docs.stripe.com/billing/testing/test-clocks/api-advanced-usage):
three customers subscribed to a monthly metered price anchored at 14:37:12 UTC, so a period ends
inside day D. The clock is moved just past that end (the period's invoice is a draft, inside
the finalization grace period), the batch operator bills day D from rows on both sides of the
boundary with ``billing_periods="hold"``, then the clock is moved past the grace period and the
finalized invoice and the next period's preview are read.

Time, and why the story is set in the recent past: the meter event endpoint takes timestamps at
most 35 days old and 5 minutes ahead (https://docs.stripe.com/api/billing/meter-event/create),
while the subscriptions' periods follow the test clock. So the clock starts two and a half days
back and is only ever advanced to instants already past on the wall clock, and the operator's
"now" is the clock's frozen time: every event is stamped inside its period, at or before the
clock's time, and inside the endpoint's window by either clock.

Needs a secret or restricted test-mode key that can write test clocks, billing meters (and
meter events), products, prices, customers, subscriptions and invoices. Everything it creates is
removed at the end: deleting the test clock deletes its customers and subscriptions; the meter
is deactivated, the price and product archived. Bounded to 10 minutes.

Run it with: ``STRIPE_SANDBOX_API_KEY=sk_test_... ./dev test tests/system/test_sandbox_invoices.py``
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pytest

if TYPE_CHECKING:
    import stripe

KEY = os.environ.get("STRIPE_SANDBOX_API_KEY")
pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(not KEY, reason="STRIPE_SANDBOX_API_KEY not set: no real Stripe sandbox to talk to"),
]

DAY = 86400
#: Seconds the whole story may take; every wait below is bounded by what is left of it.
BUDGET = 600.0
#: The subscriptions' billing cycle anchor, a time of day: the period ends mid-day.
ANCHOR_OF_DAY = 14 * 3600 + 37 * 60 + 12
#: How long after the period's end the billing run happens: its invoice is a draft until the
#: account's finalization grace period (1 hour by default) has passed, and the operator treats
#: a draft finalizing within 10 minutes as final already.
RUN_AFTER_END = 20 * 60
T = TypeVar("T")


class Deadline:
    """The story's time limit, shared by every wait."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def wait_for(self, what: str, probe: Callable[[], T | None], every: float = 3.0) -> T:
        """Call ``probe`` until it returns something, every ``every`` seconds, or fail the test."""
        while True:
            found = probe()
            if found is not None:
                return found
            if time.monotonic() + every > self.end:
                pytest.fail(f"Gave up waiting for {what}: the test's {BUDGET:.0f} s are up")
            time.sleep(every)


@dataclass
class _TaskInstance:
    """What the batch operator reads of its task instance: who writes the ledger's rows, the
    metrics' tags, and where a run that fails pushes its outcome."""

    dag_id: str = "sandbox_invoices"
    task_id: str = "bill"
    run_id: str = "sandbox"
    map_index: int = -1
    try_number: int = 1
    pushed: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def _iso(stamp: int) -> str:
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat()


def _at(stamp: int) -> datetime:
    return datetime.fromtimestamp(stamp, timezone.utc)


def _advance(client: stripe.StripeClient, clock_id: str, to: int, deadline: Deadline) -> None:
    """Advance the test clock to ``to`` and wait until it is ``ready`` there: Stripe moves the
    clock's objects (renewals, invoices, finalizations) asynchronously.

    .. seealso:: https://docs.stripe.com/api/test_clocks/advance
    """
    client.v1.test_helpers.test_clocks.advance(clock_id, {"frozen_time": to})

    def ready() -> bool | None:
        clock = client.v1.test_helpers.test_clocks.retrieve(clock_id)
        if clock.status == "internal_failure":
            pytest.fail(f"Test clock {clock_id} failed to advance to {_iso(to)}")
        return True if clock.status == "ready" and clock.frozen_time == to else None

    deadline.wait_for(f"test clock {clock_id} to be ready at {_iso(to)}", ready)


def _cycle_invoice(
    client: stripe.StripeClient, subscription: str, *, finalized: bool = False
) -> stripe.Invoice | None:
    """The subscription's invoice for the period that ended (not the one made when it began),
    once it exists (``finalized``: once it is no longer a draft)."""
    found = [
        invoice
        for invoice in client.v1.invoices.list({"subscription": subscription, "limit": 10}).auto_paging_iter()
        if invoice.billing_reason == "subscription_cycle"
    ]
    assert len(found) <= 1, [i.id for i in found]
    if not found or (finalized and found[0].status == "draft"):
        return None
    return found[0]


def _holds(client: stripe.StripeClient, meter: str, customer: str, day: int, expected: int) -> bool | None:
    """Whether the meter's figure for ``customer`` over the UTC day starting at ``day`` is
    ``expected`` (``None`` while it is not: summaries trail the events).

    .. seealso:: https://docs.stripe.com/api/billing/meter-event-summary
    """
    summaries = client.v1.billing.meters.event_summaries.list(
        meter, {"customer": customer, "start_time": day, "end_time": day + DAY}
    )
    return True if sum(s.aggregated_value for s in summaries.data) == expected else None


def _metered_quantity(lines: list[stripe.InvoiceLineItem], price: str, subscription: str) -> int:
    """The quantity billed through ``price`` on ``subscription``'s item in ``lines``.

    Since API version 2025-03-31.basil a line names its subscription and price under ``parent``
    and ``pricing``.

    .. seealso:: https://docs.stripe.com/changelog/basil/2025-03-31/adds-new-parent-field-to-invoicing-objects
    """
    total = 0
    for line in lines:
        details = line.parent.subscription_item_details if line.parent else None
        priced = line.pricing.price_details if line.pricing else None
        if details is None or priced is None or details.subscription != subscription:
            continue
        line_price = priced.price if isinstance(priced.price, str) else priced.price.id
        if line_price == price:
            total += int(line.quantity or 0)
    return total


def _bill(
    rows: list[tuple[str, int, datetime]], event_name: str, now: int, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """One run of the batch operator over ``rows`` (``rows=``), its clock set to ``now``, on the
    ``stripe_sandbox`` connection and the ``ledger_sandbox`` ledger; returns its outcome."""
    from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator
    from airflow_provider_stripe_meter.utils.clock import SYSTEM

    offset = now - time.time()
    # The operator's "now" is the test clock's: which periods are open, which drafts still take
    # usage, which rows are too new, all follow the clock the subscriptions live on.
    monkeypatch.setattr(SYSTEM, "source", lambda: time.time() + offset)
    operator = StripeMeterEventBatchOperator(
        task_id="bill",
        event_name=event_name,
        rows=rows,
        stripe_conn_id="stripe_sandbox",
        ledger_conn_id="ledger_sandbox",
        billing_periods="hold",
        # No Asset outlet: no Airflow run here to record an Asset event on.
        outlets=[],
    )
    return operator.execute(cast("Any", {"ti": _TaskInstance()}))


def test_a_day_a_period_ends_in_is_billed_in_two_parts_each_on_its_invoice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stripe

    assert KEY is not None
    monkeypatch.setenv("AIRFLOW_CONN_STRIPE_SANDBOX", json.dumps({"conn_type": "stripe", "password": KEY}))
    ledger = tmp_path / "ledger.db"
    monkeypatch.setenv(
        "AIRFLOW_CONN_LEDGER_SANDBOX", json.dumps({"conn_type": "sqlite", "host": str(ledger)})
    )
    client = stripe.StripeClient(KEY, max_network_retries=2)
    deadline = Deadline(BUDGET)

    # Day D is two UTC days back: every row of it, even after the period's end, is in the past.
    day = (int(time.time()) // DAY - 2) * DAY
    end = day + ANCHOR_OF_DAY
    start = day - 6 * 3600
    run_at = end + RUN_AFTER_END
    tag = uuid.uuid4().hex[:12]
    event_name = f"sandbox_invoices_{tag}"

    with ExitStack() as cleanup:
        # Made in this order so that they are removed in the reverse one: the clock (and its
        # customers and subscriptions) first, the price before its product, the meter last.
        meter = client.v1.billing.meters.create(
            {
                "display_name": f"stripe-meter sandbox test {tag}",
                "event_name": event_name,
                "default_aggregation": {"formula": "sum"},
                "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
                "value_settings": {"event_payload_key": "value"},
            }
        )
        cleanup.callback(client.v1.billing.meters.deactivate, meter.id)
        product = client.v1.products.create({"name": f"stripe-meter sandbox test {tag}"})
        cleanup.callback(client.v1.products.update, product.id, {"active": False})
        price = client.v1.prices.create(
            {
                "product": product.id,
                "currency": "usd",
                "unit_amount": 1,
                "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
            }
        )
        cleanup.callback(client.v1.prices.update, price.id, {"active": False})
        clock = client.v1.test_helpers.test_clocks.create(
            {"frozen_time": start, "name": f"stripe-meter sandbox test {tag}"}
        )
        cleanup.callback(client.v1.test_helpers.test_clocks.delete, clock.id)

        customers: dict[str, str] = {}
        subscriptions: dict[str, str] = {}
        for who in ("both_sides", "after_only", "before_only"):
            customer = client.v1.customers.create({"name": f"{who} {tag}", "test_clock": clock.id})
            # The anchor in the future (of the clock) makes the first period [start, end): it ends
            # mid-day D. Invoices are sent rather than charged: no payment method is needed.
            subscription = client.v1.subscriptions.create(
                {
                    "customer": customer.id,
                    "items": [{"price": price.id}],
                    "billing_cycle_anchor": end,
                    "collection_method": "send_invoice",
                    "days_until_due": 30,
                }
            )
            customers[who], subscriptions[who] = customer.id, subscription.id
        a, b, c = customers["both_sides"], customers["after_only"], customers["before_only"]
        rows = [
            (a, 60, _at(day + 9 * 3600)),
            (a, 40, _at(end - 7)),  # in the boundary's minute, before it
            (a, 30, _at(end + 28)),  # in the boundary's minute, after it
            (a, 70, _at(end + 13 * 60)),
            (b, 5, _at(end + 8 * 60)),
            (c, 25, _at(day + 3 * 3600)),
            (c, 7, _at(end - 7 * 60)),
        ]
        before = {
            who: sum(v for w, v, t in rows if w == customers[who] and t < _at(end)) for who in customers
        }
        after = {
            who: sum(v for w, v, t in rows if w == customers[who] and t >= _at(end)) for who in customers
        }
        assert (before, after) == (
            {"both_sides": 100, "after_only": 0, "before_only": 32},
            {"both_sides": 100, "after_only": 5, "before_only": 0},
        )

        # Just past the period's end: its invoice is a draft, the next period has begun.
        _advance(client, clock.id, run_at, deadline)
        drafts = {
            who: deadline.wait_for(
                f"the draft invoice of {subscriptions[who]}",
                partial(_cycle_invoice, client, subscriptions[who]),
            )
            for who in customers
        }
        assert {d.status for d in drafts.values()} == {"draft"}, drafts
        finalizes_at = max(int(d.automatically_finalizes_at or 0) for d in drafts.values())
        assert finalizes_at - run_at > 15 * 60, (
            f"The drafts finalize at {_iso(finalizes_at)}: the account's finalization grace period "
            "must leave the run at least 15 minutes (Stripe's default is 1 hour)"
        )

        outcome = _bill(rows, event_name, run_at, monkeypatch)

        assert outcome["success"] is True, outcome
        assert outcome["invoices"]["meters_in_periods"] == [event_name]
        # Three customer-days, one of them split at the period's end: four events.
        assert (outcome["events_sent"], outcome["invoice_final"]) == (4, 0), outcome

        # Stripe aggregates meter events asynchronously: wait until its figure for day D holds
        # every event, so the invoice is finalized from all of them.
        for who, customer_id in customers.items():
            deadline.wait_for(
                f"Stripe's figure of day {_iso(day)[:10]} for {customer_id}",
                partial(_holds, client, meter.id, customer_id, day, before[who] + after[who]),
            )

        # Past the grace period: each period's invoice is finalized with what it held by then.
        _advance(client, clock.id, finalizes_at + 10 * 60, deadline)
        for who, subscription_id in subscriptions.items():
            invoice = deadline.wait_for(
                f"the invoice of {subscription_id} to be finalized",
                partial(_cycle_invoice, client, subscription_id, finalized=True),
            )
            assert invoice.status in ("open", "paid"), (who, invoice.id, invoice.status)
            lines = list(client.v1.invoices.line_items.list(invoice.id, {"limit": 100}).auto_paging_iter())
            assert _metered_quantity(lines, price.id, subscription_id) == before[who], (who, invoice.id)

            # The next period holds the rest of the day, on the invoice to come.
            preview = client.v1.invoices.create_preview({"subscription": subscription_id})
            assert not preview.lines.has_more, preview.lines
            assert _metered_quantity(preview.lines.data, price.id, subscription_id) == after[who], who
