"""Pacing, one-in-flight per key, retries and outcomes of the deliverer, with plain functions."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from airflow_provider_stripe_meter.exceptions import (
    StripeConfigurationError,
    StripeDuplicateIdentifierError,
    StripeRequestRejectedError,
    StripeTransientError,
)
from airflow_provider_stripe_meter.utils.delivery import (
    Deliverer,
    KeyedWorkQueue,
    OutageGate,
    RateLimiter,
    full_jitter,
)


def no_wait(_attempt: int) -> float:
    return 0.0


def test_full_jitter_grows_and_is_capped():
    assert full_jitter(1, rng=lambda: 1.0) == 1.0
    assert full_jitter(3, rng=lambda: 1.0) == 4.0
    assert full_jitter(20, rng=lambda: 1.0) == 30.0
    assert full_jitter(3, rng=lambda: 0.0) == 0.0


def test_rate_limiter_spaces_calls_evenly():
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))

    limiter = RateLimiter(4, clock=lambda: now[0], sleep=sleep)
    for _ in range(4):
        limiter.acquire()
    assert slept == [0.25, 0.5, 0.75]
    limiter.pause(5)
    limiter.acquire()
    assert slept[-1] == 5.0
    with pytest.raises(ValueError, match="max_rps"):
        RateLimiter(0)


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def test_keyed_queue_never_hands_out_a_busy_key():
    queue = KeyedWorkQueue([("a", 1), ("a", 2), ("b", 1), ("c", 1), ("b", 2)], key=lambda item: item[0])
    first = queue.take(3)
    assert first == [("a", 1), ("b", 1), ("c", 1)]
    got: list = []
    waiter = threading.Thread(target=lambda: got.extend(queue.take(3)))
    waiter.start()
    wait_until(lambda: queue.waiting == 1)  # blocked inside take(), not merely slow
    assert got == []  # ("a", 2) and ("b", 2) must wait for their keys
    queue.done(first)
    waiter.join(1)
    assert got == [("a", 2), ("b", 2)]
    queue.done(got)
    assert queue.take() == []


def deliverer(send, **kwargs):
    kwargs.setdefault("max_rps", None)
    kwargs.setdefault("backoff", no_wait)
    return Deliverer(send, key=lambda item: item[0], describe=lambda item: {"item": list(item)}, **kwargs)


def run(send, items, **kwargs):
    return deliverer(send, **kwargs).run(items)


def test_outcomes_are_counted_and_sampled():
    answers = {
        ("cus_dup", 1): StripeDuplicateIdentifierError("dup", {"http_status": 400}),
        ("cus_bad", 1): StripeRequestRejectedError("bad", {"http_status": 400, "code": "x"}),
    }
    flaky = Counter()

    def send(batch):
        [item] = batch
        if item in answers:
            raise answers[item]
        if item[0] == "cus_flaky" and flaky[item] < 2:
            flaky[item] += 1
            raise StripeTransientError("503", {"http_status": 503})
        if item[0] == "cus_down":
            raise StripeTransientError("503", {"http_status": 503})

    items = [("cus_ok", 1), ("cus_dup", 1), ("cus_bad", 1), ("cus_flaky", 1), ("cus_down", 1)]
    # Two customers failing among successes is not an outage: the gate stays out of this count,
    # whatever order the threads take (outage_after above the failures there are).
    report = run(send, items, max_attempts=4, outage_after=100)
    assert (report.sent, report.already_recorded, report.rejected, report.failed) == (2, 1, 1, 1)
    assert report.retried == 2 + 3
    assert report.samples["rejected"] == [
        {"item": ["cus_bad", 1], "error": {"http_status": 400, "code": "x"}}
    ]
    assert report.samples["failed"][0]["attempts"] == 4
    assert sorted(report.unsettled) == [("cus_bad", 1), ("cus_down", 1)]


def test_at_most_one_request_in_flight_per_key_under_load():
    in_flight: Counter = Counter()
    lock = threading.Lock()
    overlaps = []

    def send(batch):
        with lock:
            for item in batch:
                in_flight[item[0]] += 1
                if in_flight[item[0]] > 1:
                    overlaps.append(item)
        time.sleep(0.002)
        with lock:
            for item in batch:
                in_flight[item[0]] -= 1

    items = [(f"cus_{n % 5}", n) for n in range(200)]
    report = run(send, items, concurrency=16)
    assert report.sent == 200
    assert overlaps == []


def test_batches_hold_distinct_keys():
    seen_batches = []

    def send(batch):
        seen_batches.append([item[0] for item in batch])

    items = [(f"cus_{n % 30}", n) for n in range(300)]
    report = run(send, items, batch_size=100, concurrency=2)
    assert report.sent == 300
    assert all(len(set(batch)) == len(batch) <= 100 for batch in seen_batches)


def test_a_pause_holds_callers_back_even_without_a_rate():
    now = [0.0]
    slept: list[float] = []
    limiter = RateLimiter(None, clock=lambda: now[0], sleep=slept.append)
    limiter.acquire()
    limiter.pause(3.0)
    limiter.acquire()
    assert slept == [3.0]


def test_rate_limited_answers_pause_everyone_and_are_retried():
    calls = Counter()
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:  # a fake clock: sleeping moves time on
        slept.append(seconds)
        now[0] += seconds

    def send(batch):
        calls[batch[0]] += 1
        if calls[batch[0]] == 1:
            raise StripeTransientError("429", {"http_status": 429})

    paced = deliverer(send, concurrency=1, backoff=lambda attempt: 2.0, sleep=sleep)
    paced.limiter = RateLimiter(None, clock=lambda: now[0], sleep=sleep)
    report = paced.run([("cus_a", 1), ("cus_b", 1)])
    assert (report.sent, report.rate_limited, report.requests) == (2, 2, 4)
    # Each 429 backs its own item off 2 s and pushes every caller's next turn back as far.
    assert slept == [2.0, 2.0]
    assert paced.limiter.next_slot == 4.0


def test_a_refused_key_stops_the_run():
    def send(batch):
        raise StripeConfigurationError("401", {"http_status": 401})

    with pytest.raises(StripeConfigurationError):
        run(send, [("cus_a", 1), ("cus_b", 2)])


def test_progress_is_reported():
    lines: list[str] = []
    run(lambda batch: None, [("cus_a", 1)], progress=lines.append, progress_every=0)
    assert lines
    assert lines[-1].startswith("1/1 events settled (100.0%)")


def test_an_outage_becomes_one_probe_at_a_time_and_uses_no_attempts():
    failing_calls = 40  # the first 40 requests fail, whoever sends them
    calls = Counter()
    lock = threading.Lock()
    probes_in_flight = [0]
    most_probes_in_flight = [0]

    def send(batch):
        # A request that starts while the gate is open is a probe; no two may overlap.
        probe = paced.gate.is_open
        with lock:
            calls["all"] += 1
            failing = calls["all"] <= failing_calls
            if probe:
                probes_in_flight[0] += 1
                most_probes_in_flight[0] = max(most_probes_in_flight[0], probes_in_flight[0])
        try:
            if failing:
                raise StripeTransientError("503", {"http_status": 503})
        finally:
            if probe:
                with lock:
                    probes_in_flight[0] -= 1

    items = [(f"cus_{n}", n) for n in range(30)]
    # With max_attempts >= outage_after (5), no item can use up its attempts before the outage is
    # recognised; 40 failures in a row would otherwise sink every item several times over.
    paced = deliverer(send, max_attempts=5, concurrency=8, sleep=lambda s: None, outage_after=5)
    report = paced.run(items)
    assert (report.sent, report.failed) == (30, 0)
    assert report.outages == 1
    # Outside the gate fail at most the 4 before the outage is recognised and the 8 in flight.
    assert report.probes >= failing_calls - 4 - 8
    assert most_probes_in_flight[0] == 1


def test_probe_waits_double_up_to_the_cap_and_the_outage_ends_at_its_timeout():
    # In virtual time: the outage's length is read from ``clock``; waits are only computed.
    now = [0.0]
    gate = OutageGate(after=1, timeout=60.0, probe_cap=15.0, clock=lambda: now[0], rng=lambda: 1.0)
    assert gate.failed()  # one failure is an outage here
    waits = []
    while gate.enter():  # one probe at a time, each failing
        waits.append(gate.probe_wait())
        gate.failed()
        gate.leave()
        now[0] += waits[-1]
    assert waits[:5] == [2.0, 4.0, 8.0, 15.0, 15.0]
    assert set(waits[3:]) == {15.0}
    assert now[0] > 60.0
    assert gate.probes == len(waits)


def test_the_outage_threshold_grows_with_the_requests_in_flight():
    # Eight in flight on a flaky network fail five in a row by chance; an outage fails them all.
    paced = deliverer(lambda b: None, concurrency=50)
    assert [paced.outage_threshold(n) for n in (1, 2, 3, 8, 50)] == [5, 5, 6, 16, 16]
    assert deliverer(lambda b: None, outage_after=3).outage_threshold(8) == 3


def test_an_outage_longer_than_the_timeout_fails_what_is_left():
    def send(batch):
        raise StripeTransientError("503", {"http_status": 503})

    report = run(
        send, [(f"cus_{n}", n) for n in range(10)], concurrency=2, sleep=lambda s: None, outage_timeout=0.05
    )
    assert (report.sent, report.failed) == (0, 10)
    assert report.samples["failed"][-1]["error"]["type"] == "outage"


def test_default_rates_stay_under_stripes_limits_for_the_platform_and_connected_accounts():
    """https://docs.stripe.com/rate-limits: 1,000 meter events/s live, apart from the basic
    limit (100/s live, 25/s test) that reads and a connected account's meter events count toward."""
    from airflow_provider_stripe_meter.utils.delivery import default_max_rps, default_read_rps

    assert 900 <= default_max_rps(True) < 1_000
    assert 0.8 * 100 <= default_max_rps(True, connected=True) < 100
    assert 0.8 * 100 <= default_read_rps(True) < 100
    assert all(rate < 25 for rate in (default_max_rps(False), default_read_rps(False)))
    assert default_max_rps(False, connected=True) < 25


def test_work_given_meanwhile_runs_on_the_callers_thread_while_requests_are_out():
    # The requests cannot finish until the caller's work is done: run first, then the work,
    # would leave every request waiting out its 5 s and unsent.
    done = threading.Event()
    seen = []

    def send(batch):
        seen.append(done.wait(5))

    def work():
        seen.append(threading.current_thread() is threading.main_thread())
        done.set()

    report = deliverer(send, concurrency=4).run([(f"cus_{n}", 1) for n in range(8)], meanwhile=work)
    assert report.sent == 8
    assert seen[0] is True  # the work, on the caller's (main) thread
    assert seen[1:] == [True] * 8  # every request saw it done while it was out
