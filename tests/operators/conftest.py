"""Fixtures of the operator tests that run in virtual time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import pendulum


@pytest.fixture
def at_time(monkeypatch, secret_server) -> Callable[[pendulum.DateTime], None]:
    """Set the virtual now of the operator and of the local server (it runs on from there)."""
    from airflow_provider_stripe_meter.utils.clock import SYSTEM

    offset = [0.0]

    def now() -> float:
        return time.time() + offset[0]

    monkeypatch.setattr(SYSTEM, "source", now)
    secret_server.ledger.clock = now

    def set_to(moment: pendulum.DateTime) -> None:
        offset[0] = moment.timestamp() - time.time()

    return set_to
