"""Usage of customers Stripe does not know yet is held (``customer_unknown``), never counted as billed.

Stripe answers 200 to a meter event for a customer it does not know and drops the event later;
a CRM that creates customers after the nightly run is normal. Each history asserts what reached
Stripe (the local server's events and per-day figures) and what the run returned. The billing
core runs in-process (:mod:`tests.billing.world`); the wiring (hook, HTTP, Airflow) is tested
against the local server at the end.
"""

from __future__ import annotations

import sqlite3

import pytest
import stripe

from tests.billing.world import HOUR, World, midnight
from tests.conftest import at, run_dag, task_states, xcoms
from tests.operators.test_billing_truth import source_figures

KNOWN = [f"cus_{c:03d}" for c in range(7)]
LATE = [f"cus_{c:03d}" for c in range(7, 10)]  # created in Stripe after the night


@pytest.fixture
def world(tmp_path, monkeypatch):
    def make(**kwargs):
        return World(tmp_path, monkeypatch, **kwargs)

    return make


def night(w: World, customers: int, day: int = -1, per_customer: int = 2) -> None:
    for c in range(customers):
        for r in range(per_customer):
            w.add(f"cus_{c:03d}", 10 + c + r, midnight(day, int(w.now)) + HOUR * (1 + r) + c)


def sent_to(w: World) -> set[str]:
    """Every customer an event reached Stripe for (dropped ones included)."""
    return {e.payload["stripe_customer_id"] for e in w.stripe_state.events}


def known_table(w: World) -> set[str]:
    with sqlite3.connect(w.db) as con:
        return {c for (c,) in con.execute("SELECT customer_id FROM stripe_meter_ledger_customers")}


@pytest.mark.parametrize("formula", ["sum", "count"])
def test_customers_created_after_the_night_are_held_then_billed_by_the_rerun(world, formula):
    w = world(formula=formula, customers=KNOWN)
    night(w, 10)

    first = w.run()

    assert (first["success"], first["sent"], first["customer_unknown"]) == (False, 7, 3)
    assert sent_to(w) == set(KNOWN)  # nothing of theirs reached Stripe
    held_value = sum(v for (c, _), v in w.source().items() if c in LATE)
    assert first["invoices"]["customer_unknown"] == {"customer_days": 3, "value": held_value}
    assert {s["customer_id"] for s in first["samples"]["customer_unknown"]} == set(LATE)
    assert {row[0] for row in w.ledger_rows()} == set(KNOWN)  # held usage is not in the ledger
    assert known_table(w) == set(KNOWN)

    for customer in LATE:
        w.stripe_state.add_customer(customer)  # the CRM sync caught up
    w.advance(HOUR)
    again = w.run(run_id="rerun")

    assert (again["success"], again["sent"], again["customer_unknown"]) == (True, 3, 0)
    assert again["customer_requests"] == 3  # only the three it had not met
    events = [e.payload["stripe_customer_id"] for e in w.stripe_state.events]
    assert sorted(events[-again["events_sent"] :]) == sorted(
        c for c in LATE for _ in range(2 if formula == "count" else 1)
    )
    assert w.billed() == w.source()
    assert known_table(w) == set(KNOWN) | set(LATE)


def test_a_steady_night_asks_stripe_nothing_about_customers(world):
    w = world()
    night(w, 20)
    first = w.run()
    assert (first["success"], first["customer_requests"]) == (True, 20)
    asked = w.stripe.requests["customers"]

    w.advance(24 * HOUR)
    night(w, 20, day=-1)
    steady = w.run(run_id="next night")

    assert (steady["success"], steady["sent"], steady["customer_requests"]) == (True, 20, 0)
    assert w.stripe.requests["customers"] == asked
    assert w.billed() == w.source()


def test_many_new_customers_are_listed_once_and_the_unlisted_are_asked_about(world):
    customers = [f"cus_{c:03d}" for c in range(150)]
    w = world(customers=customers[:-4])
    night(w, 150, per_customer=1)

    first = w.run()

    # Two pages of 146 customers, then the four the list lacks, one by one.
    assert (first["customer_requests"], w.stripe.requests["customers"]) == (6, 6)
    assert (first["success"], first["sent"], first["customer_unknown"]) == (False, 146, 4)
    assert sent_to(w) == set(customers[:-4])

    for customer in customers[-4:]:
        w.stripe_state.add_customer(customer)
    again = w.run(run_id="rerun")
    assert (again["success"], again["sent"], again["customer_requests"]) == (True, 4, 4)
    assert w.billed() == w.source()


def test_a_dry_run_reports_unknown_customers_and_writes_nothing(world):
    w = world(customers=KNOWN)
    night(w, 10, per_customer=1)

    dry = w.run(dry_run=True)

    assert dry["success"] is False
    assert dry["invoices"]["customer_unknown"]["customer_days"] == 3
    held = [line for line in dry["plan"] if line["customer_id"] in LATE]
    assert [line["action"] for line in held] == ["leave_alone"] * 3
    assert w.stripe_state.events == []
    assert known_table(w) == set()  # a dry run writes no table
    real = w.run(run_id="real")
    assert (real["customer_requests"], real["sent"], real["customer_unknown"]) == (10, 7, 3)


def test_a_customer_deleted_in_stripe_is_held(world):
    w = world()
    night(w, 3, per_customer=1)
    w.stripe_state.delete_customer("cus_002")

    first = w.run()

    assert (first["success"], first["sent"], first["customer_unknown"]) == (False, 2, 1)
    assert sent_to(w) == {"cus_000", "cus_001"}


# -- the hook and the local server, over HTTP --------------------------------------------------------


def test_the_hook_asks_stripe_about_customers_and_the_server_answers_as_stripe(secret_server):
    from airflow_provider_stripe_meter.hooks.stripe import StripeHook
    from airflow_provider_stripe_meter.utils.paced_reads import customers_known

    ledger = secret_server.ledger
    ledger.customers = {f"cus_{c:03d}" for c in range(150)}
    ledger.delete_customer("cus_149")
    hook = StripeHook()

    assert customers_known(hook, ["cus_000", "cus_ghost", "cus_149"], max_rps=200) == {"cus_000"}
    assert hook.customer_ids() == {f"cus_{c:03d}" for c in range(149)}
    assert secret_server.stats["v1_customer"] == 3
    assert secret_server.stats["v1_customers"] == 2  # 100 a page

    # Objects as stripe-python 16.1 declares a Customer: every required field, nothing undeclared.
    body = hook.client.raw_request("get", "/v1/customers/cus_000").data
    declared = set(stripe.Customer.__annotations__)
    assert {"id", "object", "created", "livemode"} <= set(body) <= declared
    assert (body["object"], body["id"]) == ("customer", "cus_000")
    with pytest.raises(stripe.InvalidRequestError) as missing:
        hook.client.raw_request("get", "/v1/customers/cus_ghost")
    assert missing.value.http_status == 404
    assert (missing.value.json_body or {})["error"] == {
        "type": "invalid_request_error",
        "message": "No such customer: 'cus_ghost'",
        "code": "resource_missing",
        "param": "id",
    }


@pytest.mark.airflow
@pytest.mark.usefixtures("airflow_db")
def test_a_nightly_dag_holds_unknown_customers_and_the_rerun_bills_them(secret_server):
    server = secret_server
    server.ledger.customers = set(KNOWN)
    rows = [[f"cus_{c:03d}", 10 + c, at(-1, 60 * c), "ai_tokens_used"] for c in range(10)]

    def bill() -> dict:
        dag_run = run_dag("t_truth_rows", run_conf={"rows": rows})
        assert task_states(dag_run)["bill"] == "success"
        outcome = xcoms(dag_run, "bill")
        return outcome.get("return_value", outcome)

    first = bill()
    assert (first["success"], first["sent"], first["customer_unknown"]) == (False, 7, 3)
    assert {e.payload["stripe_customer_id"] for e in server.ledger.events} == set(KNOWN)

    for customer in LATE:
        server.ledger.add_customer(customer)
    again = bill()
    assert (again["success"], again["sent"]) == (True, 3)
    assert server.ledger.figures("ai_tokens_used") == source_figures(rows)

    asked = server.stats["v1_customer"] + server.stats["v1_customers"]
    steady = bill()
    assert (steady["success"], steady["events_sent"], steady["customer_requests"]) == (True, 0, 0)
    assert server.stats["v1_customer"] + server.stats["v1_customers"] == asked
