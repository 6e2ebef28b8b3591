"""Records in Airflow Variables: writes are merges, so a writer that loses a race writes again."""

from __future__ import annotations

import threading
import time
from datetime import date

from airflow_provider_stripe_meter.state.day_journal import SentDays
from airflow_provider_stripe_meter.state.late_billing import LateLandings

DAY = date(2026, 11, 20)


class Variables:
    """A stand-in for Airflow's Variables: last writer wins, each call takes ``latency`` seconds."""

    def __init__(self, latency: float = 0.0) -> None:
        self.values: dict[str, str] = {}
        self.latency = latency
        self.writes = 0

    def get(self, key, default=None):
        time.sleep(self.latency)
        return self.values.get(key, default)

    def set(self, key, value, description=None):
        time.sleep(self.latency)
        self.values[key] = value
        self.writes += 1

    def delete(self, key):
        time.sleep(self.latency)
        self.values.pop(key, None)


def _entry(identifier: str, value: int) -> dict:
    return {
        "event_name": "e",
        "customer": "cus_1",
        "day": "2026-10-01",
        "value": value,
        "identifier": identifier,
        "at": 1,
        "landing_day": "2026-10-28",
        "baseline": 0,
        "written_at": 0.0,
    }


def test_runs_adding_pending_entries_at_once_lose_none():
    store = Variables(latency=0.002)
    runs = [LateLandings(None, "mtr_1", "usage", backend=store) for _ in range(8)]

    def add(n: int) -> None:
        for k in range(4):
            runs[n].add_pending([_entry(f"run{n}-{k}", 1)])

    threads = [threading.Thread(target=add, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(runs[0].pending()) == 32
    assert store.writes > 33  # writers did race, and wrote again


def test_without_the_read_back_racing_writers_lose_entries(monkeypatch):
    # The check above can fail: with the read-back switched off, the same race loses entries.
    from airflow_provider_stripe_meter.state import variables

    monkeypatch.setattr(variables, "_same", lambda stored, wanted: True)
    monkeypatch.setattr(variables, "SETTLE_SECONDS", 0.0)
    store = Variables(latency=0.002)
    runs = [LateLandings(None, "mtr_1", "usage", backend=store) for _ in range(8)]
    threads = [
        threading.Thread(target=lambda n=n: [runs[n].add_pending([_entry(f"r{n}-{k}", 1)]) for k in range(4)])
        for n in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(runs[0].pending()) < 32


def test_late_amounts_merged_twice_count_once():
    store = Variables()
    landings = LateLandings(None, "mtr_1", "usage", backend=store)
    entries = [_entry("a", 5), _entry("b", 7)]
    landings.add_pending(entries)
    landings.confirm(entries)
    landings.confirm(entries)  # a repeat (or a merge applied again) adds nothing
    assert landings.read([date(2026, 10, 28)]) == {date(2026, 10, 28): {"cus_1": {"2026-10-01": 12}}}
    assert landings.billed([date(2026, 10, 1)]) == {date(2026, 10, 1): {"cus_1": 12}}
    assert landings.pending() == []


def test_a_days_version_and_last_send_only_move_forward_whoever_writes_last():
    store = Variables()
    journal = SentDays(None, "mtr_1", "usage", backend=store)
    journal.sending([DAY], {"run_id": "a"}, now=100.0)
    journal.sent({DAY: 0}, {"run_id": "a"}, now=110.0)
    # A slower run that planned with the same version finishes later but must not undo anything;
    # one that started sending earlier must not move last_send back.
    journal.sent({DAY: 0}, {"run_id": "b"}, now=120.0)
    journal.sending([DAY], {"run_id": "c"}, now=90.0)
    mark = journal.read([DAY])[DAY]
    assert (mark.version, mark.last_send) == (1, 120.0)
    journal.sent({DAY: 1}, {"run_id": "d"}, now=130.0)
    assert journal.read([DAY])[DAY].version == 2


def test_an_unreadable_mark_still_says_the_day_was_sent_to():
    store = Variables()
    journal = SentDays(None, "mtr_1", "usage", backend=store)
    store.values[journal.day_key(DAY)] = "not json"
    assert journal.read([DAY, date(2026, 11, 21)]) == {DAY: journal.read([DAY])[DAY]}
    assert journal.read([DAY])[DAY].version == 0
