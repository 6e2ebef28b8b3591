"""Paced per-customer reads, in-process: each read is a plain function standing in for the hook."""

from __future__ import annotations

import asyncio
import functools
from datetime import date, datetime, timezone

import pytest

from airflow_provider_stripe_meter.exceptions import StripeRequestRejectedError, StripeTransientError
from airflow_provider_stripe_meter.utils import paced_reads
from airflow_provider_stripe_meter.utils.delivery import Deliverer

DAY1 = int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp())


def summary(start: int, value: float) -> dict:
    return {"start_time": start, "end_time": start + 86400, "aggregated_value": value}


class Summaries:
    """Daily summaries per customer (``None``: a customer Stripe does not know), one read each."""

    def __init__(self, by_customer: dict[str, list[dict] | None]) -> None:
        self.by_customer = by_customer
        self.reads: list[tuple] = []

    def summaries_or_unknown(self, meter_id, customer_id, start_time, end_time, window, retry=True):
        self.reads.append((meter_id, customer_id, start_time, end_time, window, retry))
        return self.by_customer[customer_id]

    async def asummaries_or_unknown(self, meter_id, customer_id, start_time, end_time):
        self.reads.append((meter_id, customer_id, start_time, end_time, "day", None))
        return self.by_customer[customer_id]


STRIPE = {
    "cus_a": [summary(DAY1, 3.0), summary(DAY1 + 86400, 0.0), summary(DAY1 + 2 * 86400, 2.0000001)],
    "cus_b": [],
    "cus_ghost": None,
}
EXPECTED = (
    {("cus_a", date(2026, 3, 1)): 3, ("cus_a", date(2026, 3, 3)): 2},
    {"cus_ghost"},
)


def test_recorded_per_day_reads_each_customer_once_without_sdk_retries_over_whole_utc_days():
    stripe = Summaries(STRIPE)
    found = paced_reads.recorded_per_day(
        stripe, "mtr_1", sorted(STRIPE), date(2026, 3, 1), date(2026, 3, 3), max_rps=1000
    )
    assert found == EXPECTED
    assert sorted(stripe.reads) == [
        ("mtr_1", customer, DAY1, DAY1 + 3 * 86400, "day", False) for customer in sorted(STRIPE)
    ]


def test_the_async_reads_give_the_same_answer_from_the_same_requests():
    stripe = Summaries(STRIPE)
    found = asyncio.run(
        paced_reads.arecorded_per_day(
            stripe, "mtr_1", sorted(STRIPE), date(2026, 3, 1), date(2026, 3, 3), max_rps=1000
        )
    )
    assert found == EXPECTED
    assert sorted(r[1] for r in stripe.reads) == sorted(STRIPE)


def test_customers_known_asks_once_about_each_without_sdk_retries():
    asked: list[tuple[str, bool]] = []

    class Customers:
        def customer_exists(self, customer_id: str, *, retry: bool = True) -> bool:
            asked.append((customer_id, retry))
            return customer_id != "cus_ghost"

    assert paced_reads.customers_known(Customers(), ["cus_a", "cus_ghost", "cus_b"], max_rps=1000) == {
        "cus_a",
        "cus_b",
    }
    assert sorted(asked) == [("cus_a", False), ("cus_b", False), ("cus_ghost", False)]


@pytest.fixture
def no_waits(monkeypatch):
    """Deliverers that back off without sleeping (the pacing itself is the deliverer's tests')."""
    monkeypatch.setattr(
        paced_reads,
        "Deliverer",
        functools.partial(Deliverer, backoff=lambda _attempt: 0.0, sleep=lambda _s: None),
    )


def test_a_rejected_read_fails_the_reads_with_the_kind_the_hook_raised_and_the_count(no_waits):
    def read(customer: str) -> None:
        if customer == "cus_bad":
            raise StripeRequestRejectedError(
                "Stripe 400", {"type": "invalid_request_error", "http_status": 400}
            )

    with pytest.raises(StripeRequestRejectedError, match="Could not ask about 1 of 3 customers") as failed:
        paced_reads.read_each(["cus_a", "cus_bad", "cus_b"], read, "ask about", "unavailable", max_rps=None)
    assert failed.value.details["http_status"] == 400


def test_a_read_that_outlasts_the_retries_fails_retryable(no_waits):
    tries: list[str] = []

    def read(customer: str) -> None:
        tries.append(customer)
        raise StripeTransientError("Stripe 429", {"type": "rate_limit_error", "http_status": 429})

    with pytest.raises(StripeTransientError, match="Could not read 1 of 1 customers") as failed:
        paced_reads.read_each(["cus_a"], read, "read", "unavailable", max_rps=None)
    assert failed.value.details["http_status"] == 429
    assert len(tries) == 8  # the deliverer's attempts: the one retry layer


def test_day_span_covers_whole_utc_days():
    assert paced_reads.day_span(date(2026, 3, 1), date(2026, 3, 1)) == (DAY1, DAY1 + 86400)
