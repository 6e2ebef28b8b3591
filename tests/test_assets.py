"""The stripe:// asset URI scheme: built, checked and normalised, also by Airflow itself."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from airflow_provider_stripe_meter.assets.stripe import create_asset, meter_uri, sanitize_uri


def test_uris_name_the_account_and_the_meter():
    assert meter_uri("ai_tokens_used") == "stripe://platform/meters/ai_tokens_used"
    assert meter_uri("api calls/v2", "acct_1") == "stripe://acct_1/meters/api%20calls%2Fv2"
    assert create_asset(event_name="e", account="acct_9").uri == "stripe://acct_9/meters/e"


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("stripe:///meters/e", "must name an account"),
        ("stripe://cus_1/meters/e", "'platform' or a connected account"),
        ("stripe://platform/e", "stripe://<account>/meters/<event name>"),
        ("stripe://platform/meters/", "stripe://<account>/meters/<event name>"),
    ],
)
def test_malformed_uris_are_refused(uri, says):
    with pytest.raises(ValueError, match=says):
        sanitize_uri(urlsplit(uri))


def test_airflow_normalises_the_scheme_through_the_provider():
    from airflow.sdk import Asset

    assert Asset("stripe://platform/meters/ai_tokens_used/").uri == "stripe://platform/meters/ai_tokens_used"
