"""The run's summary line says when a run is not a success, reason first, in a billing reader's words.

The task stays green when rows are invalid or usage is held (the DAG branches on ``success``;
``fail_on_error`` makes it red), so the one line the batch operator logs is where a reader of
the task log learns it. Each history runs the billing core in-process (:mod:`tests.billing.world`)
and reads the line built from the result the operator returns, next to what reached Stripe.
"""

from __future__ import annotations

import pytest

from airflow_provider_stripe_meter.billing.result import not_a_success, summary_line
from tests.billing.world import HOUR, World, midnight


@pytest.fixture
def world(tmp_path, monkeypatch):
    def make(**kwargs):
        return World(tmp_path, monkeypatch, **kwargs)

    return make


def yesterday(w: World, hour: int) -> int:
    return midnight(-1, int(w.now)) + hour * HOUR


def test_a_night_with_a_fraction_and_a_non_stripe_customer_says_not_a_success_first(world):
    w = world()
    w.add("cus_a", 10, yesterday(w, 1))
    w.add("user_7", 3, yesterday(w, 2))  # an internal user id, not Stripe's
    w.add("cus_b", 12.5, yesterday(w, 3))  # type: ignore[arg-type]  # thousands of tokens, say
    w.add("cus_b", 4, yesterday(w, 4))

    result = w.run()

    # The good rows are billed; the bad ones are not, and the run is not a success.
    assert w.billed() == {("cus_a", "2026-11-19"): 10, ("cus_b", "2026-11-19"): 4}
    assert (result["success"], result["invalid"], result["sent"]) == (False, 2, 2)
    line = summary_line(result)
    assert line.startswith(
        "NOT A SUCCESS: 2 invalid rows (row 2: customer_id 'user_7' must be a Stripe customer id"
    ), line
    # Rows count from 1: 12.5 is the third row, and the line says what to do about it.
    assert "; row 3: value 12.5 must be a whole number (Stripe's meters take whole numbers only): " in line
    assert "bill in a smaller unit (tokens, not thousands of tokens; milliseconds, not seconds)" in line
    # The figures follow the reasons, as on a run that is a success.
    assert "; Billed: rows 4 -> customer-days 2: sent 2, " in line
    assert "invalid 2;" in line


def test_a_run_that_is_a_success_reads_as_before(world):
    w = world()
    for c in range(3):
        w.add(f"cus_{c}", 5 + c, yesterday(w, 1 + c))

    result = w.run()

    assert result["success"] is True
    assert not_a_success(result) == []
    line = summary_line(result)
    assert line.startswith("Billed: rows 3 -> customer-days 3: sent 3, already recorded 0, over 0, ")
    assert "NOT A SUCCESS" not in line
    # A re-run sends nothing: still a success, and the line says nothing was sent.
    w.advance(HOUR)
    again = w.run(run_id="rerun")
    assert summary_line(again).startswith("Billed: rows 3 -> customer-days 3: sent 0, already recorded 3, ")


def test_usage_of_a_customer_stripe_does_not_know_is_named_as_held(world):
    w = world(customers=["cus_known"])
    w.add("cus_known", 7, yesterday(w, 1))
    w.add("cus_crm_later", 9, yesterday(w, 2))

    result = w.run()

    assert w.billed() == {("cus_known", "2026-11-19"): 7}  # nothing of the unknown customer's sent
    assert result["success"] is False
    line = summary_line(result)
    assert line.startswith(
        "NOT A SUCCESS: held, not sent: 1 customer-day of customers Stripe does not know "
        "(cus_crm_later on 2026-11-19"
    ), line
    assert "; Billed: rows 2 -> customer-days 2: sent 1, " in line


def test_a_dry_run_with_rows_outside_stripes_window_says_so_and_is_a_dry_run(world):
    w = world()
    w.add("cus_a", 1, yesterday(w, 1))
    w.add("cus_old", 2, midnight(-40, int(w.now)))
    w.add("cus_old", 3, midnight(-38, int(w.now)))
    w.add("cus_old", 4, midnight(-37, int(w.now)))

    result = w.run(dry_run=True)

    assert w.stripe_state.events == []  # a dry run sends nothing
    line = summary_line(result)
    assert line.startswith(
        "NOT A SUCCESS: 3 rows older than Stripe's 35 days, skipped "
        "(e.g. row 2: cus_old at 2026-10-11T00:00:00+00:00; row 3: cus_old at 2026-10-13T00:00:00+00:00); "
        "Dry run: rows 4 -> customer-days 1:"
    ), line
