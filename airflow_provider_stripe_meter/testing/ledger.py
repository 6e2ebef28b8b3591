"""What the local Stripe server holds: meters, customers, accepted events, sessions.

Follows Stripe's documented rules for meter events (https://docs.stripe.com/api/billing/meter-event
and the OpenAPI spec shipped beside this module): synchronous checks on shape, value, identifier
and timestamp; an unknown customer or event name is *accepted* and reported asynchronously, and
its usage never shows in summaries.
Everything is guarded by one lock, so the HTTP server's threads can share it.
"""

from __future__ import annotations

import itertools
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

PAST_WINDOW_SECONDS = 35 * 86400
FUTURE_TOLERANCE_SECONDS = 300
ADJUSTMENT_WINDOW_SECONDS = 86400
SESSION_TTL_SECONDS = 900
_WHOLE_NUMBER = re.compile(r"-?\d{1,15}")


class StripeApiError(Exception):
    """An error answer: HTTP status plus Stripe's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.should_retry = should_retry

    def body(self) -> dict[str, Any]:
        """Stripe's v1 error body."""
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code:
            error["code"] = self.code
        if self.param:
            error["param"] = self.param
        return {"error": error}


@dataclass
class RecordedEvent:
    """One event the server accepted."""

    event_name: str
    payload: dict[str, str]
    identifier: str
    timestamp: int
    created: int
    received_at: float
    api: str
    cancelled: bool = False
    #: Accepted (200) but dropped by Stripe's asynchronous validation: the meter was inactive.
    dropped: bool = False

    @property
    def customer_id(self) -> str | None:
        """The customer the payload names (under the meter's or the default key)."""
        return self.payload.get("stripe_customer_id")

    def as_v1(self) -> dict[str, Any]:
        """The ``billing.meter_event`` object."""
        return {
            "object": "billing.meter_event",
            "created": self.created,
            "event_name": self.event_name,
            "identifier": self.identifier,
            "livemode": False,
            "payload": dict(self.payload),
            "timestamp": self.timestamp,
        }


@dataclass
class Meter:
    """A billing meter."""

    id: str
    event_name: str
    display_name: str
    formula: str = "sum"
    customer_key: str = "stripe_customer_id"
    value_key: str = "value"
    status: str = "active"
    created: int = field(default_factory=lambda: int(time.time()))
    #: ``None`` (raw: every event counts), ``"day"`` or ``"hour"`` (pre-aggregated: only the
    #: most recent event of each window counts).
    event_time_window: str | None = None
    deactivated_at: int | None = None

    def as_object(self) -> dict[str, Any]:
        """The ``billing.meter`` object."""
        return {
            "id": self.id,
            "object": "billing.meter",
            "created": self.created,
            "customer_mapping": {"event_payload_key": self.customer_key, "type": "by_id"},
            "default_aggregation": {"formula": self.formula},
            "display_name": self.display_name,
            "event_name": self.event_name,
            "event_time_window": self.event_time_window,
            "livemode": False,
            "status": self.status,
            "status_transitions": {"deactivated_at": self.deactivated_at},
            "updated": self.created,
            "value_settings": {"event_payload_key": self.value_key},
        }


_WINDOW_SECONDS = {"day": 86400, "hour": 3600}


def _most_recent_per_window(events: list[RecordedEvent], seconds: int) -> list[RecordedEvent]:
    """A pre-aggregated meter keeps only the newest event of each window: a newer one overwrites."""
    kept: dict[int, RecordedEvent] = {}
    for event in events:
        window = event.timestamp // seconds
        earlier = kept.get(window)
        if earlier is None or event.received_at >= earlier.received_at:
            kept[window] = event
    return list(kept.values())


def _aggregate(meter: Meter, events: list[RecordedEvent]) -> int:
    """The meter's formula over ``events``: sum of values, number of events, or the last value."""
    if meter.formula == "count":
        return len(events)
    if meter.formula == "last":
        latest = max(events, key=lambda e: (e.timestamp, e.received_at), default=None)
        return int(latest.payload[meter.value_key]) if latest else 0
    return sum(int(e.payload[meter.value_key]) for e in events)


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def parse_rfc3339(text: str) -> int:
    """Parse a v2 timestamp; raises ``ValueError`` on anything else."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("timestamp needs an offset")
    return int(moment.timestamp())


class MeterLedger:
    """The state behind the local server, with Stripe's rules for changing it.

    :param customers: Customers Stripe knows; ``None`` means every ``cus_...`` is known.
    :param identifier_window: Seconds a used identifier is refused; ``None`` keeps it forever
        (Stripe promises at least 24 hours).
    :param summary_lag: Seconds before an accepted event counts in event summaries.
    :param clock: Returns "now" in unix seconds; tests move it to cross the 24-hour and session
        limits.
    """

    def __init__(
        self,
        *,
        customers: Iterable[str] | None = None,
        identifier_window: float | None = None,
        summary_lag: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lock = threading.RLock()
        #: Seconds before an accepted event shows in summaries (Stripe's are eventually consistent).
        self.summary_lag = summary_lag
        self.clock = clock
        self.customers: set[str] | None = set(customers) if customers is not None else None
        #: Customers deleted (known before, unknown from then on), and when each customer was
        #: created, as ``GET /v1/customers`` shows them (newest first).
        self.deleted_customers: set[str] = set()
        self._customer_created: dict[str, int] = {}
        self._customer_pages: tuple[tuple[int, ...], list[str], dict[str, int]] | None = None
        self.identifier_window = identifier_window
        self.meters: dict[str, Meter] = {}
        self.events: list[RecordedEvent] = []
        #: Events by (event name, payload key, payload value): a summary request reads one
        #: customer's events, not every event (a benchmark's server must not be its bottleneck).
        self._by_payload: dict[tuple[str, str, Any], list[RecordedEvent]] = {}
        self._by_identifier: dict[str, RecordedEvent] = {}
        self.error_reports: list[dict[str, Any]] = []
        from airflow_provider_stripe_meter.testing.billing import BillingModel

        #: Prices, subscriptions and invoices: where the meter's usage turns into money.
        self.billing = BillingModel(self)
        self.sessions: dict[str, float] = {}
        self._ids = itertools.count(1)
        #: (accepted events to wait for, action): run once that many more events are accepted.
        self._after_accepted: list[tuple[int, Callable[[], None]]] = []

    # -- meters and customers -------------------------------------------------------------

    def add_meter(
        self,
        event_name: str,
        *,
        formula: str = "sum",
        display_name: str | None = None,
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
        status: str = "active",
        event_time_window: str | None = None,
    ) -> Meter:
        """Create a meter and return it (``event_time_window`` ``"day"``/``"hour"``: pre-aggregated)."""
        if formula not in ("sum", "count", "last"):
            raise ValueError(f"formula must be sum, count or last, got {formula!r}")
        if event_time_window not in (None, "day", "hour"):
            raise ValueError(f"event_time_window must be None, day or hour, got {event_time_window!r}")
        with self.lock:
            meter = Meter(
                id=f"mtr_test_{next(self._ids):06d}{secrets.token_hex(4)}",
                event_name=event_name,
                display_name=display_name or event_name,
                formula=formula,
                customer_key=customer_key,
                value_key=value_key,
                status=status,
                created=int(self.clock()),
                event_time_window=event_time_window,
            )
            self.meters[meter.id] = meter
            return meter

    def deactivate(self, event_name: str) -> Meter:
        """Deactivate the meter, as the dashboard or ``POST /v1/billing/meters/{id}/deactivate`` does.

        Stripe still answers 200 to events for it and drops them in its asynchronous validation
        (an ``archived_meter`` error report); they never count.
        """
        meter = self.meter_for(event_name)
        assert meter is not None, f"no meter {event_name!r}"
        with self.lock:
            meter.status, meter.deactivated_at = "inactive", int(self.clock())
        return meter

    def reactivate(self, event_name: str) -> Meter:
        """Make the meter active again (``deactivated_at`` keeps the last deactivation)."""
        meter = self.meter_for(event_name)
        assert meter is not None, f"no meter {event_name!r}"
        with self.lock:
            meter.status = "active"
        return meter

    def after_accepted(self, count: int, action: Callable[[], None]) -> None:
        """Run ``action`` right after the ``count``-th next accepted event (a test's instant of choice)."""
        with self.lock:
            self._after_accepted.append((len(self.events) + count, action))

    def meter_for(self, event_name: str) -> Meter | None:
        """The meter (active first) whose event name this is."""
        with self.lock:
            found = [m for m in self.meters.values() if m.event_name == event_name]
        found.sort(key=lambda m: m.status != "active")
        return found[0] if found else None

    def customer_known(self, customer_id: str | None) -> bool:
        """Whether Stripe would find this customer."""
        if not customer_id or customer_id in self.deleted_customers:
            return False
        return self.customers is None or customer_id in self.customers

    def add_customer(self, customer_id: str) -> None:
        """Create a customer (a CRM sync catching up): known from now on."""
        with self.lock:
            if self.customers is not None:
                self.customers.add(customer_id)
            self.deleted_customers.discard(customer_id)
            self._customer_created.setdefault(customer_id, int(self.clock()))

    def delete_customer(self, customer_id: str) -> None:
        """Delete a customer: retrieving it shows ``deleted: true``; its meter events are dropped."""
        with self.lock:
            self.deleted_customers.add(customer_id)

    def customer_created(self, customer_id: str) -> int:
        """When the customer was created (first met, with ``customers=None``)."""
        with self.lock:
            return self._customer_created.setdefault(customer_id, int(self.clock()))

    def customer_list(self) -> list[str]:
        """The customers ``GET /v1/customers`` shows, newest first (deleted ones are not listed).

        With ``customers=None`` every ``cus_`` id is known but no list can hold them all: the
        list shows those this Stripe has met (created with :meth:`add_customer`, retrieved,
        named in meter events or subscriptions), as an account lists the customers it made.
        """
        with self.lock:
            if self.customers is not None:
                ids = set(self.customers)
            else:
                ids = set(self._customer_created)
                for meter in self.meters.values():
                    ids |= {
                        str(value)
                        for (name, key, value) in self._by_payload
                        if name == meter.event_name and key == meter.customer_key
                    }
                ids |= {str(s.customer) for s in self.billing.subscriptions.values()}
            ids = {c for c in ids if self.customer_known(c)}
            created = self._customer_created
            for c in ids:
                created.setdefault(c, int(self.clock()))
        return sorted(ids, key=lambda c: (-created[c], c))

    def customer_page(self, starting_after: str | None, limit: int) -> tuple[list[str], bool]:
        """A page of :meth:`customer_list` after ``starting_after``, and whether more follow.

        The list is kept between pages while nothing changed (a run lists 100,000 customers in
        1,000 pages).
        """

        def mark() -> tuple[int, ...]:
            return (
                len(self.customers or ()),
                len(self.deleted_customers),
                len(self._customer_created),
                len(self.events),
                len(self.billing.subscriptions),
            )

        with self.lock:
            if self._customer_pages is None or self._customer_pages[0] != mark():
                ids = self.customer_list()
                self._customer_pages = (mark(), ids, {c: i for i, c in enumerate(ids)})
            _, ids, position = self._customer_pages
        start = 0 if not starting_after else position.get(starting_after, len(ids) - 1) + 1
        return ids[start : start + limit], start + limit < len(ids)

    # -- meter events ---------------------------------------------------------------------

    def record(
        self,
        *,
        event_name: str,
        payload: dict[str, str],
        identifier: str | None,
        timestamp: int | None,
        api: str,
        synchronous: bool = True,
    ) -> RecordedEvent | None:
        """Apply Stripe's rules and store the event.

        Synchronous endpoints raise :class:`StripeApiError`; the v2 stream validates
        asynchronously, so its bad or duplicate events are dropped (and reported) instead.
        """
        try:
            return self._record(event_name, payload, identifier, timestamp, api)
        except StripeApiError as err:
            if synchronous:
                raise
            with self.lock:
                self.error_reports.append(
                    {
                        "code": err.code or "invalid_event",
                        "message": err.message,
                        "identifier": identifier,
                        "event_name": event_name,
                        "at": self.clock(),
                    }
                )
            return None

    def _record(
        self,
        event_name: str,
        payload: dict[str, str],
        identifier: str | None,
        timestamp: int | None,
        api: str,
    ) -> RecordedEvent:
        now = self.clock()
        if not isinstance(event_name, str) or not event_name or len(event_name) > 100:
            raise StripeApiError(400, "event_name must be 1 to 100 characters.", param="event_name")
        if not isinstance(payload, dict) or not all(isinstance(v, str) for v in payload.values()):
            raise StripeApiError(400, "payload values must be strings.", param="payload")
        meter = self.meter_for(event_name)
        customer_key = meter.customer_key if meter else "stripe_customer_id"
        value_key = meter.value_key if meter else "value"
        if not payload.get(customer_key):
            raise StripeApiError(
                400,
                f"Missing required payload key `{customer_key}`.",
                code="parameter_missing",
                param=f"payload[{customer_key}]",
            )
        value = payload.get(value_key)
        if value is None:
            raise StripeApiError(
                400,
                f"Missing required payload key `{value_key}`.",
                code="parameter_missing",
                param=f"payload[{value_key}]",
            )
        if not _WHOLE_NUMBER.fullmatch(value):
            raise StripeApiError(
                400,
                f"Invalid payload value `{value}` for `{value_key}`: "
                "must be a whole number of at most 15 digits.",
                code="meter_event_invalid_value",
                param=f"payload[{value_key}]",
            )
        if identifier is not None and (not identifier or len(identifier) > 100):
            raise StripeApiError(400, "identifier must be 1 to 100 characters.", param="identifier")
        if timestamp is None:
            timestamp = int(now)
        if timestamp < now - PAST_WINDOW_SECONDS:
            raise StripeApiError(
                400,
                "The event timestamp cannot be more than 35 days in past. "
                "Use a timestamp within the past 35 days.",
                code="timestamp_too_far_in_past",
                param="timestamp",
            )
        if timestamp > now + FUTURE_TOLERANCE_SECONDS:
            raise StripeApiError(
                400,
                "The event timestamp cannot be more than 5 minutes in the future.",
                code="timestamp_in_future",
                param="timestamp",
            )
        with self.lock:
            if identifier is None:
                identifier = f"gen_{secrets.token_hex(12)}"
            earlier = self._by_identifier.get(identifier)
            if earlier is not None and (
                self.identifier_window is None or now - earlier.received_at < self.identifier_window
            ):
                raise StripeApiError(
                    400,
                    f"An event already exists with identifier {identifier}.",
                    param="identifier",
                    should_retry=False,
                )
            event = RecordedEvent(
                event_name=event_name,
                payload=dict(payload),
                identifier=identifier,
                timestamp=timestamp,
                created=int(now),
                received_at=now,
                api=api,
            )
            self.events.append(event)
            for key, value in event.payload.items():
                if isinstance(value, str):
                    self._by_payload.setdefault((event.event_name, key, value), []).append(event)
            self._by_identifier[identifier] = event
            # Stripe accepts these and reports them later, as error reports.
            if meter is None:
                self._report("no_meter", event, f"No active meter was found for event_name '{event_name}'.")
            elif meter.status != "active":
                event.dropped = True
                self._report("archived_meter", event, f"The meter for event_name '{event_name}' is inactive.")
            if not self.customer_known(payload.get(customer_key)):
                # Validated when received: the event never counts, even once the customer exists.
                event.dropped = True
                self._report(
                    "meter_event_customer_not_found",
                    event,
                    f"No such customer: '{payload.get(customer_key)}'",
                    customer=payload.get(customer_key),
                )
            due = [action for at, action in self._after_accepted if at == len(self.events)]
            self._after_accepted = [(at, a) for at, a in self._after_accepted if at != len(self.events)]
        for action in due:
            action()
        return event

    def aggregate(self, meter: Meter, events: list[RecordedEvent]) -> int:
        """The meter's formula over ``events`` (what an invoice line bills for them)."""
        return _aggregate(meter, events)

    def _report(self, code: str, event: RecordedEvent, message: str, **extra: Any) -> None:
        """Note a dropped event for Stripe's asynchronous validation report of its meter."""
        self.error_reports.append(
            {
                "code": code,
                "identifier": event.identifier,
                "event_name": event.event_name,
                "message": message,
                "at": event.received_at,
                **extra,
            }
        )

    def error_report_events(self, *, window: int = 60, samples: int = 5) -> list[dict[str, Any]]:
        """Stripe's ``v1.billing.meter.error_report_triggered`` events, newest first.

        One event per meter and validation window (``window`` seconds of receipt time) that
        dropped something: the error count, and per code its count and up to ``samples``
        sample errors (message and the event's identifier), as Stripe lists them in
        ``GET /v2/core/events``. Events of an unknown event name have no meter to report on.
        """
        with self.lock:
            reports = list(self.error_reports)
        windows: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for report in reports:
            meter = self.meter_for(str(report.get("event_name") or ""))
            if meter is None or "at" not in report:
                continue
            start = int(report["at"]) // window * window
            windows.setdefault((meter.id, start), []).append(report)
        events = []
        for (meter_id, start), found in windows.items():
            codes: dict[str, list[dict[str, Any]]] = {}
            for report in found:
                codes.setdefault(report["code"], []).append(report)
            events.append(
                {
                    "id": f"evt_test_{meter_id[-8:]}{start}",
                    "object": "v2.core.event",
                    "type": "v1.billing.meter.error_report_triggered",
                    "created": _rfc3339(start + window),
                    "livemode": False,
                    "context": None,
                    "related_object": {
                        "id": meter_id,
                        "type": "billing.meter",
                        "url": f"/v1/billing/meters/{meter_id}",
                    },
                    "reason": None,
                    "data": {
                        "developer_message_summary": f"{len(found)} meter events were dropped",
                        "validation_start": _rfc3339(start),
                        "validation_end": _rfc3339(start + window),
                        "reason": {
                            "error_count": len(found),
                            "error_types": [
                                {
                                    "code": code,
                                    "error_count": len(items),
                                    "sample_errors": [
                                        {
                                            "error_message": item["message"],
                                            "request": {"identifier": item["identifier"]},
                                        }
                                        for item in items[:samples]
                                    ],
                                }
                                for code, items in sorted(codes.items())
                            ],
                        },
                    },
                }
            )
        return sorted(events, key=lambda e: e["created"], reverse=True)

    def cancel(self, event_name: str, identifier: str) -> RecordedEvent:
        """Cancel an event by identifier, within 24 hours of receiving it."""
        with self.lock:
            event = self._by_identifier.get(identifier)
            if event is None or event.event_name != event_name:
                raise StripeApiError(
                    400,
                    f"No meter event with identifier {identifier} for event_name {event_name}.",
                    code="resource_missing",
                    param="cancel[identifier]",
                )
            if self.clock() - event.received_at > ADJUSTMENT_WINDOW_SECONDS:
                raise StripeApiError(
                    400,
                    f"The meter event with identifier {identifier} can no longer be cancelled: "
                    "events can only be cancelled within 24 hours of Stripe receiving them.",
                    code="meter_event_adjustment_window_expired",
                    param="cancel[identifier]",
                )
            event.cancelled = True
            return event

    # -- summaries ------------------------------------------------------------------------

    def summarize(
        self, meter: Meter, customer_id: str, start: int, end: int, window: int | None
    ) -> list[dict[str, Any]]:
        """Aggregate a meter's usage for one customer per window in [start, end)."""
        visible_before = self.clock() - self.summary_lag
        with self.lock:
            if not self.customer_known(customer_id) or meter.status != "active":
                relevant: list[RecordedEvent] = []
            else:
                relevant = [
                    e
                    for e in self._by_payload.get((meter.event_name, meter.customer_key, customer_id), [])
                    if not e.cancelled
                    and not e.dropped
                    and e.received_at <= visible_before
                    and e.event_name == meter.event_name
                    and e.payload.get(meter.customer_key) == customer_id
                    and start <= e.timestamp < end
                ]
        if meter.event_time_window is not None:
            relevant = _most_recent_per_window(relevant, _WINDOW_SECONDS[meter.event_time_window])
        step = window or (end - start)
        summaries = []
        for lo in range(start, end, step):
            hi = min(lo + step, end)
            inside = [e for e in relevant if lo <= e.timestamp < hi]
            summaries.append(
                {
                    "id": f"mtrusg_{meter.id[-8:]}_{customer_id[-8:]}_{lo}",
                    "object": "billing.meter_event_summary",
                    "aggregated_value": float(_aggregate(meter, inside)),
                    "end_time": hi,
                    "livemode": False,
                    "meter": meter.id,
                    "start_time": lo,
                }
            )
        return summaries

    # -- v2 sessions ----------------------------------------------------------------------

    def open_session(self, ttl: float = SESSION_TTL_SECONDS) -> tuple[str, float, float]:
        """Create a meter event session; returns (token, created, expires_at)."""
        now = self.clock()
        token = f"mes_test_{secrets.token_hex(16)}"
        with self.lock:
            self.sessions[token] = now + ttl
        return token, now, now + ttl

    def session_state(self, token: str) -> str:
        """``valid``, ``expired`` or ``unknown``."""
        with self.lock:
            expires = self.sessions.get(token)
        if expires is None:
            return "unknown"
        return "valid" if self.clock() < expires else "expired"

    # -- what tests look at ---------------------------------------------------------------

    def accepted(self, event_name: str | None = None) -> list[RecordedEvent]:
        """Events accepted and not cancelled, optionally for one event name."""
        with self.lock:
            return [
                e
                for e in self.events
                if not e.cancelled and not e.dropped and (event_name is None or e.event_name == event_name)
            ]

    def figures(self, event_name: str) -> dict[tuple[str, str], int]:
        """What Stripe bills per (customer, UTC day ISO) for a meter, by its formula and window.

        Unlike :meth:`summarize` this ignores ``summary_lag``: it is the settled truth tests
        compare the source with.
        """
        meter = self.meter_for(event_name)
        assert meter is not None, f"no meter {event_name!r}"
        by_key: dict[tuple[str, str], list[RecordedEvent]] = {}
        for event in self.accepted(event_name):
            customer = event.payload.get(meter.customer_key, "")
            day = datetime.fromtimestamp(event.timestamp, timezone.utc).date().isoformat()
            by_key.setdefault((customer, day), []).append(event)
        out = {}
        for key, events in by_key.items():
            if meter.event_time_window is not None:
                events = _most_recent_per_window(events, _WINDOW_SECONDS[meter.event_time_window])
            out[key] = _aggregate(meter, events)
        return out

    def totals(self, event_name: str | None = None) -> dict[str, int]:
        """Sum of values per customer over accepted, uncancelled events."""
        out: dict[str, int] = {}
        for event in self.accepted(event_name):
            meter = self.meter_for(event.event_name)
            customer_key = meter.customer_key if meter else "stripe_customer_id"
            value_key = meter.value_key if meter else "value"
            customer = event.payload.get(customer_key, "")
            out[customer] = out.get(customer, 0) + int(event.payload[value_key])
        return out
