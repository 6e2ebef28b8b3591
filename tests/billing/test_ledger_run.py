"""The billing core against the ledger, in-process: every history billing teams live, asserting
Stripe's per-day figures (by the meter's formula) and ``success`` after every run."""

from __future__ import annotations

import pytest

from tests.billing.world import DAY, HOUR, START, World, midnight


@pytest.fixture
def world(tmp_path, monkeypatch):
    def make(**kwargs):
        return World(tmp_path, monkeypatch, **kwargs)

    return make


def test_a_night_is_billed_once_and_a_rerun_sends_and_reads_nothing(world):
    w = world()
    for i in range(5):
        w.add(f"cus_{i}", 100 + i, midnight(-1) + 3600 * (i + 1))
    first = w.run()
    assert (first["success"], first["sent"], first["events_sent"]) == (True, 5, 5)
    assert w.billed() == w.source()

    w.advance(6 * HOUR)
    again = w.run()
    assert (again["success"], again["sent"], again["already_recorded"], again["events_sent"]) == (
        True,
        0,
        5,
        0,
    )
    assert again["summary_requests"] == 0
    assert w.billed() == w.source()
