"""StripeHook against the local server: client settings, calls, error translation, secrecy."""

from __future__ import annotations

import json

import pytest

from airflow_provider_stripe_meter.exceptions import (
    StripeConfigurationError,
    StripeDuplicateIdentifierError,
    StripeRequestRejectedError,
    StripeTransientError,
)
from airflow_provider_stripe_meter.hooks.stripe import StripeHook
from airflow_provider_stripe_meter.utils.rules import MeterEvent
from tests.conftest import SECRET_KEY

EVENT = MeterEvent(event_name="ai_tokens_used", customer_id="cus_hook", value=9, identifier="hook-1")


def test_create_meter_event_reaches_the_server(secret_server):
    recorded = StripeHook().create_meter_event(EVENT)

    assert recorded["identifier"] == "hook-1"
    [event] = secret_server.ledger.accepted()
    assert (event.payload, event.identifier) == ({"stripe_customer_id": "cus_hook", "value": "9"}, "hook-1")


def test_custom_payload_keys(secret_server):
    secret_server.ledger.add_meter("gb_stored", customer_key="account", value_key="gb")
    event = MeterEvent(event_name="gb_stored", customer_id="cus_k", value=3, identifier="k-1")

    StripeHook().create_meter_event(event, customer_payload_key="account", value_payload_key="gb")

    assert secret_server.ledger.totals("gb_stored") == {"cus_k": 3}


def test_connection_extras_and_overrides_reach_stripe(secret_server, monkeypatch):
    for account in ("acct_conn", "acct_task"):
        secret_server.add_account(account, meters=["ai_tokens_used"])
    monkeypatch.setenv(
        "AIRFLOW_CONN_STRIPE_DEFAULT",
        secret_server.connection_json(
            SECRET_KEY, stripe_version="2026-07-29.dahlia", stripe_account="acct_conn"
        ),
    )
    StripeHook().create_meter_event(EVENT)
    StripeHook(stripe_account="acct_task").create_meter_event(
        MeterEvent("ai_tokens_used", "cus_hook", 1, "hook-2")
    )

    headers = [h for method, path, h in secret_server.request_log if path == "/v1/billing/meter_events"]
    assert [h.get("Stripe-Account") for h in headers] == ["acct_conn", "acct_task"]
    assert headers[0]["Stripe-Version"] == "2026-07-29.dahlia"
    # Each event landed on the account it was sent for, none on the platform.
    assert secret_server.account("acct_conn").totals() == {"cus_hook": 9}
    assert secret_server.account("acct_task").totals() == {"cus_hook": 1}
    assert secret_server.ledger.accepted() == []


def test_client_is_built_once(secret_server):
    hook = StripeHook()
    assert hook.get_conn() is hook.client
    assert hook.max_network_retries == 1


def test_duplicate_identifier_is_its_own_error(secret_server):
    hook = StripeHook()
    hook.create_meter_event(EVENT)
    with pytest.raises(StripeDuplicateIdentifierError) as caught:
        hook.create_meter_event(EVENT)
    assert caught.value.details["http_status"] == 400
    assert caught.value.details["should_retry"] is False
    assert len(secret_server.ledger.accepted()) == 1


@pytest.mark.parametrize(
    ("details", "duplicate"),
    [
        pytest.param(
            {"param": "identifier", "should_retry": False, "message": "Ein Ereignis existiert bereits."},
            True,
            id="v1-param-and-should-retry",
        ),
        pytest.param({"code": "duplicate_meter_event", "message": "..."}, True, id="v2-code"),
        pytest.param({"message": "An event already exists with identifier x."}, True, id="message-fallback"),
        pytest.param(
            {"param": "identifier", "message": "identifier must be 1 to 100 characters."},
            False,
            id="other-identifier-problem",
        ),
        pytest.param({"param": "timestamp", "should_retry": False, "message": "too old"}, False, id="other"),
    ],
)
def test_duplicate_detection_reads_param_and_code(details, duplicate):
    from airflow_provider_stripe_meter.hooks.stripe import _is_duplicate_identifier

    assert _is_duplicate_identifier(details) is duplicate


def test_rejection_keeps_stripe_details(secret_server):
    old = MeterEvent("ai_tokens_used", "cus_hook", 1, "old-1", timestamp=1_000_000_000)
    with pytest.raises(StripeRequestRejectedError) as caught:
        StripeHook().create_meter_event(old)
    details = caught.value.details
    assert details["code"] == "timestamp_too_far_in_past"
    assert details["param"] == "timestamp"
    assert details["request_id"].startswith("req_")
    assert "35 days" in details["message"]


def test_rate_limit_and_server_errors_are_transient(secret_server):
    secret_server.set_rate_limit(1, burst=1)
    hook = StripeHook()
    hook.create_meter_event(EVENT)
    with pytest.raises(StripeTransientError) as caught:
        hook.create_meter_event(MeterEvent("ai_tokens_used", "cus_hook", 1, "hook-3"))
    assert caught.value.details["http_status"] == 429

    secret_server.set_rate_limit(None)
    secret_server.inject_failures(2, status=502)
    with pytest.raises(StripeTransientError) as caught:
        hook.create_meter_event(MeterEvent("ai_tokens_used", "cus_hook", 1, "hook-4"))
    assert caught.value.details["http_status"] == 502
    assert secret_server.stats["injected_failures"] == 2  # first try plus one SDK retry


def test_sdk_retries_a_lost_answer_without_double_billing(secret_server):
    secret_server.inject_failures(1, status=500, after_write=True)

    # The SDK retries under the same Idempotency-Key: Stripe replays the answer it saved.
    created = StripeHook().create_meter_event(EVENT)

    assert created["identifier"] == EVENT.identifier
    assert secret_server.ledger.totals() == {"cus_hook": 9}
    assert (secret_server.stats["idempotent_replays"], secret_server.stats["duplicates_rejected"]) == (1, 0)


def test_missing_api_key_names_the_connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_STRIPE_BILLING", json.dumps({"conn_type": "stripe"}))
    with pytest.raises(StripeConfigurationError, match="Connection 'stripe_billing' has no API key"):
        StripeHook("stripe_billing").get_conn()


def test_wrong_key_is_a_configuration_error_that_never_shows_the_key(secret_server, monkeypatch):
    wrong = "sk_test_WRONGKEY_0123456789"
    monkeypatch.setenv("AIRFLOW_CONN_STRIPE_DEFAULT", secret_server.connection_json(wrong))
    hook = StripeHook()
    with pytest.raises(StripeConfigurationError) as caught:
        hook.create_meter_event(EVENT)
    assert caught.value.details["http_status"] == 401
    assert wrong not in str(caught.value)
    assert wrong not in json.dumps(caught.value.details)

    ok, message = hook.test_connection()
    assert not ok
    assert "401" in message
    assert wrong not in message


def test_test_connection_succeeds_with_the_right_key(secret_server):
    ok, message = StripeHook().test_connection()
    assert ok, message
    assert secret_server.stats["v1_list_meters"] == 1


def test_iter_meters_follows_pages(secret_server):
    for n in range(150):
        secret_server.ledger.add_meter(f"meter_{n}")
    names = [m["event_name"] for m in StripeHook().iter_meters()]
    assert len(names) == 151
    assert secret_server.stats["v1_list_meters"] == 2


def test_ui_field_behaviour_is_the_one_declared_for_airflow():
    assert StripeHook.get_ui_field_behaviour() == {
        "hidden_fields": ["host", "schema", "login", "port"],
        "relabeling": {"password": "API key"},
        "placeholders": {"password": "sk_live_... or rk_live_... (restricted key)"},
    }


def test_error_reports_name_what_stripe_dropped_per_code_with_samples(secret_server):
    import time

    secret_server.ledger.customers = {"cus_known"}
    hook = StripeHook()
    for n, customer in enumerate(["cus_known", "cus_ghost", "cus_ghost", "cus_other"]):
        hook.create_meter_event(MeterEvent("ai_tokens_used", customer, 5, f"r-{n}"))
    meter_id = hook.active_meter("ai_tokens_used")["id"]

    found = hook.meter_error_reports(meter_id, since=time.time() - 3600, samples=2)

    # Three events were accepted (200) and dropped; the known customer's counts.
    assert secret_server.ledger.totals() == {"cus_known": 5}
    assert found["error_count"] == 3
    assert found["codes"] == {"meter_event_customer_not_found": 3}
    assert [s["identifier"] for s in found["samples"]] == ["r-1", "r-2"]
    assert "cus_ghost" in found["samples"][0]["message"]
    # Nothing dropped for another meter, nor before the window asked for.
    other = secret_server.ledger.add_meter("gb_stored").id
    assert hook.meter_error_reports(other, since=time.time() - 3600)["error_count"] == 0
    assert hook.meter_error_reports(meter_id, since=time.time() + 3600)["error_count"] == 0
