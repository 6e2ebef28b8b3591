"""The v2 meter event stream's session, in-process: opened once, renewed before and after it expires."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest

from airflow_provider_stripe_meter.exceptions import StripeSessionExpiredError
from airflow_provider_stripe_meter.utils.stream_session import MeterEventStream, to_epoch


class Stream:
    """The hook's three stream calls; sessions last ``lasts`` seconds; ``expire`` answers expired once."""

    def __init__(self, lasts: float = 900.0) -> None:
        self.lasts = lasts
        self.sessions = 0
        self.sent: list[tuple[str, list]] = []
        self.expire = False
        self.lock = threading.Lock()

    def create_meter_event_session(self) -> dict:
        with self.lock:
            self.sessions += 1
            return {"authentication_token": f"tok_{self.sessions}", "expires_at": time.time() + self.lasts}

    def session_client(self, authentication_token: str) -> str:
        return f"client:{authentication_token}"

    def send_meter_event_stream(self, session_client: str, events) -> None:
        with self.lock:
            if self.expire:
                self.expire = False
                raise StripeSessionExpiredError("Stripe 401 temporary_session_expired", {"http_status": 401})
            self.sent.append((session_client, list(events)))


def test_one_session_serves_every_sender_until_it_nears_its_end():
    stripe = Stream()
    stream = MeterEventStream(stripe)
    threads = [threading.Thread(target=stream.send, args=([{"n": n}],)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stripe.sessions == 1
    assert {client for client, _ in stripe.sent} == {"client:tok_1"}
    assert len(stripe.sent) == 20


def test_a_session_is_renewed_before_it_expires():
    stripe = Stream(lasts=30.0)  # inside renew_before (60 s): each send opens a new one
    stream = MeterEventStream(stripe)
    stream.send([{"n": 1}])
    stream.send([{"n": 2}])
    assert stripe.sessions == 2
    assert [client for client, _ in stripe.sent] == ["client:tok_1", "client:tok_2"]


def test_an_expired_answer_sends_the_same_events_again_through_a_new_session():
    stripe = Stream()
    stream = MeterEventStream(stripe)
    stream.send([{"n": 1}])
    stripe.expire = True
    stream.send([{"n": 2}])
    assert stripe.sessions == 2
    assert stripe.sent == [("client:tok_1", [{"n": 1}]), ("client:tok_2", [{"n": 2}])]


@pytest.mark.parametrize(
    "value",
    [
        1_780_000_000,
        1_780_000_000.0,
        datetime.fromtimestamp(1_780_000_000, timezone.utc),
        "2026-05-28T20:26:40Z",
    ],
)
def test_expiry_is_read_in_each_shape_the_sdk_gives(value):
    assert to_epoch(value) == 1_780_000_000.0
