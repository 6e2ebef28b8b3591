"""Pytest fixtures for the local Stripe server.

Opt in from a ``conftest.py``::

    pytest_plugins = ["airflow_provider_stripe_meter.testing.pytest_plugin"]
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from airflow_provider_stripe_meter.testing.server import LocalStripeServer


@pytest.fixture
def stripe_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalStripeServer]:
    """A running local Stripe server that checks every body against the OpenAPI spec.

    ``AIRFLOW_CONN_STRIPE_DEFAULT`` points at it. The test fails if any response broke the spec;
    requests that break it are listed in ``request_violations`` for the test to judge.
    """
    with LocalStripeServer(meters=["ai_tokens_used"], validate_spec=True) as server:
        monkeypatch.setenv("AIRFLOW_CONN_STRIPE_DEFAULT", server.connection_json())
        yield server
        assert server.spec_violations == [], server.spec_violations
