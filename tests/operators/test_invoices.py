"""Every invoice holds the source's usage for its billing period, whatever the history of runs.

Real Airflow (dag.test()) and the real stripe SDK against the local server, which bills a metered
price from the meter events stamped in each customer's billing period and finalizes each period's
draft invoice after the grace period. Time is virtual: the operator's clock and the server's are
set to the instant each run happens (nightly at 01:00, hourly through the day).

The timeline: subscriptions anchored on 2026-01-31 14:37:12 UTC, monthly, so November's period
ends on 2026-11-30 14:37:12 (the 31st clamped to the month's last day), inside the UTC day billed.
"""

from __future__ import annotations

import sqlite3
import time

import pendulum
import pytest

from tests.conftest import add_rows, run_dag, xcoms

pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("airflow_db")]

ANCHOR = pendulum.datetime(2026, 1, 31, 14, 37, 12, tz="UTC")
BOUNDARY = pendulum.datetime(2026, 11, 30, 14, 37, 12, tz="UTC")
NOV = (int(pendulum.datetime(2026, 10, 31, 14, 37, 12, tz="UTC").timestamp()), int(BOUNDARY.timestamp()))
DEC = (int(BOUNDARY.timestamp()), int(pendulum.datetime(2026, 12, 31, 14, 37, 12, tz="UTC").timestamp()))
NIGHTLY = pendulum.datetime(2026, 12, 1, 1, 0, tz="UTC")


def rows_at(*rows: tuple[str, int, str]) -> list[tuple[str, int, str]]:
    """Usage rows ``(customer, tokens, "HH:MM:SS")`` on 2026-11-30."""
    return [(c, v, f"2026-11-30 {t}") for c, v, t in rows]


def bill(dag_id: str, to: pendulum.DateTime, start: str = "2026-11-30 00:00:00") -> dict:
    """A run over the usage of [start, to)."""
    run = run_dag(dag_id, run_conf={"from": start, "to": to.strftime("%Y-%m-%d %H:%M:%S")})
    return xcoms(run, "bill")


def invoices(server, customer: str) -> dict[tuple[int, int], tuple[int, str]]:
    """The customer's invoices (and preview) per period since November: quantity and status."""
    return {
        (start, end): figures
        for (who, start, end), figures in server.ledger.billing.invoice_quantities().items()
        if who == customer and end > NOV[0]
    }


def subscribe(server, customers, **kwargs):
    price = server.ledger.billing.add_price("ai_tokens_used")
    return [
        # Subscribed back when the anchor was (the API call's time stamps its events).
        server.ledger.billing.subscribe(
            c, price, anchor=int(ANCHOR.timestamp()), created_at=int(ANCHOR.timestamp()), **kwargs
        )
        for c in customers
    ]


def test_a_day_that_straddles_a_period_end_is_billed_in_two_parts_each_on_its_invoice(
    secret_server, usage_db, at_time
):
    # A 24-hour grace period: the nightly run is in time for the closing invoice.
    secret_server.ledger.billing.grace = 24 * 3600
    subscribe(secret_server, ["cus_a", "cus_b"])
    add_rows(
        usage_db,
        rows_at(
            ("cus_a", 60, "09:00:00"),
            ("cus_a", 40, "14:37:05"),  # in the boundary's minute, before it
            ("cus_a", 30, "14:37:40"),  # in the boundary's minute, after it
            ("cus_a", 70, "20:00:00"),
            ("cus_b", 5, "23:59:59"),  # after the boundary only
        ),
    )
    at_time(NIGHTLY)
    outcome = bill("t_invoice_hold", NIGHTLY.start_of("day"))

    assert outcome["success"] is True
    assert outcome["invoices"]["meters_in_periods"] == ["ai_tokens_used"]
    assert invoices(secret_server, "cus_a") == {NOV: (100, "draft"), DEC: (100, "upcoming")}
    assert invoices(secret_server, "cus_b") == {NOV: (0, "draft"), DEC: (5, "upcoming")}
    # The per-day figure is whole too: 200 on the day, as the source says.
    assert secret_server.ledger.totals() == {"cus_a": 200, "cus_b": 5}

    # The invoice finalizes with the usage before the boundary; a re-run sends nothing.
    at_time(pendulum.datetime(2026, 12, 1, 15, 0, tz="UTC"))
    again = bill("t_invoice_hold", NIGHTLY.start_of("day"))
    assert (again["success"], again["events_sent"]) == (True, 0)
    assert invoices(secret_server, "cus_a") == {NOV: (100, "open"), DEC: (100, "upcoming")}


def test_usage_for_an_invoice_already_final_is_held_and_reported_then_carried_on_request(
    secret_server, usage_db, at_time
):
    # Stripe's default grace period, 1 hour: by the nightly run November's invoice is final.
    subscribe(secret_server, ["cus_a"])
    add_rows(usage_db, rows_at(("cus_a", 100, "10:00:00"), ("cus_a", 100, "18:00:00")))
    at_time(NIGHTLY)

    held = bill("t_invoice_hold", NIGHTLY.start_of("day"))

    assert held["success"] is False
    # The day is not "already recorded": its usage is held, counted apart.
    assert (held["invoice_final"], held["already_recorded"], held["sent"]) == (1, 0, 1)
    assert held["invoices"]["invoice_final"] == {"customer_days": 1, "value": 100}
    [sample] = held["samples"]["invoice_final"]
    assert (sample["customer_id"], sample["value"], sample["period_end"]) == (
        "cus_a",
        100,
        "2026-11-30T14:37:12Z",
    )
    # Nothing went into the locked invoice or into the next one: the 100 units wait.
    assert invoices(secret_server, "cus_a") == {NOV: (0, "open"), DEC: (100, "upcoming")}

    # The team chooses to bill it on the open period: once, and named so in the ledger.
    carried = bill("t_invoice_carry", NIGHTLY.start_of("day"))
    assert (carried["success"], carried["invoice_final"]) == (True, 0)
    assert carried["invoices"]["carried"] == {"events": 1, "value": 100}
    assert invoices(secret_server, "cus_a") == {NOV: (0, "open"), DEC: (200, "upcoming")}
    with sqlite3.connect(usage_db) as con:
        notes = [n for (n,) in con.execute("SELECT note FROM stripe_meter_ledger WHERE note != ''")]
    assert notes == ["carried from the period ending 2026-11-30T14:37:12Z"]
    assert bill("t_invoice_carry", NIGHTLY.start_of("day"))["events_sent"] == 0
    assert bill("t_invoice_hold", NIGHTLY.start_of("day"))["success"] is True


def test_hourly_runs_across_the_boundary_put_each_customers_usage_on_its_own_invoice(
    secret_server, usage_db, at_time
):
    customers = [f"cus_h{i}" for i in range(5)]
    subscribe(secret_server, customers)
    rows = []
    for i, c in enumerate(customers):
        rows += rows_at(
            (c, 1000 + i, f"13:{10 + i}:00"),
            (c, 200 + i, f"14:{20 + i}:00"),
            (c, 30 + i, f"14:37:0{i}"),
            (c, 4 + i, f"14:38:{10 + i}"),
            (c, 500 + i, f"15:{5 + i:02d}:00"),
        )
    add_rows(usage_db, rows)
    for hour in (14, 15, 16):
        now = pendulum.datetime(2026, 11, 30, hour, 0, tz="UTC")
        at_time(now)
        assert bill("t_invoice_hold", now)["success"] is True, hour
    at_time(NIGHTLY)
    nightly = bill("t_invoice_hold", NIGHTLY.start_of("day"))
    assert (nightly["success"], nightly["events_sent"]) == (True, 0)

    for i, c in enumerate(customers):
        before = (1000 + i) + (200 + i) + (30 + i)
        after = (4 + i) + (500 + i)
        assert invoices(secret_server, c) == {NOV: (before, "open"), DEC: (after, "upcoming")}, c


def test_a_subscription_cancelled_at_period_end_bills_its_last_day_up_to_the_end(
    secret_server, usage_db, at_time
):
    secret_server.ledger.billing.grace = 24 * 3600
    subscribe(secret_server, ["cus_a"], cancel_at=int(BOUNDARY.timestamp()))
    add_rows(usage_db, rows_at(("cus_a", 100, "10:00:00"), ("cus_a", 100, "18:00:00")))
    at_time(NIGHTLY)

    outcome = bill("t_invoice_hold", NIGHTLY.start_of("day"))

    # The final invoice holds the usage up to the end; what came after is reported, not lost.
    assert invoices(secret_server, "cus_a") == {NOV: (100, "draft")}
    assert outcome["success"] is False
    assert outcome["invoices"]["subscription_ended"] == {"customer_days": 1, "value": 100}
    assert outcome["samples"]["subscription_ended"][0]["from"] == "2026-11-30T14:37:12Z"


def test_a_subscription_that_starts_mid_day_bills_from_its_start_and_reports_the_rest(
    secret_server, usage_db, at_time
):
    start = pendulum.datetime(2026, 11, 30, 9, 0, tz="UTC")
    price = secret_server.ledger.billing.add_price("ai_tokens_used")
    secret_server.ledger.billing.subscribe(
        "cus_new", price, anchor=int(start.timestamp()), created_at=int(start.timestamp())
    )
    add_rows(usage_db, rows_at(("cus_new", 50, "08:00:00"), ("cus_new", 70, "12:00:00")))
    at_time(NIGHTLY)

    outcome = bill("t_invoice_hold", NIGHTLY.start_of("day"))

    first = (int(start.timestamp()), int(pendulum.datetime(2026, 12, 30, 9, 0, tz="UTC").timestamp()))
    assert invoices(secret_server, "cus_new") == {first: (70, "upcoming")}
    assert outcome["invoices"]["no_invoice"] == {"customer_days": 1, "value": 50}
    assert outcome["success"] is False


def test_a_mapped_run_over_two_connected_accounts_bills_each_accounts_invoices(usage_db, monkeypatch):
    from airflow_provider_stripe_meter.testing import LocalStripeServer
    from airflow_provider_stripe_meter.utils.clock import SYSTEM
    from tests.conftest import SECRET_KEY

    accounts = {"acct_1North": ANCHOR, "acct_1South": pendulum.datetime(2026, 1, 30, 6, 0, tz="UTC")}
    offset = NIGHTLY.timestamp() - time.time()
    monkeypatch.setattr(SYSTEM, "source", lambda: time.time() + offset)
    with sqlite3.connect(usage_db) as con:
        con.execute(
            "CREATE TABLE connect_usage (account TEXT, customer_id TEXT, tokens INTEGER, used_at TEXT)"
        )
        for account in accounts:
            con.executemany(
                "INSERT INTO connect_usage VALUES (?, ?, ?, ?)",
                [
                    (account, "cus_shared", v, f"2026-11-30 {t}")
                    for v, t in ((10, "05:00:00"), (20, "12:00:00"), (40, "20:00:00"))
                ],
            )
    with LocalStripeServer(
        meters=["ai_tokens_used"], accounts=list(accounts), api_keys=[SECRET_KEY]
    ) as server:
        monkeypatch.setenv(
            "AIRFLOW_CONN_STRIPE_DEFAULT", server.connection_json(SECRET_KEY, max_network_retries=1)
        )
        for account, anchor in accounts.items():
            ledger = server.account(account)
            ledger.clock = SYSTEM.now
            ledger.billing.grace = 24 * 3600
            price = ledger.billing.add_price("ai_tokens_used")
            ledger.billing.subscribe(
                "cus_shared", price, anchor=int(anchor.timestamp()), created_at=int(anchor.timestamp())
            )

        run = run_dag(
            "t_invoice_mapped", run_conf={"from": "2026-11-30 00:00:00", "to": "2026-12-01 00:00:00"}
        )

        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session

        with create_session() as session:
            rows = session.query(XComModel).filter(
                XComModel.run_id == run.run_id, XComModel.task_id == "bill", XComModel.key == "success"
            )
            assert sorted(XComModel.deserialize_value(r) for r in rows) == [True, True]
        figures = {
            account: {
                (start, end): q
                for (who, start, end), (q, _) in server.account(account).billing.invoice_quantities().items()
                if end > NOV[0]
            }
            for account in accounts
        }
        south = int(pendulum.datetime(2026, 11, 30, 6, 0, tz="UTC").timestamp())
        assert figures["acct_1North"] == {NOV: 30, DEC: 40}  # split at 14:37:12
        assert figures["acct_1South"] == {
            (int(pendulum.datetime(2026, 10, 30, 6, 0, tz="UTC").timestamp()), south): 10,
            (south, int(pendulum.datetime(2026, 12, 30, 6, 0, tz="UTC").timestamp())): 60,
        }
        assert server.ledger.accepted() == []  # nothing on the platform


def test_the_invoice_check_finds_a_draft_short_of_the_source_and_names_its_deadline(
    secret_server, usage_db, at_time
):
    secret_server.ledger.billing.grace = 24 * 3600
    subscribe(secret_server, ["cus_a", "cus_b"])
    add_rows(
        usage_db, rows_at(("cus_a", 60, "09:00:00"), ("cus_a", 70, "20:00:00"), ("cus_b", 5, "10:00:00"))
    )
    at_time(NIGHTLY)
    bill("t_invoice_hold", NIGHTLY.start_of("day"))
    # Late rows reach the table after the nightly run: November's draft is now short by 40.
    add_rows(usage_db, rows_at(("cus_a", 40, "11:00:00")))
    window = {"from": "2026-11-01 00:00:00", "to": "2026-12-01 00:00:00"}

    found = xcoms(run_dag("t_invoice_check", run_conf=window), "check")

    assert found["success"] is False
    assert found["counts"] == {"ok": 2, "differs": 1}
    [risk] = found["at_risk"]
    assert (risk["customer_id"], risk["status"], risk["source"], risk["invoice"], risk["difference"]) == (
        "cus_a",
        "draft",
        100,
        60,
        40,
    )
    assert risk["deadline"] == NOV[1] + 24 * 3600  # automatically_finalizes_at
    # The batch operator, run again before the deadline, closes the gap.
    bill("t_invoice_hold", NIGHTLY.start_of("day"))
    again = xcoms(run_dag("t_invoice_check", run_conf=window), "check")
    assert (again["success"], again["counts"]) == (True, {"ok": 3, "differs": 0})
    lines = {(x["customer_id"], x["status"]): (x["source"], x["invoice"]) for x in again["lines"]}
    assert lines == {
        ("cus_a", "draft"): (100, 100),
        ("cus_a", "upcoming"): (70, 70),
        ("cus_b", "draft"): (5, 5),
    }


def test_after_the_first_run_subscriptions_are_brought_up_to_date_from_stripes_events(
    secret_server, usage_db, at_time
):
    # Night 1 lists the meter's subscriptions in full and keeps them beside the ledger.
    secret_server.ledger.billing.grace = 24 * 3600
    [sub_a] = subscribe(secret_server, ["cus_a"])
    add_rows(usage_db, [("cus_a", 5, "2026-11-28 10:00:00")])
    at_time(pendulum.datetime(2026, 11, 29, 1, 0, tz="UTC"))
    first = bill("t_invoice_hold", pendulum.datetime(2026, 11, 29, tz="UTC"), start="2026-11-28 00:00:00")
    assert first["success"] is True
    listed = secret_server.stats["v1_subscriptions"]

    # During the day cus_a cancels (ending at noon) and cus_new subscribes from 09:00.
    at_time(pendulum.datetime(2026, 11, 30, 10, 0, tz="UTC"))
    noon = int(pendulum.datetime(2026, 11, 30, 12, 0, tz="UTC").timestamp())
    secret_server.ledger.billing.cancel(sub_a, noon)
    nine = int(pendulum.datetime(2026, 11, 30, 9, 0, tz="UTC").timestamp())
    price = sub_a.price
    secret_server.ledger.billing.subscribe("cus_new", price, anchor=nine)
    add_rows(
        usage_db,
        rows_at(
            ("cus_a", 10, "11:00:00"),
            ("cus_a", 20, "13:00:00"),
            ("cus_new", 7, "08:00:00"),
            ("cus_new", 9, "10:00:00"),
        ),
    )

    # Night 2 reads only the events since night 1: no subscription is listed again.
    at_time(NIGHTLY)
    second = bill("t_invoice_hold", NIGHTLY.start_of("day"))

    assert secret_server.stats["v1_subscriptions"] == listed
    assert secret_server.stats["v1_events"] >= 1
    assert second["invoices"]["subscription_ended"] == {"customer_days": 1, "value": 20}
    assert second["invoices"]["no_invoice"] == {"customer_days": 1, "value": 7}
    assert invoices(secret_server, "cus_a") == {(NOV[0], noon): (15, "draft")}
    new_period = (nine, int(pendulum.datetime(2026, 12, 30, 9, 0, tz="UTC").timestamp()))
    assert invoices(secret_server, "cus_new") == {new_period: (9, "upcoming")}


def test_a_run_that_fails_after_reading_the_periods_still_keeps_what_it_read(
    secret_server, usage_db, at_time
):
    secret_server.ledger.billing.grace = 24 * 3600
    subscribe(secret_server, ["cus_a"])
    # The usage table is gone (a warehouse outage): the run reads the periods, then fails on
    # its source. The subscriptions table is written all the same, after the run.
    with sqlite3.connect(usage_db) as con:
        con.execute("DROP TABLE usage")
    at_time(NIGHTLY)
    failed = run_dag("t_invoice_hold", run_conf={"from": "2026-11-30 00:00:00", "to": "2026-12-01 00:00:00"})
    assert failed.get_state() == "failed"
    listed = secret_server.stats["v1_subscriptions"]
    assert listed >= 1

    with sqlite3.connect(usage_db) as con:
        con.execute("CREATE TABLE usage (customer_id TEXT, tokens INTEGER, used_at TEXT)")
    add_rows(usage_db, rows_at(("cus_a", 25, "20:00:00")))
    outcome = bill("t_invoice_hold", NIGHTLY.start_of("day"))

    assert outcome["success"] is True
    # Not listed again: the failed run's sync was kept.
    assert secret_server.stats["v1_subscriptions"] == listed
    assert invoices(secret_server, "cus_a")[DEC] == (25, "upcoming")
