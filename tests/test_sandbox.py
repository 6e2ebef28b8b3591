"""Against a real Stripe sandbox; runs only when STRIPE_SANDBOX_API_KEY is set.

Also needs STRIPE_SANDBOX_CUSTOMER (a cus_... in the sandbox) and optionally
STRIPE_SANDBOX_EVENT_NAME (a meter's event name; default ai_tokens_used).
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from airflow_provider_stripe_meter.exceptions import StripeDuplicateIdentifierError
from airflow_provider_stripe_meter.hooks.stripe import StripeHook
from airflow_provider_stripe_meter.utils.rules import MeterEvent

KEY = os.environ.get("STRIPE_SANDBOX_API_KEY")
pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(not KEY, reason="STRIPE_SANDBOX_API_KEY not set: no real Stripe sandbox to talk to"),
]


def test_sandbox_records_once_and_refuses_the_copy(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_STRIPE_SANDBOX", json.dumps({"conn_type": "stripe", "password": KEY}))
    hook = StripeHook("stripe_sandbox")
    ok, message = hook.test_connection()
    assert ok, message
    event = MeterEvent(
        event_name=os.environ.get("STRIPE_SANDBOX_EVENT_NAME", "ai_tokens_used"),
        customer_id=os.environ["STRIPE_SANDBOX_CUSTOMER"],
        value=1,
        identifier=f"sandbox-test-{uuid.uuid4()}",
    )
    recorded = hook.create_meter_event(event)
    assert recorded["identifier"] == event.identifier
    with pytest.raises(StripeDuplicateIdentifierError):
        hook.create_meter_event(event)
