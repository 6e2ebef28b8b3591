"""The billing core's Stripe port (:class:`~.ports.StripeMeters`) over the hook's single calls.

Plain Python. The hook makes one Stripe call per method; what a run asks of many customers at
once (their summaries, whether Stripe knows them) is paced here
(:mod:`~airflow_provider_stripe_meter.utils.paced_reads`), and the v2 stream's session is
kept here (:mod:`~airflow_provider_stripe_meter.utils.stream_session`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.utils import paced_reads
from airflow_provider_stripe_meter.utils.stream_session import MeterEventStream

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.utils.rules import MeterEvent


class HookStripe:
    """:class:`~.ports.StripeMeters` over ``hook``
    (a :class:`~airflow_provider_stripe_meter.hooks.stripe.StripeHook`)."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    @property
    def livemode(self) -> bool:
        """Whether the hook's key is a live one."""
        return bool(self.hook.livemode)

    def active_meter(self, event_name: str) -> Mapping[str, Any]:
        """The active meter of ``event_name`` (the hook's meters list, read once)."""
        return self.hook.active_meter(event_name)

    def retrieve_meter(self, meter_id: str) -> Mapping[str, Any]:
        """One meter, read afresh."""
        return self.hook.retrieve_meter(meter_id)

    def recorded_per_day(
        self, meter_id: str, customers: list[str], first: date, last: date, *, max_rps: float
    ) -> paced_reads.PerDay:
        """Stripe's figures per (customer, UTC day), one paced request a customer."""
        return paced_reads.recorded_per_day(self.hook, meter_id, customers, first, last, max_rps=max_rps)

    def usage_between(self, meter_id: str, customer: str, start: int, end: int) -> int | None:
        """A customer's figure over ``[start, end)``; ``None`` for an unknown customer."""
        return self.hook.usage_between(meter_id, customer, start, end)

    def create_meter_event(
        self,
        event: MeterEvent,
        *,
        customer_payload_key: str,
        value_payload_key: str,
        retry: bool = True,
        idempotency_key: str | None = None,
    ) -> Any:
        """``POST /v1/billing/meter_events``."""
        return self.hook.create_meter_event(
            event,
            customer_payload_key=customer_payload_key,
            value_payload_key=value_payload_key,
            retry=retry,
            idempotency_key=idempotency_key,
        )

    def meter_event_stream(self) -> MeterEventStream:
        """A v2 meter event stream whose session is renewed as it expires."""
        return MeterEventStream(self.hook)

    def cancel_meter_event(self, event_name: str, identifier: str) -> Any:
        """Cancel an event by identifier."""
        return self.hook.cancel_meter_event(event_name, identifier)

    def customers_known(self, customers: Sequence[str], *, max_rps: float) -> set[str]:
        """Which of ``customers`` Stripe knows, one paced request each."""
        return paced_reads.customers_known(self.hook, customers, max_rps=max_rps)

    def customer_ids(self) -> set[str]:
        """Every customer of the account."""
        return self.hook.customer_ids()
