"""Sending planned events: through v1 (one a request, answered) or the v2 stream (100 a request)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from airflow_provider_stripe_meter.billing.plans import PlannedEvent, idempotency_key
from airflow_provider_stripe_meter.utils.days import rfc3339
from airflow_provider_stripe_meter.utils.delivery import Deliverer

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.billing.meters import MeterSpec
    from airflow_provider_stripe_meter.billing.ports import Log, StripeMeters
    from airflow_provider_stripe_meter.billing.settings import RunSettings

STREAM_BATCH = 100  # Stripe's maximum events per stream request
PROGRESS_SECONDS = 10.0  # progress lines at least this often on long runs
#: Days a mark is kept past Stripe's 35-day window (no event can reach an older day).
MARK_DAYS = 36


def make_deliverer(
    api: str,
    specs: dict[str, MeterSpec],
    settings: RunSettings,
    stripe: StripeMeters,
    log: Log,
    send: Callable[[Callable[[list[PlannedEvent]], None]], Callable[[list[PlannedEvent]], None]]
    | None = None,
    attempt: str = "",
) -> Deliverer[PlannedEvent]:
    """A deliverer of planned events through ``api`` (``v1``: one a request; ``v2_stream``: 100).

    ``send`` may wrap the function that sends a batch (the ledger run notes when each answer came).
    ``attempt``: the try that wrote the events' ledger rows, where an event does not name its own
    (:attr:`PlannedEvent.idempotency_key`).
    """
    delivery = settings.delivery
    sender = _v1(specs, stripe, attempt) if api == "v1" else _stream(specs, stripe)
    return Deliverer(
        send(sender) if send else sender,
        key=lambda e: (e.event_name, e.customer_id),
        describe=PlannedEvent.describe,
        batch_size=1 if api == "v1" else STREAM_BATCH,
        max_rps=settings.max_rps,
        concurrency=delivery.concurrency,
        max_attempts=delivery.max_attempts,
        outage_timeout=delivery.outage_timeout.total_seconds(),
        progress=lambda line: log.info("Delivery (%s): %s", api, line),
        progress_every=PROGRESS_SECONDS,
        sample_limit=settings.sample_limit,
    )


def _v1(
    specs: dict[str, MeterSpec], stripe: StripeMeters, attempt: str
) -> Callable[[list[PlannedEvent]], None]:
    def send(batch: list[PlannedEvent]) -> None:
        [event] = batch
        key = event.idempotency_key or (idempotency_key(event.identifier, attempt) if attempt else None)
        # The deliverer retries (with backoff and its outage gate): no SDK retries inside.
        stripe.create_meter_event(
            event.as_meter_event(),
            **specs[event.event_name].payload_keys,
            retry=False,
            # The try that wrote the event's ledger row: its own retries, and a later run settling
            # the row, get Stripe's first answer replayed; a duplicate answer is someone else's.
            idempotency_key=key,
        )

    return send


def _stream(specs: dict[str, MeterSpec], stripe: StripeMeters) -> Callable[[list[PlannedEvent]], None]:
    session = stripe.meter_event_stream()

    def send(batch: list[PlannedEvent]) -> None:
        session.send(
            [
                {
                    "event_name": e.event_name,
                    "identifier": e.identifier,
                    "timestamp": rfc3339(e.timestamp),
                    "payload": {
                        specs[e.event_name].customer_key: e.customer_id,
                        specs[e.event_name].value_key: str(e.value),
                    },
                }
                for e in batch
            ]
        )

    return send
