"""The local Stripe server follows the spec and Stripe's rules, through the real stripe SDK."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import stripe

from airflow_provider_stripe_meter.testing import DEFAULT_API_KEY, LocalStripeServer
from airflow_provider_stripe_meter.testing import spec as spec_module

DAY = 86400


def client(server: LocalStripeServer, key: str = DEFAULT_API_KEY, retries: int = 0) -> stripe.StripeClient:
    return stripe.StripeClient(
        key, base_addresses={"api": server.url, "meter_events": server.url}, max_network_retries=retries
    )


def send(c: stripe.StripeClient, customer: str = "cus_1", value: str = "5", **extra):
    params = {
        "event_name": "ai_tokens_used",
        "payload": {"stripe_customer_id": customer, "value": value},
        **extra,
    }
    return c.v1.billing.meter_events.create(params)


def test_meter_event_round_trip_matches_spec(stripe_server):
    ts = int(time.time()) - DAY
    event = send(client(stripe_server), identifier="rt-1", timestamp=ts)
    assert event.to_dict() == {
        "object": "billing.meter_event",
        "created": event.created,
        "event_name": "ai_tokens_used",
        "identifier": "rt-1",
        "livemode": False,
        "payload": {"stripe_customer_id": "cus_1", "value": "5"},
        "timestamp": ts,
    }


def test_spec_check_catches_a_wrong_body():
    schema = spec_module.response_schema("POST", "/v1/billing/meter_events", 200)
    problems = spec_module.validate({"object": "billing.meter_event", "timestamp": "soon"}, schema)
    assert any("created" in p for p in problems)
    assert any("timestamp" in p for p in problems)
    request = spec_module.request_schema("POST", "/v1/billing/meter_events")[1]
    assert spec_module.validate({"event_name": "e", "payload": {"value": "1"}, "bogus": "1"}, request)


#: SHA-256 of the shipped subset of Stripe's public OpenAPI spec (stripe/openapi, version
#: 2026-07-29.dahlia), the meter endpoints copied unchanged: the server is checked against it.
SHIPPED_SPEC_SHA256 = "5efef7db75fa63bc742c5e412e011914be0e0bffbb0650ec4c04dbea88de9488"


def test_shipped_spec_is_stripes_unchanged():
    import hashlib

    assert hashlib.sha256(spec_module.SPEC_PATH.read_bytes()).hexdigest() == SHIPPED_SPEC_SHA256
    spec = spec_module.load_spec()
    assert spec["info"]["version"] == "2026-07-29.dahlia"
    assert "/v1/billing/meters/{id}/event_summaries" in spec["paths"]


@pytest.mark.parametrize(
    ("params", "param", "text"),
    [
        pytest.param({"value": "1.5"}, "payload[value]", "whole number", id="fraction"),
        pytest.param({"value": "1" * 16}, "payload[value]", "15 digits", id="16-digits"),
        pytest.param({"timestamp": "OLD"}, "timestamp", "35 days in past", id="too-old"),
        pytest.param({"timestamp": "FUTURE"}, "timestamp", "5 minutes in the future", id="future"),
        pytest.param({"identifier": "i" * 101}, "identifier", "100 characters", id="long-identifier"),
        pytest.param({"customer": ""}, "payload[stripe_customer_id]", "stripe_customer_id", id="no-customer"),
    ],
)
def test_synchronous_rules_answer_400(stripe_server, params, param, text):
    now = int(time.time())
    extra = {}
    if "timestamp" in params:
        extra["timestamp"] = now - 35 * DAY - 60 if params["timestamp"] == "OLD" else now + 400
    if "identifier" in params:
        extra["identifier"] = params["identifier"]
    with pytest.raises(stripe.InvalidRequestError) as caught:
        send(
            client(stripe_server),
            customer=params.get("customer", "cus_1"),
            value=params.get("value", "5"),
            **extra,
        )
    assert caught.value.http_status == 400
    assert caught.value.param == param
    assert text in caught.value.user_message
    assert stripe_server.ledger.accepted() == []
    if param == "identifier":  # out of spec on purpose: the spec check must see it
        assert any("identifier" in v for v in stripe_server.request_violations)


def test_unknown_customer_and_meter_are_accepted_then_reported():
    with LocalStripeServer(meters=["ai_tokens_used"], customers=["cus_known"], validate_spec=True) as server:
        c = client(server)
        send(c, customer="cus_stranger")
        c.v1.billing.meter_events.create(
            {"event_name": "no_such_meter", "payload": {"stripe_customer_id": "cus_known", "value": "1"}}
        )
        codes = sorted(r["code"] for r in server.ledger.error_reports)
        assert codes == ["meter_event_customer_not_found", "no_meter"]
        # Both were answered 200; the stranger's event was dropped when received, and stays so
        # once the customer exists (Stripe validates an event when it receives it).
        assert len(server.ledger.events) == 2
        server.ledger.customers.add("cus_stranger")
        assert [e.customer_id for e in server.ledger.accepted()] == ["cus_known"]
        assert server.spec_violations == []


def test_duplicate_identifier_is_refused_without_retry(stripe_server):
    c = client(stripe_server, retries=3)
    send(c, identifier="dup-1")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        send(c, identifier="dup-1", value="6")
    assert caught.value.user_message == "An event already exists with identifier dup-1."
    assert caught.value.headers["Stripe-Should-Retry"] == "false"
    assert stripe_server.stats["v1_meter_event"] == 2  # the SDK honoured Stripe-Should-Retry
    assert stripe_server.ledger.totals() == {"cus_1": 5}


def test_idempotency_key_replays_and_guards_parameters(stripe_server):
    c = client(stripe_server)
    first = c.v1.billing.meter_events.create(
        {"event_name": "ai_tokens_used", "payload": {"stripe_customer_id": "cus_1", "value": "5"}},
        options={"idempotency_key": "idem-1"},
    )
    again = c.v1.billing.meter_events.create(
        {"event_name": "ai_tokens_used", "payload": {"stripe_customer_id": "cus_1", "value": "5"}},
        options={"idempotency_key": "idem-1"},
    )
    assert again.identifier == first.identifier
    assert stripe_server.stats["idempotent_replays"] == 1
    with pytest.raises(stripe.IdempotencyError):
        c.v1.billing.meter_events.create(
            {"event_name": "ai_tokens_used", "payload": {"stripe_customer_id": "cus_1", "value": "6"}},
            options={"idempotency_key": "idem-1"},
        )
    assert len(stripe_server.ledger.accepted()) == 1


def test_write_that_lands_before_a_500_is_recorded_once():
    with LocalStripeServer(meters=["ai_tokens_used"]) as server:
        server.inject_failures(1, after_write=True)
        with pytest.raises(stripe.APIError):
            send(client(server), identifier="lost-answer")
        assert [e.identifier for e in server.ledger.accepted()] == ["lost-answer"]
        server.inject_failures(1)
        with pytest.raises(stripe.APIError):
            send(client(server), identifier="never-written")
        assert len(server.ledger.accepted()) == 1


def test_rate_limit_answers_429():
    with LocalStripeServer(meters=["ai_tokens_used"], rate_limit=5) as server:
        c = client(server)
        outcomes = []
        for n in range(10):
            try:
                send(c, customer=f"cus_{n}")
                outcomes.append(200)
            except stripe.RateLimitError as err:
                outcomes.append(err.http_status)
        assert outcomes.count(429) >= 4
        assert server.stats["rate_limited"] == outcomes.count(429)


def test_one_request_in_flight_per_customer_and_meter():
    with LocalStripeServer(meters=["ai_tokens_used"], latency=0.3) as server:
        errors: list[int] = []

        def one(n: int) -> None:
            try:
                send(client(server), identifier=f"c-{n}")
            except stripe.RateLimitError as err:
                errors.append(err.http_status)

        threads = [threading.Thread(target=one, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [429]
        assert server.stats["concurrent_rejected"] == 1


def test_meters_list_create_and_summaries(stripe_server):
    c = client(stripe_server)
    meter = c.v1.billing.meters.create(
        {"default_aggregation": {"formula": "sum"}, "display_name": "GB", "event_name": "gb_stored"}
    )
    assert meter.status == "active"
    assert [m.event_name for m in c.v1.billing.meters.list({"status": "active"}).auto_paging_iter()] == [
        "ai_tokens_used",
        "gb_stored",
    ]
    day = int(time.time()) // DAY * DAY
    for value, ts in (("3", day - DAY + 10), ("4", day - DAY + 20), ("5", day + 1)):
        c.v1.billing.meter_events.create(
            {
                "event_name": "gb_stored",
                "payload": {"stripe_customer_id": "cus_s", "value": value},
                "timestamp": ts,
            }
        )
    summaries = c.v1.billing.meters.event_summaries.list(
        meter.id,
        {"customer": "cus_s", "start_time": day - DAY, "end_time": day + DAY, "value_grouping_window": "day"},
    )
    assert [(s.start_time, s.aggregated_value) for s in summaries.data] == [(day - DAY, 7.0), (day, 5.0)]
    with pytest.raises(stripe.InvalidRequestError, match="aligned"):
        c.v1.billing.meters.event_summaries.list(
            meter.id,
            {
                "customer": "cus_s",
                "start_time": day + 30,
                "end_time": day + DAY,
                "value_grouping_window": "day",
            },
        )


def test_cancel_within_24_hours_only():
    clock = [time.time()]
    with LocalStripeServer(meters=["ai_tokens_used"], clock=lambda: clock[0], validate_spec=True) as server:
        c = client(server)
        send(c, identifier="keep")
        send(c, identifier="drop")
        adjustment = c.v1.billing.meter_event_adjustments.create(
            {"event_name": "ai_tokens_used", "type": "cancel", "cancel": {"identifier": "drop"}}
        )
        assert (adjustment.status, adjustment.cancel.identifier) == ("complete", "drop")
        assert [e.identifier for e in server.ledger.accepted()] == ["keep"]
        clock[0] += DAY + 1
        with pytest.raises(stripe.InvalidRequestError, match="within 24 hours"):
            c.v1.billing.meter_event_adjustments.create(
                {"event_name": "ai_tokens_used", "type": "cancel", "cancel": {"identifier": "keep"}}
            )
        assert server.spec_violations == []


def test_v2_stream_session_limits_and_async_validation():
    clock = [time.time()]
    with LocalStripeServer(meters=["ai_tokens_used"], clock=lambda: clock[0], validate_spec=True) as server:
        session = client(server).v2.billing.meter_event_session.create()
        stream = client(server, key=session.authentication_token)
        event = {"event_name": "ai_tokens_used", "payload": {"stripe_customer_id": "cus_v2", "value": "2"}}
        stream.v2.billing.meter_event_stream.create(
            {
                "events": [
                    {**event, "identifier": "v2-1"},
                    {**event, "identifier": "v2-1"},
                    {**event, "payload": {"value": "x"}},
                ]
            }
        )
        assert server.ledger.totals() == {"cus_v2": 2}  # the duplicate and the bad event were dropped
        assert len(server.ledger.error_reports) == 2
        with pytest.raises(stripe.InvalidRequestError, match="At most 100"):
            stream.v2.billing.meter_event_stream.create({"events": [event] * 101})
        clock[0] += 901
        with pytest.raises(stripe.TemporarySessionExpiredError):
            stream.v2.billing.meter_event_stream.create({"events": [event]})
        assert server.spec_violations == []


def test_v2_single_event_and_adjustment(stripe_server):
    c = client(stripe_server)
    event = c.v2.billing.meter_events.create(
        {
            "event_name": "ai_tokens_used",
            "payload": {"stripe_customer_id": "cus_v2", "value": "4"},
            "identifier": "v2s",
        }
    )
    assert event.identifier == "v2s"
    adjustment = c.v2.billing.meter_event_adjustments.create(
        {"event_name": "ai_tokens_used", "type": "cancel", "cancel": {"identifier": "v2s"}}
    )
    assert adjustment.cancel.identifier == "v2s"
    assert stripe_server.ledger.accepted() == []


def test_wrong_key_is_refused_and_masked(stripe_server):
    with pytest.raises(stripe.AuthenticationError) as caught:
        client(stripe_server, key="sk_test_not_the_key_9876").v1.billing.meters.list()
    assert "sk_test_not_the_key_9876" not in str(caught.value)
    assert "9876" in str(caught.value)


def test_command_line_server_serves():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_stripe_meter.testing",
            "--port",
            str(port),
            "--meter",
            "api_calls",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        banner = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in banner
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/billing/meters",
            headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert [m["event_name"] for m in json.load(response)["data"]] == ["api_calls"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_request_cut_off_before_its_body_arrived_is_not_acted_on():
    """A worker killed with SIGKILL mid-request leaves headers without their body: nothing happens."""
    with LocalStripeServer(meters=["ai_tokens_used"], validate_spec=True) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /v1/billing/meter_events HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {DEFAULT_API_KEY}\r\n".encode()
                + b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 120\r\n\r\n"
                + b"event_name=ai_tokens_used"
            )
        deadline = time.monotonic() + 5
        while server.stats["truncated_requests"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stats["truncated_requests"] == 1
        assert server.ledger.accepted() == []
        assert server.request_violations == []
