"""What to send so that Stripe's figure for each (meter, customer, UTC day) equals the source's.

Plain Python (no Airflow, no ``stripe``). Stripe computes a day's figure with the meter's own
formula and event time window; the source's figure is computed the same way from its rows
(:func:`source_figure`). Each meter falls in one of three kinds (:attr:`MeterSpec.kind`):

* ``add``: a raw ``sum`` meter adds every event. A day is sent once in full, under the day's own
  identifier; what changes later (late rows) is sent as the difference from what Stripe's
  summaries show (``recorded``), under an identifier that names that base (``...:from<R>``).
  Two senders that read the same stale base derive the same identifier, so Stripe refuses the
  second: a difference can only be sent once per base.
* ``count``: a raw ``count`` meter counts events, so a day of N rows is N events numbered
  ``#1..#N``; rows that arrive late become events ``#N+1...``. Event k always has the same
  identifier, so any re-send is refused.
* ``set``: the newest event decides (a ``last`` meter, or a pre-aggregated meter with a ``day``
  or ``hour`` event time window, where Stripe keeps only the most recent event of each window).
  The day's figure is sent whole, stamped with the last second of the day (or now, for today),
  so it is the newest event of its day; re-sending it changes nothing.

A meter the operator cannot bill exactly (``count`` on a pre-aggregated meter, which keeps one
event a window; ``sum`` on an ``hour`` window, which would need hourly totals) is refused
(:func:`meter_spec`).

.. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/meters/configure
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.utils.identifiers import bounded_identifier, daily_identifier
from airflow_provider_stripe_meter.utils.rules import SECONDS_PER_DAY, MeterEvent

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate

ADD, COUNT, SET = "add", "count", "set"

#: What a real run does with one customer-day.
SEND = "send"  # nothing recorded yet: send the day
TOP_UP = "top_up"  # Stripe shows less than the source: send the difference (or the new figure)
LEAVE_ALONE = "leave_alone"  # Stripe shows the source's figure already
CORRECT = "correct"  # Stripe shows more and correct_over asks to bring it down
REPORT = "report"  # Stripe shows more (not corrected), or does not know the customer
ACTIONS = (SEND, TOP_UP, LEAVE_ALONE, CORRECT, REPORT)


class MeterUnsupportedError(ValueError):
    """The meter's settings cannot be billed exactly from daily aggregates."""


@dataclass(frozen=True)
class MeterSpec:
    """What the batch operator needs to know of a Stripe meter."""

    event_name: str
    meter_id: str
    formula: str = "sum"
    event_time_window: str | None = None
    customer_key: str = "stripe_customer_id"
    value_key: str = "value"

    @property
    def payload_keys(self) -> dict[str, str]:
        """The hook's payload key arguments for this meter."""
        return {"customer_payload_key": self.customer_key, "value_payload_key": self.value_key}

    @property
    def kind(self) -> str:
        """``add``, ``count`` or ``set``: how Stripe turns events into the day's figure."""
        if self.event_time_window is not None or self.formula == "last":
            return SET
        return COUNT if self.formula == "count" else ADD


def meter_spec(
    meter: Mapping[str, Any], *, customer_key: str | None = None, value_key: str | None = None
) -> MeterSpec:
    """Read a ``billing.meter`` object; refuse settings that cannot be billed exactly.

    :raises MeterUnsupportedError: names the meter, the setting and what to do instead.
    """
    formula = (meter.get("default_aggregation") or {}).get("formula") or "sum"
    window = meter.get("event_time_window") or None
    name, meter_id = meter["event_name"], meter["id"]
    if formula not in ("sum", "count", "last"):
        raise MeterUnsupportedError(
            f"meter {meter_id} ({name!r}) aggregates by {formula!r}: only sum, count and last are known"
        )
    if window not in (None, "day", "hour"):
        raise MeterUnsupportedError(f"meter {meter_id} ({name!r}) has event_time_window {window!r}")
    if formula == "count" and window is not None:
        raise MeterUnsupportedError(
            f"meter {meter_id} ({name!r}) counts events but is pre-aggregated (event_time_window="
            f"{window!r}): Stripe keeps one event per {window}, so a count of rows cannot be billed. "
            "Use a raw count meter, or a sum meter with the rows counted in SQL."
        )
    if formula == "sum" and window == "hour":
        raise MeterUnsupportedError(
            f"meter {meter_id} ({name!r}) sums pre-aggregated hourly windows (event_time_window='hour'): "
            "Stripe keeps the newest event of each hour, so a daily total sent again in another hour "
            "would count twice. Use a raw sum meter or a day-window meter."
        )
    return MeterSpec(
        event_name=name,
        meter_id=meter_id,
        formula=formula,
        event_time_window=window,
        customer_key=customer_key
        or (meter.get("customer_mapping") or {}).get("event_payload_key")
        or "stripe_customer_id",
        value_key=value_key or (meter.get("value_settings") or {}).get("event_payload_key") or "value",
    )


def source_figure(aggregate: DailyAggregate, spec: MeterSpec) -> int:
    """The day's figure as the meter computes it: the sum, the number of rows, or the latest value."""
    if spec.formula == "count":
        return aggregate.rows
    if spec.formula == "last":
        return aggregate.last_value
    return aggregate.value


@dataclass(frozen=True)
class PlannedEvent:
    """One meter event to send."""

    event_name: str
    customer_id: str
    day: date
    value: int
    identifier: str
    timestamp: int
    #: Planned without looking at Stripe (a fresh day never marked as sent, so nothing of ours
    #: is there). Only such events may go through the v2 stream, which drops duplicates without
    #: a word; any other needs Stripe's synchronous duplicate answer.
    blind: bool = True

    @property
    def key(self) -> tuple[str, str, date]:
        """(event name, customer, day): the customer-day this event belongs to."""
        return (self.event_name, self.customer_id, self.day)

    def as_meter_event(self) -> MeterEvent:
        """The event as the hook sends it."""
        return MeterEvent(self.event_name, self.customer_id, self.value, self.identifier, self.timestamp)

    def describe(self) -> dict[str, Any]:
        """JSON-safe form, for samples."""
        return {
            "event_name": self.event_name,
            "customer_id": self.customer_id,
            "day": self.day.isoformat(),
            "value": self.value,
            "identifier": self.identifier,
        }


@dataclass
class DayPlan:
    """What a run does with one customer-day, and why."""

    event_name: str
    customer_id: str
    day: date
    expected: int
    #: Stripe's figure when it was looked at; ``None`` when the day was not looked up (a day
    #: that ended within the identifier window and was never marked as sent: nothing is there).
    recorded: int | None
    action: str
    reason: str = ""
    events: list[PlannedEvent] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, date]:
        """(event name, customer, day)."""
        return (self.event_name, self.customer_id, self.day)

    def line(self) -> dict[str, Any]:
        """JSON-safe summary for XCom (what a dry run reports)."""
        return {
            "event_name": self.event_name,
            "customer_id": self.customer_id,
            "day": self.day.isoformat(),
            "expected": self.expected,
            "recorded": self.recorded,
            "action": self.action,
            "reason": self.reason,
            "events": len(self.events),
            "value_sent": sum(e.value for e in self.events) if self.events else 0,
        }


def plan_late(aggregate: DailyAggregate, billed: int, *, prefix: str, at: int) -> DayPlan:
    """Plan usage of a day older than Stripe's window, billed at ``at`` (the oldest instant it takes).

    Only ``sum`` meters (raw): elsewhere a late event would change another day's count or last
    value. ``billed`` is what was billed late for this day before; the identifier keeps the
    original day and names that base, so a repeat is refused.
    """
    expected = aggregate.value
    plan = DayPlan(aggregate.event_name, aggregate.customer_id, aggregate.day, expected, billed, LEAVE_ALONE)
    if expected == billed:
        plan.reason = "billed late before"
        return plan
    if expected < billed:
        plan.action, plan.reason = REPORT, "over: more was billed late than the source now holds"
        return plan
    plan.action = TOP_UP if billed else SEND
    plan.reason = (
        f"older than Stripe's 35 days: billed at {datetime.fromtimestamp(at, timezone.utc).isoformat()}"
    )
    identifier = bounded_identifier(
        prefix, aggregate.event_name, aggregate.customer_id, aggregate.day.isoformat(), f"late{billed}"
    )
    plan.events = [
        PlannedEvent(
            aggregate.event_name,
            aggregate.customer_id,
            aggregate.day,
            expected - billed,
            identifier,
            at,
            False,
        )
    ]
    return plan


def day_end(day: date) -> int:
    """Unix seconds of the first second after ``day`` (UTC)."""
    return int(datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()) + SECONDS_PER_DAY


def is_fresh(day: date, now: float, window: timedelta) -> bool:
    """Whether every event for ``day`` sent after it ended is still inside Stripe's identifier window."""
    return day_end(day) > now - window.total_seconds()


def plan_day(
    aggregate: DailyAggregate,
    spec: MeterSpec,
    recorded: int | None,
    *,
    prefix: str,
    now: int,
    correct_over: bool = False,
    customer_unknown: bool = False,
    version: int = 0,
) -> DayPlan:
    """Decide what to send for one customer-day, given what Stripe shows (``None``: not looked).

    ``version`` is how many runs have sent to this day before (the day's journal): it goes into
    the identifiers of sum differences and new figures, so a figure that returns to an earlier
    value (5 -> 3 -> 5 -> 3 seats) gets a new identifier, while a retry or a concurrent run that
    saw the same figure in the same version derives the same one and Stripe refuses the copy.
    """
    expected = source_figure(aggregate, spec)
    plan = DayPlan(
        aggregate.event_name, aggregate.customer_id, aggregate.day, expected, recorded, LEAVE_ALONE
    )
    if customer_unknown:
        plan.action, plan.reason = REPORT, "customer_unknown"
        return plan
    base = recorded or 0
    if expected == base:
        plan.reason = "recorded" if recorded is not None else "nothing to send"
        return plan
    if expected < base and spec.formula == "last":
        # A lower latest value (fewer seats) is the usage now, not an over-billing: send it.
        plan.action, plan.reason = TOP_UP, "new latest value"
    elif expected < base:
        if not correct_over or spec.kind == COUNT:
            plan.action = REPORT
            plan.reason = (
                "over: a count cannot be lowered by an event (cancel within 24 hours, or credit)"
                if spec.kind == COUNT
                else "over: Stripe holds more than the source (correct_over=True sends the correction)"
            )
            return plan
        plan.action, plan.reason = CORRECT, "over"
    else:
        plan.action = TOP_UP if base else SEND
        plan.reason = "late rows" if base else ("new day" if recorded is None else "missing")
    plan.events = _events(
        aggregate, spec, expected, base, prefix=prefix, now=now, blind=recorded is None, version=version
    )
    return plan


def _events(
    aggregate: DailyAggregate,
    spec: MeterSpec,
    expected: int,
    base: int,
    *,
    prefix: str,
    now: int,
    blind: bool,
    version: int = 0,
) -> list[PlannedEvent]:
    name, customer, day = aggregate.event_name, aggregate.customer_id, aggregate.day
    iso = day.isoformat()
    # Version 0 (nothing of ours sent to the day yet) keeps the plain identifiers.
    tail = (f"v{version}",) if version else ()

    def event(value: int, identifier: str, timestamp: int) -> PlannedEvent:
        return PlannedEvent(name, customer, day, value, identifier, timestamp, blind)

    if spec.kind == SET:
        # The last second of the day (now, for today) makes this the day's newest event. The
        # identifier names the figure and the base it replaces, so a re-send is refused.
        stamp = min(day_end(day) - 1, now)
        return [
            event(
                expected,
                bounded_identifier(prefix, name, customer, iso, f"set{expected}from{base}", *tail),
                stamp,
            )
        ]
    if spec.kind == COUNT:
        return [
            event(1, bounded_identifier(prefix, name, customer, iso, f"n{k}"), aggregate.timestamp)
            for k in range(base + 1, expected + 1)
        ]
    if base == 0 and not version:
        return [event(expected, daily_identifier(name, customer, day, prefix), aggregate.timestamp)]
    return [
        event(
            expected - base,
            bounded_identifier(prefix, name, customer, iso, f"from{base}", *tail),
            aggregate.timestamp,
        )
    ]
