"""The billing core's Stripe port over a hook's single calls, in-process (a stand-in hook)."""

from __future__ import annotations

from datetime import date, datetime, timezone

from airflow_provider_stripe_meter.billing.hook_port import HookStripe
from airflow_provider_stripe_meter.utils.stream_session import MeterEventStream

DAY1 = int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp())


class Hook:
    """One answer per single call, each call recorded."""

    livemode = False

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def summaries_or_unknown(self, meter_id, customer_id, start_time, end_time, window, retry=True):
        self.calls.append(("summaries", customer_id, window, retry))
        if customer_id == "cus_ghost":
            return None
        return [{"start_time": DAY1, "aggregated_value": 4.0}]

    def customer_exists(self, customer_id, *, retry=True):
        self.calls.append(("customer", customer_id, retry))
        return customer_id != "cus_ghost"

    def create_meter_event_session(self):
        self.calls.append(("session",))
        return {"authentication_token": "tok", "expires_at": DAY1 + 10**9}

    def session_client(self, token):
        return f"client:{token}"

    def send_meter_event_stream(self, client, events):
        self.calls.append(("stream", client, len(events)))

    def cancel_meter_event(self, event_name, identifier):
        self.calls.append(("cancel", event_name, identifier))
        return {"id": "mtrevtadj_1"}


def test_the_port_paces_the_hook_s_single_reads_one_customer_each():
    hook = Hook()
    port = HookStripe(hook)

    found = port.recorded_per_day(
        "mtr_1", ["cus_a", "cus_ghost"], date(2026, 3, 1), date(2026, 3, 1), max_rps=1000
    )
    known = port.customers_known(["cus_a", "cus_ghost"], max_rps=1000)

    assert found == ({("cus_a", date(2026, 3, 1)): 4}, {"cus_ghost"})
    assert known == {"cus_a"}
    assert sorted(hook.calls) == [
        ("customer", "cus_a", False),
        ("customer", "cus_ghost", False),
        ("summaries", "cus_a", "day", False),
        ("summaries", "cus_ghost", "day", False),
    ]


def test_the_port_streams_through_one_session_and_passes_single_calls_through():
    hook = Hook()
    port = HookStripe(hook)

    stream = port.meter_event_stream()
    stream.send([{"event_name": "e"}])
    stream.send([{"event_name": "e"}, {"event_name": "e"}])

    assert isinstance(stream, MeterEventStream)
    assert port.cancel_meter_event("e", "id_1") == {"id": "mtrevtadj_1"}
    assert port.livemode is False
    assert hook.calls == [
        ("session",),
        ("stream", "client:tok", 1),
        ("stream", "client:tok", 2),
        ("cancel", "e", "id_1"),
    ]
