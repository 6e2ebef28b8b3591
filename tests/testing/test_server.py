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


# -- billing objects as Stripe sends them (shapes: tests/testing/test_contract.py) ---------------


def _raw(server: LocalStripeServer, method: str, path: str, **params):
    return json.loads(client(server).raw_request(method, path, **params).body)


@pytest.fixture
def subscribed(stripe_server):
    """Two subscriptions on a metered price, their last period ended 10 minutes ago (draft now)."""
    billing = stripe_server.ledger.billing
    now = int(stripe_server.ledger.clock())
    price = billing.add_price("ai_tokens_used")
    first = billing.subscribe(
        "cus_a", price, anchor=now - 600, start=now - 31 * DAY, created_at=now - 2 * DAY
    )
    second = billing.subscribe("cus_b", price, anchor=now - 600, start=now - 31 * DAY, created_at=now - DAY)
    for customer in ("cus_a", "cus_b"):
        stripe_server.ledger.record(
            event_name="ai_tokens_used",
            payload={"stripe_customer_id": customer, "value": "4"},
            identifier=f"u-{customer}",
            timestamp=now - 3 * DAY,
            api="v1",
        )
    return stripe_server, first, second, now


def _move(server: LocalStripeServer, seconds: float) -> None:
    server.clock_offset += seconds


def test_cycle_invoice_looks_back_and_names_its_subscription_under_parent(subscribed):
    server, first, _, now = subscribed
    [invoice] = _raw(server, "get", "/v1/invoices", subscription=first.id)["data"]
    end = now - 600
    assert invoice["period_end"] == end == invoice["created"]
    assert invoice["period_start"] < end
    assert (invoice["status"], invoice["billing_reason"], invoice["auto_advance"]) == (
        "draft",
        "subscription_cycle",
        True,
    )
    assert invoice["automatically_finalizes_at"] == end + server.ledger.billing.grace
    assert "subscription" not in invoice
    assert invoice["parent"]["type"] == "subscription_details"
    assert invoice["parent"]["subscription_details"]["subscription"] == first.id
    [line] = invoice["lines"]["data"]
    assert "subscription" not in line
    assert line["parent"]["subscription_item_details"]["subscription"] == first.id
    assert line["parent"]["subscription_item_details"]["subscription_item"] == first.item_id
    assert line["pricing"]["price_details"]["price"] == first.price.id
    assert line["period"] == {"start": invoice["period_start"], "end": end}
    assert line["quantity"] == 4


def test_metered_line_after_ten_other_lines_is_found_through_the_lines_endpoint(subscribed):
    server, first, _, _ = subscribed
    first.other_lines = 10
    [invoice] = _raw(server, "get", "/v1/invoices", subscription=first.id)["data"]
    embedded = invoice["lines"]["data"]
    assert len(embedded) == 10
    assert invoice["lines"]["has_more"] is True
    assert all(line["pricing"]["price_details"]["price"] != first.price.id for line in embedded)
    c = client(server)
    rest = _raw(server, "get", invoice["lines"]["url"], limit=5, starting_after=embedded[-1]["id"])
    [metered] = rest["data"]
    assert rest["has_more"] is False
    assert (metered["pricing"]["price_details"]["price"], metered["quantity"]) == (first.price.id, 4)
    # The SDK pages through all eleven.
    assert len(list(c.v1.invoices.line_items.list(invoice["id"], {"limit": 4}).auto_paging_iter())) == 11
    before = _raw(server, "get", invoice["lines"]["url"], limit=3, ending_before=metered["id"])
    assert [line["id"] for line in before["data"]] == [line["id"] for line in embedded[7:]]
    # The preview too, and the model still reads the metered line.
    preview = _raw(server, "post", "/v1/invoices/create_preview", subscription=first.id)
    assert preview["id"].startswith("upcoming_in_")
    assert preview["lines"]["has_more"] is True
    assert _raw(server, "get", preview["lines"]["url"], starting_after=preview["lines"]["data"][-1]["id"])[
        "data"
    ]
    assert server.ledger.billing.invoice_quantities()[
        ("cus_a", invoice["period_start"], invoice["period_end"])
    ] == (
        4,
        "draft",
    )


def test_postponed_draft_keeps_taking_usage_until_its_new_time(subscribed):
    server, first, _, now = subscribed
    billing = server.ledger.billing
    end = now - 600
    billing.postpone(first, end, end + 10 * 3600)
    _move(server, 2 * 3600)  # past the grace period
    [invoice] = _raw(server, "get", "/v1/invoices", subscription=first.id)["data"]
    assert (invoice["status"], invoice["automatically_finalizes_at"]) == ("draft", end + 10 * 3600)
    assert any(i["id"] == invoice["id"] for i in _raw(server, "get", "/v1/invoices", status="draft")["data"])
    server.ledger.record(
        event_name="ai_tokens_used",
        payload={"stripe_customer_id": "cus_a", "value": "3"},
        identifier="late",
        timestamp=end - 60,
        api="v1",
    )
    _move(server, 9 * 3600)
    [invoice] = _raw(server, "get", "/v1/invoices", subscription=first.id)["data"]
    assert (invoice["status"], invoice["lines"]["data"][0]["quantity"]) == ("open", 7)
    assert invoice["status_transitions"]["finalized_at"] == end + 10 * 3600


def test_draft_without_auto_advance_waits_for_finalize_and_misses_later_usage(subscribed):
    server, first, _, now = subscribed
    billing = server.ledger.billing
    end = now - 600
    billing.set_auto_advance(first, end, False)
    _move(server, 5 * 3600)
    [invoice] = _raw(server, "get", "/v1/invoices", subscription=first.id)["data"]
    assert (invoice["status"], invoice["auto_advance"], invoice["automatically_finalizes_at"]) == (
        "draft",
        False,
        None,
    )
    billing.finalize(first, end)
    server.ledger.record(
        event_name="ai_tokens_used",
        payload={"stripe_customer_id": "cus_a", "value": "3"},
        identifier="after-finalize",
        timestamp=end - 60,
        api="v1",
    )
    [invoice] = _raw(server, "get", "/v1/invoices", subscription=first.id)["data"]
    assert (invoice["status"], invoice["lines"]["data"][0]["quantity"]) == ("open", 4)
    with pytest.raises(ValueError, match="not a draft"):
        billing.finalize(first, end)


def test_finalize_early_ends_the_draft_inside_its_grace_period(subscribed):
    server, first, _, now = subscribed
    server.ledger.billing.finalize(first, now - 600)
    [invoice] = _raw(server, "get", "/v1/invoices", subscription=first.id)["data"]
    assert (invoice["status"], invoice["status_transitions"]["finalized_at"]) == ("open", now)
    assert invoice["id"] not in {i["id"] for i in _raw(server, "get", "/v1/invoices", status="draft")["data"]}


def test_other_kinds_of_drafts_are_listed_newest_first_with_no_metered_line(subscribed):
    server, first, _, now = subscribed
    billing = server.ledger.billing
    manual = billing.add_draft("cus_a", created=now - 100)
    update = billing.add_draft(
        "cus_a", billing_reason="subscription_update", subscription=first, created=now - 50
    )
    threshold = billing.add_draft(
        "cus_a", billing_reason="subscription_threshold", subscription=first.id, auto_advance=False
    )
    drafts = _raw(server, "get", "/v1/invoices", status="draft", customer="cus_a")["data"]
    assert [d["id"] for d in drafts] == [threshold, update, manual, f"in_{first.id[4:]}_{now - 600}"]
    assert [d["created"] for d in drafts] == sorted((d["created"] for d in drafts), reverse=True)
    by_id = {d["id"]: d for d in drafts}
    assert by_id[manual]["parent"] is None
    assert by_id[manual]["billing_reason"] == "manual"
    assert by_id[update]["parent"]["subscription_details"]["subscription"] == first.id
    assert by_id[threshold]["automatically_finalizes_at"] is None
    for draft_id in (manual, update, threshold):
        [line] = by_id[draft_id]["lines"]["data"]
        assert line["pricing"]["price_details"]["price"] != first.price.id
    assert by_id[manual]["automatically_finalizes_at"] == now - 100 + 3600
    # Listed with the subscription's invoices; the created filter bounds them.
    assert {i["id"] for i in _raw(server, "get", "/v1/invoices", subscription=first.id)["data"]} == {
        update,
        threshold,
        f"in_{first.id[4:]}_{now - 600}",
    }
    window = _raw(server, "get", "/v1/invoices", **{"created[gte]": now - 100, "created[lt]": now})["data"]
    assert {i["id"] for i in window} == {manual, update}


def test_prices_active_filter_and_archived_prices_still_bill(subscribed):
    server, first, _, _ = subscribed
    billing = server.ledger.billing
    other = billing.add_price("ai_tokens_used")
    billing.archive(first.price)
    ids = lambda **p: [x["id"] for x in _raw(server, "get", "/v1/prices", **p)["data"]]  # noqa: E731
    assert set(ids()) == {first.price.id, other.id}
    assert ids(active="true") == [other.id]
    assert ids(active="false") == [first.price.id]
    assert ids(type="one_time") == []
    _move(server, 40 * DAY)
    invoices = _raw(server, "get", "/v1/invoices", subscription=first.id)["data"]
    assert len(invoices) == 2
    assert invoices[0]["lines"]["data"][0]["pricing"]["price_details"]["price"] == first.price.id


def test_subscriptions_are_listed_newest_first(subscribed):
    server, first, second, _ = subscribed
    third = server.ledger.billing.subscribe("cus_c", first.price, anchor=first.billing_cycle_anchor)
    listed = _raw(server, "get", "/v1/subscriptions")["data"]
    assert [s["id"] for s in listed] == [third.id, second.id, first.id]
    assert [s["created"] for s in listed] == sorted((s["created"] for s in listed), reverse=True)


def test_events_filters_and_thirty_days_kept(subscribed):
    server, first, second, now = subscribed
    billing = server.ledger.billing
    old = billing.subscribe("cus_old", first.price, anchor=now - 45 * DAY, created_at=now - 45 * DAY)
    server.ledger.billing.cancel(second, now + 5 * DAY)  # an update event, now

    def listed(**params):
        return [
            (e["type"], e["data"]["object"]["id"], e["created"])
            for e in _raw(server, "get", "/v1/events", limit=100, **params)["data"]
        ]

    every = listed()
    assert all(created > now - 30 * DAY for _, _, created in every)
    assert ("customer.subscription.created", old.id, now - 45 * DAY) not in every
    assert ("customer.subscription.created", first.id, now - 2 * DAY) in every
    assert [e for e in every if e[0] == "customer.subscription.created"] == listed(
        type="customer.subscription.created"
    )
    assert listed(type="customer.subscription.*") == every
    assert listed(type="invoice.*") == []
    assert listed(**{"types[0]": "customer.subscription.updated"}) == [
        e for e in every if e[0] == "customer.subscription.updated"
    ]
    assert listed(**{"created[gte]": now - 2 * DAY, "created[lt]": now - DAY}) == [
        ("customer.subscription.created", first.id, now - 2 * DAY)
    ]
    with pytest.raises(stripe.InvalidRequestError):
        client(server).raw_request(
            "get", "/v1/events", **{f"types[{i}]": "customer.subscription.updated" for i in range(21)}
        )


def test_events_render_the_subscription_as_it_was_then(subscribed):
    server, first, _, now = subscribed
    billing = server.ledger.billing
    billing.cancel(first, now + 3 * DAY)
    events = _raw(server, "get", "/v1/events", limit=100)["data"]
    by_type = {(e["type"], e["created"]): e for e in events if e["data"]["object"]["id"] == first.id}
    renewal = by_type[("customer.subscription.updated", now - 600)]
    created = by_type[("customer.subscription.created", now - 2 * DAY)]
    update = by_type[("customer.subscription.updated", now)]
    for event in (renewal, created, update):
        assert event["api_version"] == "2026-10-28.endive"
        assert "current_period_start" not in event["data"]["object"]
    assert renewal["data"]["object"]["cancel_at"] is None  # the cancellation came later
    assert update["data"]["object"]["cancel_at"] == now + 3 * DAY
    item = renewal["data"]["object"]["items"]["data"][0]
    assert item["current_period_start"] == now - 600
    assert created["data"]["object"]["items"]["data"][0]["current_period_end"] == now - 600


def test_events_from_before_a_basil_default_carry_periods_on_the_subscription(subscribed):
    server, first, _, now = subscribed
    billing = server.ledger.billing
    billing.set_account_api_version("2024-09-30.acacia")
    billing.set_account_api_version("2026-10-28.endive", since=now - DAY)
    events = {
        e["created"]: e
        for e in _raw(server, "get", "/v1/events", limit=100)["data"]
        if e["data"]["object"]["id"] == first.id
    }
    old, new = events[now - 2 * DAY], events[now - 600]
    assert old["api_version"] == "2024-09-30.acacia"
    sub = old["data"]["object"]
    assert sub["current_period_end"] == now - 600
    assert "current_period_end" not in sub["items"]["data"][0]
    assert new["api_version"] == "2026-10-28.endive"
    assert "current_period_end" not in new["data"]["object"]
    assert "previous_attributes" not in new["data"]
    assert new["data"]["object"]["items"]["data"][0]["current_period_start"] == now - 600
    assert billing.account_api_version == "2026-10-28.endive"
    # On an account still before basil, a renewal says which periods it replaced.
    billing.set_account_api_version("2024-09-30.acacia")
    [renewal] = [
        e
        for e in _raw(server, "get", "/v1/events", type="customer.subscription.updated")["data"]
        if e["data"]["object"]["id"] == first.id
    ]
    assert renewal["data"]["object"]["current_period_start"] == now - 600
    assert renewal["data"]["previous_attributes"]["current_period_end"] == now - 600
