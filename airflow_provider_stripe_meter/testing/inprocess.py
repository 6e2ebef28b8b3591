"""The local server's Stripe, called in-process: the billing core's Stripe port without HTTP.

:class:`InProcessStripe` answers the calls of
:class:`~airflow_provider_stripe_meter.billing.ports.StripeMeters` straight from a
:class:`~airflow_provider_stripe_meter.testing.ledger.MeterLedger`, with the local server's
rules and Stripe's kinds of failure, so the billing core's histories run in milliseconds. The
wiring (the stripe SDK, HTTP, Airflow) is tested against :class:`LocalStripeServer` instead.

Faults a history needs: :meth:`InProcessStripe.kill_after` ends the "process" right after the
n-th accepted event (a :class:`Killed` that nothing in the core catches, as with ``kill -9``,
where nothing after that instant runs); :meth:`InProcessStripe.lose_answers` loses the answer
of every n-th accepted event (Stripe took it, the caller sees a network error).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.testing.ledger import MeterLedger, StripeApiError, parse_rfc3339
from airflow_provider_stripe_meter.utils.errors import Duplicate, Rejected, Transient

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.utils.rules import MeterEvent


class Killed(BaseException):
    """The process running the billing run died (``kill -9``): nothing after this instant runs."""


class _Stream:
    def __init__(self, stripe: InProcessStripe) -> None:
        self.stripe = stripe

    def send(self, events: list[dict[str, Any]]) -> None:
        self.stripe.requests["v2_stream"] += 1
        for event in events:
            self.stripe.accept(self._recorder(event))

    def _recorder(self, event: dict[str, Any]) -> Callable[[], Any]:
        def record() -> Any:
            return self.stripe.ledger.record(
                event_name=event["event_name"],
                payload=dict(event["payload"]),
                identifier=event.get("identifier"),
                timestamp=parse_rfc3339(event["timestamp"]) if event.get("timestamp") else None,
                api="v2_stream",
                synchronous=False,
            )

        return record


class InProcessStripe:
    """Stripe's meter calls answered from ``ledger`` in this process (see the module's docstring)."""

    livemode = False

    def __init__(self, ledger: MeterLedger) -> None:
        self.ledger = ledger
        self.requests: dict[str, int] = {
            "v1_meter_event": 0,
            "v2_stream": 0,
            "summaries": 0,
            "meters": 0,
            "customers": 0,
        }
        self._lock = threading.Lock()
        self._kill_at: int | None = None
        self._lose_every: int | None = None
        self._accepted = 0
        #: Called before each accepted event is recorded (a test's instant of choice).
        self.before_record: Callable[[], None] | None = None
        #: Answers by ``Idempotency-Key``: a retry under the same key gets the first answer back,
        #: also when that answer was lost on its way (Stripe saved it once the request ran).
        self._idempotent: dict[str, tuple[Any, BaseException | None]] = {}

    # -- faults -------------------------------------------------------------------------------

    def kill_after(self, accepted: int | None) -> None:
        """End the run (raise :class:`Killed`) right after the ``accepted``-th next accepted event."""
        with self._lock:
            self._kill_at = None if accepted is None else self._accepted + accepted

    def lose_answers(self, every: int | None) -> None:
        """Lose the answer to every ``every``-th accepted event (recorded; the caller sees a failure)."""
        self._lose_every = every

    def accept(self, record: Callable[[], Any]) -> Any:
        """Record through ``record``, then apply the faults."""
        if self.before_record is not None:
            self.before_record()
        result = record()
        with self._lock:
            self._accepted += 1
            count, kill_at, every = self._accepted, self._kill_at, self._lose_every
        if kill_at is not None and count >= kill_at:
            raise Killed(f"killed after {count} accepted events")
        if every and count % every == 0:
            raise Transient("answer lost", {"type": "api_connection_error", "message": "answer lost"})
        return result

    # -- the StripeMeters port ----------------------------------------------------------------

    def active_meter(self, event_name: str) -> Mapping[str, Any]:
        """The active meter of ``event_name``; ``LookupError`` if there is none."""
        self.requests["meters"] += 1
        meter = self.ledger.meter_for(event_name)
        if meter is None or meter.status != "active":
            raise LookupError(f"No active Stripe meter for event_name {event_name!r}")
        return meter.as_object()

    def retrieve_meter(self, meter_id: str) -> Mapping[str, Any]:
        """The meter ``meter_id``."""
        self.requests["meters"] += 1
        return self.ledger.meters[meter_id].as_object()

    def recorded_per_day(
        self, meter_id: str, customers: list[str], first: date, last: date, *, max_rps: float
    ) -> tuple[dict[tuple[str, date], int], set[str]]:
        """Stripe's summaries per (customer, UTC day), one request a customer; and unknown customers."""
        meter = self.ledger.meters[meter_id]
        start = int(datetime(first.year, first.month, first.day, tzinfo=timezone.utc).timestamp())
        end = int(datetime(last.year, last.month, last.day, tzinfo=timezone.utc).timestamp()) + 86400
        found: dict[tuple[str, date], int] = {}
        unknown: set[str] = set()
        for customer in customers:
            self.requests["summaries"] += 1
            if not self.ledger.customer_known(customer):
                unknown.add(customer)
                continue
            for summary in self.ledger.summarize(meter, customer, start, end, 86400):
                value = round(summary["aggregated_value"])
                if value:
                    day = datetime.fromtimestamp(summary["start_time"], timezone.utc).date()
                    found[(customer, day)] = value
        return found, unknown

    def usage_between(self, meter_id: str, customer: str, start: int, end: int) -> int | None:
        """A customer's figure over ``[start, end)``; ``None`` for an unknown customer."""
        if not self.ledger.customer_known(customer):
            return None
        summaries = self.ledger.summarize(self.ledger.meters[meter_id], customer, start, end, None)
        return sum(round(s["aggregated_value"]) for s in summaries)

    def create_meter_event(
        self,
        event: MeterEvent,
        *,
        customer_payload_key: str,
        value_payload_key: str,
        retry: bool = True,
        idempotency_key: str | None = None,
    ) -> Any:
        """``POST /v1/billing/meter_events``, with Stripe's answers as the core's kinds of failure.

        Under an ``idempotency_key`` seen before, the first answer comes back (Stripe's replay).
        """
        self.requests["v1_meter_event"] += 1
        if idempotency_key is not None:
            with self._lock:
                seen = self._idempotent.get(idempotency_key)
            if seen is not None:
                self.requests["idempotent_replays"] = self.requests.get("idempotent_replays", 0) + 1
                answer, error = seen
                if error is not None:
                    raise error
                return answer

        def record() -> Any:
            try:
                recorded = self.ledger.record(
                    event_name=event.event_name,
                    payload={customer_payload_key: event.customer_id, value_payload_key: str(event.value)},
                    identifier=event.identifier,
                    timestamp=event.timestamp,
                    api="v1",
                )
                assert recorded is not None  # v1 records synchronously
                answer = recorded.as_v1()
            except StripeApiError as err:
                details = {**err.body()["error"], "http_status": err.status}
                kind = Duplicate if "already exists" in err.message else Rejected
                error = kind(err.message, details)
                if idempotency_key is not None:
                    with self._lock:
                        self._idempotent[idempotency_key] = (None, error)
                raise error from err
            if idempotency_key is not None:
                with self._lock:
                    self._idempotent[idempotency_key] = (answer, None)
            return answer

        return self.accept(record)

    def customers_known(self, customers: Sequence[str], *, max_rps: float) -> set[str]:
        """Which of ``customers`` Stripe knows, one ``GET /v1/customers/{id}`` each."""
        self.requests["customers"] += len(customers)
        known = {c for c in customers if self.ledger.customer_known(c)}
        for customer in known:
            self.ledger.customer_created(customer)  # met: listed from now on
        return known

    def customer_ids(self) -> set[str]:
        """Every customer ``GET /v1/customers`` lists (one request per 100)."""
        listed = self.ledger.customer_list()
        self.requests["customers"] += max(1, -(-len(listed) // 100))
        return set(listed)

    def meter_event_stream(self) -> _Stream:
        """A v2 meter event session (duplicates and bad events dropped without a word, as Stripe does)."""
        return _Stream(self)

    def cancel_meter_event(self, event_name: str, identifier: str) -> Any:
        """Cancel an event by identifier, within 24 hours of Stripe receiving it."""
        try:
            return self.ledger.cancel(event_name, identifier).as_v1()
        except StripeApiError as err:
            raise Rejected(err.message, {**err.body()["error"], "http_status": err.status}) from err
