"""Invoices as Stripe sends them at the pinned API version, not as a simple model would.

Each test is one point where Stripe differs from the picture the invoice work was first built on:
the invoice's subscription lives under ``parent`` (2025-03-31.basil), each period's draft finalizes
on its own schedule (postponed, by hand, early), drafts of other kinds sit beside the cycle's,
invoices page their lines, archived prices keep billing, and events are rendered at the API
version the account had when they happened. Real Airflow (``dag.test()``) and the real SDK against
the local server, whose objects a contract test checks against stripe-python's typed classes.

The timeline is :mod:`tests.operators.test_invoices`': monthly periods anchored on the 31st at
14:37:12 UTC, so November's period ends on 2026-11-30 14:37:12, inside the UTC day billed.
"""

from __future__ import annotations

import pendulum
import pytest

from tests.conftest import add_rows, run_dag, xcoms
from tests.operators.test_invoices import (
    BOUNDARY,
    DEC,
    NIGHTLY,
    NOV,
    bill,
    invoices,
    rows_at,
    subscribe,
)

pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("airflow_db")]

HOUR = 3600
#: The usage of the day billed: 100 before November's period ends, 100 after.
DAY_ROWS = (("10:00:00", 60), ("14:00:00", 40), ("16:00:00", 30), ("20:00:00", 70))


def usage(db, *customers: str) -> None:
    add_rows(db, rows_at(*((c, v, t) for c in customers for t, v in DAY_ROWS)))


def test_each_period_locks_when_its_own_draft_does_postponed_by_hand_or_early(
    secret_server, usage_db, at_time
):
    # Stripe's default grace period (1 hour): by 01:00 November's drafts would be final. But one
    # was postponed to noon, one finalizes only by hand (auto_advance off), and one was finalized
    # early although the account's grace period is long; the fourth follows the default.
    billing = secret_server.ledger.billing
    postponed, by_hand, _default = subscribe(secret_server, ["cus_late", "cus_hand", "cus_default"])
    at_time(BOUNDARY.add(minutes=5))
    billing.postpone(postponed, NOV[1], int(NIGHTLY.add(hours=11).timestamp()))
    billing.set_auto_advance(by_hand, NOV[1], False)
    usage(usage_db, "cus_late", "cus_hand", "cus_default")
    at_time(NIGHTLY)

    outcome = bill("t_invoice_hold", NIGHTLY.start_of("day"))

    assert invoices(secret_server, "cus_late") == {NOV: (100, "draft"), DEC: (100, "upcoming")}
    assert invoices(secret_server, "cus_hand") == {NOV: (100, "draft"), DEC: (100, "upcoming")}
    # The default draft finalized at 15:37:12: its usage is held and named, not sent to nowhere.
    assert invoices(secret_server, "cus_default") == {NOV: (0, "open"), DEC: (100, "upcoming")}
    assert outcome["invoices"]["invoice_final"] == {"customer_days": 1, "value": 100}
    assert outcome["success"] is False
    # A draft finalized by hand may lock at any moment: the run names it.
    assert outcome["invoices"]["drafts_by_hand"] == {
        "count": 1,
        "sample": [{"subscription": by_hand.id, "period_end": "2026-11-30T14:37:12Z"}],
    }


def test_a_draft_finalized_early_by_hand_is_final_though_the_grace_period_runs_on(
    secret_server, usage_db, at_time
):
    billing = secret_server.ledger.billing
    billing.grace = 72 * HOUR
    early, _kept = subscribe(secret_server, ["cus_early", "cus_kept"])
    usage(usage_db, "cus_early", "cus_kept")
    at_time(NIGHTLY.subtract(minutes=30))
    billing.finalize(early, NOV[1])
    at_time(NIGHTLY)

    outcome = bill("t_invoice_hold", NIGHTLY.start_of("day"))

    assert invoices(secret_server, "cus_early") == {NOV: (0, "open"), DEC: (100, "upcoming")}
    assert invoices(secret_server, "cus_kept") == {NOV: (100, "draft"), DEC: (100, "upcoming")}
    assert outcome["invoices"]["invoice_final"] == {"customer_days": 1, "value": 100}
    [sample] = outcome["samples"]["invoice_final"]
    assert (sample["customer_id"], sample["value"]) == ("cus_early", 100)


def test_drafts_of_other_kinds_tell_nothing_of_a_periods_lock(secret_server, usage_db, at_time):
    # The newest drafts are a manual one-off invoice and a subscription_update draft locking
    # within the hour; the cycle's draft of November has 23 hours to go.
    billing = secret_server.ledger.billing
    billing.grace = 24 * HOUR
    [sub] = subscribe(secret_server, ["cus_a"])
    at_time(NIGHTLY.subtract(minutes=10))
    soon = int(NIGHTLY.add(minutes=20).timestamp())
    billing.add_draft("cus_other", billing_reason="manual", finalizes_at=soon)
    billing.add_draft("cus_a", billing_reason="subscription_update", subscription=sub, finalizes_at=soon)
    usage(usage_db, "cus_a")
    at_time(NIGHTLY)

    outcome = bill("t_invoice_hold", NIGHTLY.start_of("day"))

    assert outcome["success"] is True
    assert invoices(secret_server, "cus_a") == {NOV: (100, "draft"), DEC: (100, "upcoming")}


def test_a_metered_line_past_the_first_page_of_lines_is_found(secret_server, usage_db, at_time):
    # Ten licensed lines come first: Stripe embeds only those; the metered line is on the
    # invoice's next page of lines.
    billing = secret_server.ledger.billing
    billing.grace = 24 * HOUR
    [sub] = subscribe(secret_server, ["cus_a"])
    sub.other_lines = 10
    usage(usage_db, "cus_a")
    at_time(NIGHTLY)

    outcome = bill("t_invoice_hold", NIGHTLY.start_of("day"))
    assert outcome["success"] is True
    assert invoices(secret_server, "cus_a") == {NOV: (100, "draft"), DEC: (100, "upcoming")}

    # The invoice check reads the draft's every line too: it bills what the source says.
    add_rows(usage_db, rows_at(("cus_a", 7, "11:00:00")))
    run = run_dag("t_invoice_check", run_conf={"from": "2026-11-30 00:00:00", "to": "2026-12-01 00:00:00"})
    check = xcoms(run, "check")
    draft = [line for line in check["lines"] if line["status"] == "draft"]
    assert [(d["period_end"], d["source"], d["invoice"], d["difference"]) for d in draft] == [
        (NOV[1], 107, 100, 7)
    ]


def test_an_archived_price_keeps_billing_its_subscriptions(secret_server, usage_db, at_time):
    # A grandfathered plan: the price was archived, its subscriptions bill on.
    billing = secret_server.ledger.billing
    billing.grace = 24 * HOUR
    [sub] = subscribe(secret_server, ["cus_a"])
    billing.archive(sub.price)
    usage(usage_db, "cus_a")
    at_time(NIGHTLY)

    outcome = bill("t_invoice_hold", NIGHTLY.start_of("day"))

    assert outcome["success"] is True
    assert outcome["invoices"]["no_invoice"] == {"customer_days": 0, "value": 0}
    assert invoices(secret_server, "cus_a") == {NOV: (100, "draft"), DEC: (100, "upcoming")}


def test_renewals_read_from_events_of_an_account_on_an_older_api_version(secret_server, usage_db, at_time):
    # The account's default API version predates 2025-03-31.basil: its events render a
    # subscription with the period on the subscription and none on the items. The first run lists
    # the subscriptions (at the pinned version); the next reads the renewal from an event.
    billing = secret_server.ledger.billing
    billing.grace = 24 * HOUR
    billing.set_account_api_version("2024-06-20")
    subscribe(secret_server, ["cus_a"])
    add_rows(usage_db, [("cus_a", 5, "2026-11-29 12:00:00")])
    at_time(pendulum.datetime(2026, 11, 30, 1, 0, tz="UTC"))
    first = bill("t_invoice_hold", pendulum.datetime(2026, 11, 30, tz="UTC"), start="2026-11-29 00:00:00")
    assert first["success"] is True

    usage(usage_db, "cus_a")
    at_time(NIGHTLY)
    outcome = bill("t_invoice_hold", NIGHTLY.start_of("day"))

    assert outcome["success"] is True
    assert outcome["invoices"]["read"]["changes"] >= 1  # read from events, not listed again
    assert invoices(secret_server, "cus_a") == {NOV: (105, "draft"), DEC: (100, "upcoming")}
