"""StripeMeterEventOperator end to end: real Airflow (dag.test), real stripe SDK, local server."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import SECRET_KEY, rendered_fields, run_dag, task_states, xcoms

pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("airflow_db")]


def test_templated_event_reaches_stripe_and_success_branch_runs(secret_server, capfd):
    when = int(time.time()) - 3 * 86400
    # Zone-less, as a SQL timestamp renders: read as UTC, as the batch operator reads its rows.
    zone_less = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))
    dag_run = run_dag(
        "t_meter_event_branch",
        run_conf={"customer_id": "cus_rendered_7", "value": "1234", "timestamp": zone_less},
    )

    [event] = secret_server.ledger.accepted()
    assert event.payload == {"stripe_customer_id": "cus_rendered_7", "value": "1234"}
    assert event.timestamp == when
    assert event.identifier == f"airflow:t_meter_event_branch:record:{dag_run.run_id}:-1"

    pushed = xcoms(dag_run, "record")
    assert pushed["success"] is True
    assert pushed["response"]["object"] == "billing.meter_event"
    assert pushed["response"]["payload"]["value"] == "1234"
    assert pushed["return_value"] == {"success": True, "response": pushed["response"]}
    states = task_states(dag_run)
    assert states["on_success"] == "success"
    assert states["on_failure"] == "skipped"

    # The event reached the meter, so the meter's Asset (through the alias) has its event.
    assert _asset_events(dag_run) == [("record", "stripe://platform/meters/ai_tokens_used")]
    rendered = rendered_fields(dag_run, "record")
    assert rendered["customer_id"] == "cus_rendered_7"
    assert rendered["value"] == "1234"
    output = capfd.readouterr()
    for text in (output.out, output.err, repr(pushed), repr(rendered)):
        assert SECRET_KEY not in text


def test_event_rejected_by_stripe_takes_failure_branch(secret_server):
    # A meter whose customer key is not the one sent (no preflight to learn it): Stripe answers 400.
    secret_server.ledger.add_meter("custom_keys", customer_key="account", value_key="units")

    dag_run = run_dag("t_meter_event_no_preflight", run_conf={"event_name": "custom_keys"})

    assert secret_server.ledger.accepted() == []
    pushed = xcoms(dag_run, "record")
    assert pushed["success"] is False
    response = pushed["response"]
    assert response["http_status"] == 400
    assert response["type"] == "invalid_request_error"
    assert response["param"] == "payload[account]"
    assert response["request_id"].startswith("req_")
    assert "account" in response["message"]
    states = task_states(dag_run)
    assert (states["record"], states["on_failure"], states["on_success"]) == ("success", "success", "skipped")


def test_invalid_input_is_reported_and_nothing_is_sent(secret_server):
    dag_run = run_dag("t_meter_event_branch", run_conf={"value": "12.5"})

    assert secret_server.stats["v1_meter_event"] == 0
    pushed = xcoms(dag_run, "record")
    assert pushed["success"] is False
    assert pushed["response"] == {
        "type": "validation_error",
        "field": "value",
        "value": "'12.5'",
        # What to do about it, too: Stripe takes whole numbers only.
        "rule": "must be a whole number (Stripe's meters take whole numbers only): bill in a smaller unit "
        "(tokens, not thousands of tokens; milliseconds, not seconds), or round in the query (ROUND)",
    }
    assert task_states(dag_run)["on_failure"] == "success"


def test_fail_on_error_fails_the_task(secret_server):
    dag_run = run_dag("t_meter_event_fail_on_error", run_conf={"customer_id": "user_42"})

    states = task_states(dag_run)
    assert states["record"] == "failed"
    assert states["after"] == "upstream_failed"
    assert secret_server.stats["v1_meter_event"] == 0


def test_retry_after_recorded_event_leaves_exactly_one_event(secret_server):
    # Every answer of the first try is lost after the write landed (SDK retry included), so the
    # task fails; Airflow's retry sends the same identifier and Stripe refuses the copy.
    secret_server.inject_failures(2, status=500, after_write=True, path_prefix="/v1/billing/meter_events")

    dag_run = run_dag("t_meter_event_retry", run_conf={"customer_id": "cus_retry", "value": "5"})

    [ti] = dag_run.get_task_instances()
    assert (str(ti.state), ti.try_number) == ("success", 2)
    assert secret_server.ledger.totals() == {"cus_retry": 5}
    assert len(secret_server.ledger.accepted()) == 1
    assert secret_server.stats["duplicates_rejected"] >= 1
    pushed = xcoms(dag_run, "record")
    assert pushed["success"] is True
    assert pushed["response"]["already_recorded"] is True


def test_a_failure_no_retry_can_fix_does_not_spend_retries(secret_server):
    # retries=3: an unknown meter or a refused key must end the task after its first try.
    dag_run = run_dag("t_meter_event_retry", run_conf={"event_name": "ai_tokens_usd"})

    [ti] = dag_run.get_task_instances()
    assert (str(ti.state), ti.try_number) == ("failed", 1)
    assert secret_server.stats["v1_meter_event"] == 0

    secret_server.api_keys = {"sk_test_some_other_key"}
    dag_run = run_dag("t_meter_event_retry", run_conf={"customer_id": "cus_key"})

    [ti] = dag_run.get_task_instances()
    assert (str(ti.state), ti.try_number) == ("failed", 1)


def test_a_transient_failure_is_retried(secret_server):
    # Four 503s: the first try and its SDK retry, then the second try and its SDK retry.
    secret_server.inject_failures(4, status=503, path_prefix="/v1/billing/meter_events")

    dag_run = run_dag("t_meter_event_retry", run_conf={"customer_id": "cus_flaky", "value": "3"})

    [ti] = dag_run.get_task_instances()
    assert (str(ti.state), ti.try_number) == ("success", 3)
    assert secret_server.ledger.totals() == {"cus_flaky": 3}


def test_transient_failures_that_outlast_retries_fail_the_task_without_sending(secret_server):
    secret_server.inject_failures(10, status=503, path_prefix="/v1/billing/meter_events")

    dag_run = run_dag("t_meter_event_fail_on_error")

    assert task_states(dag_run)["record"] == "failed"
    assert secret_server.ledger.accepted() == []


def test_preflight_stops_an_unknown_event_name_before_anything_is_sent(secret_server, capfd):
    secret_server.ledger.add_meter("api_calls")
    secret_server.ledger.add_meter("old_meter", status="inactive")

    dag_run = run_dag("t_meter_event_branch", run_conf={"event_name": "ai_tokens_usd"})

    states = task_states(dag_run)
    assert states["record"] == "failed"
    assert secret_server.stats["v1_meter_event"] == 0
    log = capfd.readouterr().out
    assert "No active Stripe meter for event_name 'ai_tokens_usd'" in log
    assert "Active meters: ai_tokens_used, api_calls; inactive: old_meter" in log


def test_preflight_learns_the_meters_payload_keys(secret_server):
    secret_server.ledger.add_meter("gb_stored", customer_key="account", value_key="gb")

    dag_run = run_dag("t_meter_event_branch", run_conf={"event_name": "gb_stored", "value": "3"})

    assert xcoms(dag_run, "record")["success"] is True
    [event] = secret_server.ledger.accepted()
    assert event.payload == {"account": "cus_test_1", "gb": "3"}
    assert secret_server.stats["v1_list_meters"] == 1


def test_without_preflight_an_unknown_event_name_is_accepted_and_reported_later(secret_server):
    account = secret_server.add_account("acct_123", meters=["ai_tokens_used"])
    dag_run = run_dag(
        "t_meter_event_no_preflight", run_conf={"event_name": "typo_meter", "account": "acct_123"}
    )

    assert xcoms(dag_run, "record")["success"] is True  # Stripe's 200 means accepted, not billed
    assert [r["code"] for r in account.error_reports] == ["no_meter"]
    [headers] = [h for _, path, h in secret_server.request_log if path == "/v1/billing/meter_events"]
    assert headers["Stripe-Account"] == "acct_123"


def test_a_count_meter_says_the_value_is_ignored(secret_server):
    secret_server.ledger.meters.clear()
    secret_server.ledger.add_meter("ai_tokens_used", formula="count")

    dag_run = run_dag("t_meter_event_branch", run_conf={"customer_id": "cus_count", "value": "42"})

    response = xcoms(dag_run, "record")["response"]
    assert "counts as 1, its value is ignored" in response["note"]
    assert response["payload"]["value"] == "42"  # sent as given; Stripe counts it once


def test_a_fixed_meter_is_the_tasks_asset():
    from airflow_provider_stripe_meter.operators.meter_event import StripeMeterEventOperator

    fixed = StripeMeterEventOperator(task_id="a", event_name="ai_tokens_used", customer_id="cus_1", value=1)
    assert [o.uri for o in fixed.outlets] == ["stripe://platform/meters/ai_tokens_used"]
    templated = StripeMeterEventOperator(
        task_id="b", event_name="{{ params.e }}", customer_id="cus_1", value=1
    )
    # Known only when the task runs: the meters' alias, which the task fills with its meter's Asset.
    assert [(type(o).__name__, o.name) for o in templated.outlets] == [("AssetAlias", "stripe_meters")]


def _asset_events(dag_run: Any) -> list[tuple[str, str]]:
    """(task id, asset URI) of every Asset event the run emitted."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(AssetEvent.source_task_id, AssetModel.uri)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetEvent.source_run_id == dag_run.run_id)
        )
        return sorted((task_id, uri) for task_id, uri in rows)


def test_every_bad_input_rendered_at_run_time_answers_success_false_and_branches(secret_server):
    from tests.dags.meter_event_dags import BAD_INPUTS

    dag_run = run_dag("t_meter_event_bad_inputs")

    assert secret_server.stats["v1_meter_event"] == 0
    states = task_states(dag_run)
    fields = {}
    for task_id in [*BAD_INPUTS, "fixed_meter_bad_customer"]:
        pushed = xcoms(dag_run, task_id)
        assert pushed["success"] is False, task_id
        response = pushed["response"]
        assert response["type"] == "validation_error", (task_id, response)
        assert response["rule"], task_id
        fields[task_id] = response["field"]
        assert (states[task_id], states[f"{task_id}_not_recorded"], states[f"{task_id}_ok"]) == (
            "success",
            "success",
            "skipped",
        ), task_id
    assert fields == {
        **{t: "event_name" for t in BAD_INPUTS if t.endswith("event_name")},
        "empty_customer": "customer_id",
        "not_a_customer": "customer_id",
        "fixed_meter_bad_customer": "customer_id",
        **{t: "value" for t in ("decimal_value", "empty_value", "word_value", "sixteen_digits")},
        "long_identifier": "identifier",
        **{t: "timestamp" for t in BAD_INPUTS if t.startswith("timestamp")},
    }
    # Nothing was recorded, so no meter's Asset has an event: not through the alias, and not
    # through the fixed meter's own outlet either.
    assert _asset_events(dag_run) == []


def test_event_for_a_customer_stripe_does_not_know_is_not_sent(secret_server):
    # Stripe would answer 200 and drop the event later: the task asks first and says why.
    secret_server.ledger.customers = {"cus_known"}

    dag_run = run_dag("t_meter_event_branch", run_conf={"customer_id": "cus_crm_later", "value": "5"})

    assert secret_server.ledger.events == []
    assert secret_server.stats["v1_customer"] == 1
    pushed = xcoms(dag_run, "record")
    assert pushed["success"] is False
    assert pushed["response"]["code"] == "customer_unknown"
    assert pushed["response"]["customer_id"] == "cus_crm_later"
    assert task_states(dag_run)["on_failure"] == "success"
