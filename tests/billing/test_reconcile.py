"""Reconciliation lines and the corrections planned from them."""

from __future__ import annotations

import json
from datetime import date

import pytest

from airflow_provider_stripe_meter.billing.reconcile import compare, summarize

D1, D2 = date(2026, 11, 22), date(2026, 11, 23)


def test_every_status():
    expected = {
        ("cus_ok", D1): (10, 100),
        ("cus_short", D1): (10, 101),
        ("cus_missing", D2): (7, 102),
        ("cus_ghost", D1): (3, 103),
    }
    recorded = {("cus_ok", D1): 10, ("cus_short", D1): 6, ("cus_over", D2): 4}
    lines = compare(expected, recorded, {"cus_ghost"})
    table = {
        (line.customer_id, line.day): (line.expected, line.recorded, line.difference, line.status)
        for line in lines
    }
    assert table == {
        ("cus_ok", "2026-11-22"): (10, 10, 0, "ok"),
        ("cus_short", "2026-11-22"): (10, 6, 4, "short"),
        ("cus_missing", "2026-11-23"): (7, 0, 7, "missing"),
        ("cus_ghost", "2026-11-22"): (3, None, 3, "customer_unknown"),
        ("cus_over", "2026-11-23"): (0, 4, -4, "over"),
    }
    assert summarize(lines) == {"ok": 1, "missing": 1, "short": 1, "over": 1, "customer_unknown": 1}


def test_an_expectation_survives_its_json_form_and_compares_only_its_days():
    from airflow_provider_stripe_meter.billing.reconcile import Expectation

    wanted = Expectation(
        meter_id="mtr_1",
        expected={("cus_a", date(2026, 11, 2)): (5, 1_762_041_600), ("cus_b", date(2026, 11, 2)): (3, None)},
        first=date(2026, 11, 2),
        last=date(2026, 11, 2),
        customers=["cus_a", "cus_b", "cus_c"],
        skipped_rows={"invalid": 1},
    )

    again = Expectation.from_json(json.loads(json.dumps(wanted.to_json())))

    assert again == wanted
    recorded = {("cus_a", date(2026, 11, 2)): 5, ("cus_a", date(2026, 11, 3)): 9}  # the 3rd is not compared
    lines = again.compare(recorded, unknown={"cus_b"})
    assert [(line.customer_id, line.status) for line in lines] == [
        ("cus_a", "ok"),
        ("cus_b", "customer_unknown"),
    ]


@pytest.mark.parametrize(
    ("expected", "ledger", "recorded", "status", "cause"),
    [
        (100, 100, 100, "ok", ""),
        (125, 100, 100, "short", "not_sent"),  # late rows the batch has not billed yet
        (100, 100, 60, "short", "not_in_stripe"),  # summaries trail, or Stripe dropped events
        (100, 100, 130, "over", "another_sender"),  # events this pipeline did not send
        (80, 100, 100, "over", "source_went_down"),  # rows deleted after billing
    ],
)
def test_a_difference_is_explained_by_the_ledger(expected, ledger, recorded, status, cause):
    from datetime import date

    from airflow_provider_stripe_meter.billing.reconcile import CAUSES, compare, explain

    [line] = compare({("cus_a", date(2026, 12, 1)): (expected, 1)}, {("cus_a", date(2026, 12, 1)): recorded})
    assert line.status == status
    explained = explain(line, ledger)
    assert (explained.ledger, explained.cause) == (ledger, cause)
    assert not cause or cause in CAUSES
