"""Late-billing records stay in Variables of bounded size, however many customers are billed late."""

from __future__ import annotations

import json
import threading
from datetime import date, timedelta

import pytest

from airflow_provider_stripe_meter.state import variables
from airflow_provider_stripe_meter.state.late_billing import LateLandings
from airflow_provider_stripe_meter.state.shards import SHARD_SIZE, ShardedRecord
from tests.state.test_variables import Variables

LANDING = date(2026, 10, 28)
ORIGINAL = date(2026, 10, 1)


@pytest.fixture
def no_settling(monkeypatch):
    # One writer at a time: the read-back wait protects nothing here and only costs time.
    monkeypatch.setattr(variables, "SETTLE_SECONDS", 0.0)


def _late(customers: int, *, run: str = "r") -> list[dict]:
    return [
        {
            "event_name": "ai_tokens_used",
            "customer": f"cus_{c:07d}",
            "day": ORIGINAL.isoformat(),
            "value": 1 + c % 13,
            "identifier": f"usage-late-{run}-cus_{c:07d}-{ORIGINAL.isoformat()}",
            "at": 1_777_000_000,
            "landing_day": LANDING.isoformat(),
            "baseline": 0,
            "written_at": 1_777_000_000.0,
        }
        for c in range(customers)
    ]


def _bill_late(store: Variables, customers: int) -> LateLandings:
    landings = LateLandings("acct_1", "mtr_1", "usage", backend=store)
    entries = _late(customers)
    landings.add_pending(entries)
    assert len(landings.pending()) == customers
    landings.confirm(entries)
    return landings


@pytest.mark.usefixtures("no_settling")
def test_no_variable_grows_with_the_number_of_customers_billed_late():
    largest = {}
    for customers in (2_000, 8_000):
        store = Variables()
        landings = _bill_late(store, customers)
        largest[customers] = max(len(value) for value in store.values.values())
        records = [json.loads(value) for value in store.values.values()]
        assert max(len(r) for r in records if isinstance(r, dict)) == SHARD_SIZE
        # Every customer's amount is still there, on its landing day and on its original day.
        expected = {f"cus_{c:07d}": 1 + c % 13 for c in range(customers)}
        assert landings.billed([ORIGINAL]) == {ORIGINAL: expected}
        assert landings.read([LANDING]) == {
            LANDING: {customer: {ORIGINAL.isoformat(): v} for customer, v in expected.items()}
        }
        assert landings.pending() == []
    # Four times the customers, the same largest Variable (to a few bytes): a full shard.
    assert abs(largest[8_000] - largest[2_000]) < 100
    assert largest[8_000] < 150 * SHARD_SIZE


@pytest.mark.usefixtures("no_settling")
def test_settled_pending_entries_free_their_shards_for_the_next_run():
    store = Variables()
    landings = LateLandings(None, "mtr_1", "usage", backend=store)
    pending = ShardedRecord(landings, landings.pending_key, "pending")
    for run in range(6):
        entries = _late(1_200, run=f"r{run}")
        landings.add_pending(entries)
        landings.confirm(entries)
    # Six runs of 1,200 pending entries each: never more shards than one run needed.
    assert pending.count() == 3
    assert landings.pending() == []
    assert not any(key.startswith(landings.pending_key + ".") for key in store.values)


@pytest.mark.usefixtures("no_settling")
def test_a_writer_killed_after_reserving_shards_leaves_nothing_wrong():
    store = Variables()
    landings = LateLandings(None, "mtr_1", "usage", backend=store)
    record = ShardedRecord(landings, landings.pending_key, "pending")
    # The index names two shards whose writes never happened.
    landings.merge(record.key, lambda _: {"shards": 2}, "pending")
    assert landings.pending() == []
    landings.add_pending(_late(3))
    assert [e["customer"] for e in landings.pending()] == ["cus_0000000", "cus_0000001", "cus_0000002"]
    assert record.count() == 2  # the reserved shard was filled, not a third opened


def test_runs_adding_to_the_same_shards_at_once_lose_nothing(monkeypatch):
    monkeypatch.setattr("airflow_provider_stripe_meter.state.shards.SHARD_SIZE", 10)
    store = Variables(latency=0.002)
    runs = [LateLandings(None, "mtr_1", "usage", backend=store) for _ in range(6)]

    def bill(n: int) -> None:
        entries = _late(25, run=f"run{n}")
        runs[n].add_pending(entries)
        runs[n].confirm(entries)

    threads = [threading.Thread(target=bill, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    record = ShardedRecord(runs[0], runs[0].original_key(ORIGINAL), "late-of")
    assert len(record.read()) == 150  # every run's 25 entries, none lost in a race
    assert runs[0].billed([ORIGINAL])[ORIGINAL]["cus_0000000"] == 6 * 1
    assert runs[0].pending() == []
    # Racing writers can share a shard, but none holds more than each of them put there.
    sizes = [len(json.loads(v)) for k, v in store.values.items() if k.startswith(record.key + ".")]
    assert max(sizes) <= 10 * 6


@pytest.mark.usefixtures("no_settling")
def test_what_landed_on_a_day_past_the_window_is_removed_and_what_was_billed_is_kept():
    store = Variables()
    landings = _bill_late(store, 1_200)
    assert landings.read([LANDING])[LANDING]

    landings.forget_landed_before(LANDING)  # the day before the oldest kept: nothing of LANDING goes
    assert landings.read([LANDING])[LANDING]
    landings.forget_landed_before(LANDING + timedelta(days=1))

    assert landings.read([LANDING]) == {}
    assert not any(key.startswith(landings.landing_key(LANDING)) for key in store.values)
    # A later backfill of the original day still finds every customer's amount billed late.
    assert len(landings.billed([ORIGINAL])[ORIGINAL]) == 1_200
