"""A key that may not read subscriptions fails the run before anything is sent, saying what to do."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from airflow_provider_stripe_meter.exceptions import StripeConfigurationError
from airflow_provider_stripe_meter.ledger.store import SqlLedger
from airflow_provider_stripe_meter.state.periods import read_billing_periods


class RestrictedHook:
    """A key allowed meters and meter events only: listing prices is refused with a 403."""

    def active_meter(self, event_name):
        return {"id": "mtr_1", "event_name": event_name}

    def metered_prices(self, meter_ids):
        raise StripeConfigurationError(
            "Connection 'stripe_default': Stripe 403 invalid_request_error: The provided key does not have "
            "the required permissions for this endpoint.",
            {"http_status": 403},
        )


class Task:
    hook = RestrictedHook()
    billing_periods = "hold"
    log = logging.getLogger("test")

    def billed_account(self):
        return None


def test_a_key_without_the_periods_permissions_names_them_and_the_way_out(tmp_path):
    ledger = SqlLedger(lambda: sqlite3.connect(tmp_path / "ledger.db"))
    task = Task()
    with pytest.raises(StripeConfigurationError) as raised:
        read_billing_periods(
            task.hook,
            ledger,
            "ai_tokens_used",
            account=task.billed_account() or "platform",
            log=task.log,
            billing_periods=task.billing_periods,
        )
    message = str(raised.value)
    assert "Prices, Subscriptions, Invoices and Events" in message
    assert "billing_periods='off'" in message
    assert raised.value.details == {"http_status": 403}
