"""The "Stripe meter" extra link: the right dashboard page for test, live and Connect."""

from __future__ import annotations

import json

import pytest

from airflow_provider_stripe_meter.links.stripe import StripeMeterLink, dashboard_url
from tests.conftest import run_dag, xcoms

LINK_XCOM = StripeMeterLink().xcom_key
LIVE_KEY = "sk_live_LINKTEST_4d2e"


@pytest.mark.parametrize(
    ("livemode", "account", "meter_id", "url"),
    [
        (False, None, "mtr_1", "https://dashboard.stripe.com/test/meters/mtr_1"),
        (True, None, "mtr_1", "https://dashboard.stripe.com/meters/mtr_1"),
        (False, "acct_9", "mtr_1", "https://dashboard.stripe.com/acct_9/test/meters/mtr_1"),
        (True, "acct_9", "mtr_1", "https://dashboard.stripe.com/acct_9/meters/mtr_1"),
        (False, None, None, "https://dashboard.stripe.com/test/meters"),
    ],
)
def test_dashboard_url(livemode, account, meter_id, url):
    assert dashboard_url(livemode=livemode, account=account, meter_id=meter_id) == url


def test_every_operator_and_the_sensor_offer_the_link():
    from airflow_provider_stripe_meter.operators.meter_event import StripeMeterEventOperator
    from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator
    from airflow_provider_stripe_meter.operators.meter_event_correction import (
        StripeMeterEventCancelOperator,
        StripeMeterTopUpOperator,
    )
    from airflow_provider_stripe_meter.sensors.meter_reconcile import StripeMeterReconcileSensor

    for cls in (
        StripeMeterEventOperator,
        StripeMeterEventBatchOperator,
        StripeMeterTopUpOperator,
        StripeMeterEventCancelOperator,
        StripeMeterReconcileSensor,
    ):
        assert [link.name for link in cls.operator_extra_links] == ["Stripe meter"], cls


@pytest.mark.airflow
@pytest.mark.usefixtures("airflow_db")
def test_a_test_key_links_the_meter_in_test_data(secret_server):
    dag_run = run_dag("t_meter_event_branch", run_conf={"customer_id": "cus_link"})

    meter_id = secret_server.ledger.meter_for("ai_tokens_used").id
    assert xcoms(dag_run, "record")[LINK_XCOM] == f"https://dashboard.stripe.com/test/meters/{meter_id}"


@pytest.mark.airflow
@pytest.mark.usefixtures("airflow_db")
def test_a_live_key_acting_for_a_connected_account_links_into_that_account(monkeypatch):
    from airflow_provider_stripe_meter.testing import LocalStripeServer

    with LocalStripeServer(
        meters=["ai_tokens_used"], accounts=["acct_1Connected"], api_keys=[LIVE_KEY]
    ) as server:
        monkeypatch.setenv(
            "AIRFLOW_CONN_STRIPE_DEFAULT", server.connection_json(LIVE_KEY, stripe_account="acct_1Connected")
        )
        dag_run = run_dag("t_meter_event_branch", run_conf={"customer_id": "cus_link"})
        meter_id = server.account("acct_1Connected").meter_for("ai_tokens_used").id

    pushed = xcoms(dag_run, "record")
    assert pushed["success"] is True
    assert pushed[LINK_XCOM] == f"https://dashboard.stripe.com/acct_1Connected/meters/{meter_id}"
    assert LIVE_KEY not in json.dumps(pushed)


@pytest.mark.airflow
@pytest.mark.usefixtures("airflow_db")
def test_without_preflight_the_link_opens_the_meters_list(secret_server):
    dag_run = run_dag("t_meter_event_no_preflight", run_conf={"customer_id": "cus_link"})

    assert xcoms(dag_run, "record")[LINK_XCOM] == "https://dashboard.stripe.com/test/meters"
