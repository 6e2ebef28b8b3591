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

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.billing.meters import COUNT, SET, MeterSpec, source_figure
from airflow_provider_stripe_meter.billing.outcomes import Action, DayOutcome
from airflow_provider_stripe_meter.utils.identifiers import bounded_identifier, daily_identifier
from airflow_provider_stripe_meter.utils.rules import SECONDS_PER_DAY, MeterEvent

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate

Key = tuple[str, str, date]
#: Reason of a ``report`` plan for a customer Stripe does not know.
CUSTOMER_UNKNOWN = "customer_unknown"


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
    #: The ledger's sequence number of the event in its customer-day (0: not a ledger plan).
    seq: int = 0
    #: The latest source row the event was planned from (ledger plans).
    source_at: int = 0

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
    action: Action
    reason: str = ""
    events: list[PlannedEvent] = field(default_factory=list)
    #: Events to cancel (a ``count`` day with fewer rows than the ledger's events).
    cancel: int = 0

    @property
    def key(self) -> tuple[str, str, date]:
        """(event name, customer, day)."""
        return (self.event_name, self.customer_id, self.day)

    @property
    def reported(self) -> DayOutcome:
        """The outcome of a day planned as ``report``: the customer is unknown, or Stripe holds more."""
        return DayOutcome.CUSTOMER_UNKNOWN if self.reason == CUSTOMER_UNKNOWN else DayOutcome.OVER

    def line(self) -> dict[str, Any]:
        """JSON-safe summary for XCom (what a dry run reports)."""
        return {
            "event_name": self.event_name,
            "customer_id": self.customer_id,
            "day": self.day.isoformat(),
            "expected": self.expected,
            "recorded": self.recorded,
            "action": self.action.value,
            "reason": self.reason,
            "events": len(self.events),
            "value_sent": sum(e.value for e in self.events) if self.events else 0,
            **({"cancel": self.cancel} if self.cancel else {}),
        }


def plan_late(aggregate: DailyAggregate, billed: int, *, prefix: str, at: int) -> DayPlan:
    """Plan usage of a day older than Stripe's window, billed at ``at`` (the oldest instant it takes).

    Only ``sum`` meters (raw): elsewhere a late event would change another day's count or last
    value. ``billed`` is what was billed late for this day before; the identifier keeps the
    original day and names that base, so a repeat is refused.
    """
    expected = aggregate.value
    plan = DayPlan(
        aggregate.event_name, aggregate.customer_id, aggregate.day, expected, billed, Action.LEAVE_ALONE
    )
    if expected == billed:
        plan.reason = "billed late before"
        return plan
    if expected < billed:
        plan.action, plan.reason = Action.REPORT, "over: more was billed late than the source now holds"
        return plan
    plan.action = Action.TOP_UP if billed else Action.SEND
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
        aggregate.event_name, aggregate.customer_id, aggregate.day, expected, recorded, Action.LEAVE_ALONE
    )
    if customer_unknown:
        plan.action, plan.reason = Action.REPORT, CUSTOMER_UNKNOWN
        return plan
    base = recorded or 0
    if expected == base:
        plan.reason = "recorded" if recorded is not None else "nothing to send"
        return plan
    if expected < base and spec.formula == "last":
        # A lower latest value (fewer seats) is the usage now, not an over-billing: send it.
        plan.action, plan.reason = Action.TOP_UP, "new latest value"
    elif expected < base:
        if not correct_over or spec.kind == COUNT:
            plan.action = Action.REPORT
            plan.reason = (
                "over: a count cannot be lowered by an event (cancel within 24 hours, or credit)"
                if spec.kind == COUNT
                else "over: Stripe holds more than the source (correct_over=True sends the correction)"
            )
            return plan
        plan.action, plan.reason = Action.CORRECT, "over"
    else:
        plan.action = Action.TOP_UP if base else Action.SEND
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
