"""What to send so that Stripe's figure for each customer-day equals the source's, from the ledger.

Plain Python. A plan is the source's figure minus what the ledger says Stripe holds of our events
(:class:`~airflow_provider_stripe_meter.ledger.entries.DayFigure`), by the meter's kind
(:attr:`MeterSpec.kind`): ``add`` sends the difference (negative when the source went down, as
Stripe documents lowering usage), ``count`` one event per new row or cancels the newest events,
``set`` the figure itself whenever it differs, 0 included, stamped at its snapshot's time. An
older view of a day changes nothing, and a day that began before the oldest instant Stripe
accepts is never lowered. Each event takes the customer-day's next sequence number, named in its
identifier: Stripe refuses a second copy while it remembers the identifier, and the ledger's key
a second run's plan for the same number, forever. What each kind is sent, and why:
docs/guarantees.md.

.. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from airflow_provider_stripe_meter.billing.meters import ADD, COUNT, MeterSpec, source_figure
from airflow_provider_stripe_meter.billing.outcomes import Action
from airflow_provider_stripe_meter.billing.periods import BILLABLE, ENDED, FINAL, NONE, OPEN, PeriodBook
from airflow_provider_stripe_meter.ledger.entries import DayFigure, Entry
from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate, DayPart
from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY, day_end, day_start, rfc3339
from airflow_provider_stripe_meter.utils.identifiers import bounded_identifier
from airflow_provider_stripe_meter.utils.rules import MeterEvent

Key = tuple[str, str, date]


@dataclass(frozen=True, slots=True)
class PlannedEvent:
    """One meter event to send."""

    event_name: str
    customer_id: str
    day: date
    value: int
    identifier: str
    timestamp: int
    #: The ledger's sequence number of the event in its customer-day (0: not a ledger plan).
    seq: int = 0
    #: The latest source row the event was planned from (ledger plans).
    source_at: int = 0
    #: The slice of a split day it bills (its start; 0: the whole day).
    part: int = 0
    #: The end of the billing period it is stamped in (``None``: periods not read).
    period_end: int | None = None
    #: Usage carried into the open period: the end of the final period it belonged to.
    carried_from: int | None = None
    #: The try of the task that wrote the event's ledger row (:attr:`idempotency_key`).
    attempt: str = ""

    @property
    def idempotency_key(self) -> str | None:
        """The event's ``Idempotency-Key``: its identifier and the try that wrote its row."""
        return idempotency_key(self.identifier, self.attempt) if self.attempt else None

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


@dataclass(slots=True)
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
    #: Of a split day, how many to cancel in each part (start, end): a part's own newest events.
    cancel_parts: dict[tuple[int, int], int] = field(default_factory=dict)

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
            "action": self.action.value,
            "reason": self.reason,
            "events": len(self.events),
            "value_sent": sum(e.value for e in self.events) if self.events else 0,
            **({"cancel": self.cancel} if self.cancel else {}),
        }


def idempotency_key(identifier: str, attempt: str) -> str:
    """``identifier/<digest of the try>``: at most 141 characters (Stripe takes up to 255), however
    long the DAG and task ids that name the try."""
    return f"{identifier}/{hashlib.sha256(attempt.encode()).hexdigest()[:40]}"


#: Reasons a day is left as it is although the figures differ.
OLDER_VIEW = "older view: the ledger billed this day from a later source row"
PARTIAL_DAY = "partly older than Stripe's 35 days: the source no longer shows all of this day"
UNSETTLED = "unsettled: an earlier run's event for this day could not be settled yet"


def ledger_identifier(spec: MeterSpec, customer_id: str, day: date, seq: int) -> str:
    """The identifier of a customer-day's ``seq``-th event on a meter (readable, at most 100 chars)."""
    return bounded_identifier("sm", spec.event_name, customer_id, day.isoformat(), str(seq), spec.meter_id)


def ledger_recorded(spec: MeterSpec, figure: DayFigure) -> int:
    """What Stripe bills for the day from the ledger's events, by the meter's formula."""
    if spec.kind == ADD:
        return figure.total
    if spec.kind == COUNT:
        return figure.events
    if figure.empty:
        return 0
    # A raw last meter bills the latest timestamp; a pre-aggregated one the newest event sent.
    value = figure.newest if spec.event_time_window is None else figure.newest_sent
    return value or 0


def plan_day(
    aggregate: DailyAggregate,
    spec: MeterSpec,
    figure: DayFigure | None,
    *,
    now: int,
    oldest: int,
    within: tuple[int, int] | None = None,
    period_end: int | None = None,
    truth: bool = False,
) -> DayPlan:
    """Plan one customer-day from the source's aggregate and the ledger's figure.

    :param now: Unix seconds; no event is stamped later.
    :param oldest: The oldest instant Stripe accepts; no event is stamped earlier (usage of an
        older day, billed late, lands there), and a day that began before it is partial.
    :param within: The stamps the events may carry (part of the day in a billing period).
    :param period_end: The end of the billing period the events are stamped in
        (:func:`plan_in_periods`).
    :param truth: The run's coverage holds the day past what the ledger billed it from
        (:mod:`.coverage`): the source is the truth even where its newest row is older (a
        deleted row is a correction, not a stale view).
    """
    figure = figure or DayFigure()
    kind = spec.kind
    expected = source_figure(aggregate, spec)
    recorded = ledger_recorded(spec, figure)
    plan = DayPlan(
        aggregate.event_name, aggregate.customer_id, aggregate.day, expected, recorded, Action.LEAVE_ALONE
    )
    if figure.open:
        plan.reason = UNSETTLED  # left alone; the run counts the day as failed
        return plan
    # A set meter's empty day is sent even at 0: otherwise the previous day's value stands.
    if expected == recorded and (kind in (ADD, COUNT) or figure.events):
        plan.reason = "recorded" if not figure.empty else "nothing to send"
        return plan
    if aggregate.timestamp < figure.source_at and not truth:
        plan.reason = OLDER_VIEW
        return plan
    partial = day_start(aggregate.day) < oldest
    if expected < recorded and partial and kind in (ADD, COUNT):
        plan.reason = PARTIAL_DAY
        return plan
    stamp = min(max(aggregate.timestamp, oldest), now)
    seq = figure.max_seq
    lo, hi = within if within is not None else (stamp, stamp)

    def event(value: int, at: int) -> PlannedEvent:
        nonlocal seq
        seq += 1
        return PlannedEvent(
            aggregate.event_name,
            aggregate.customer_id,
            aggregate.day,
            value,
            ledger_identifier(spec, aggregate.customer_id, aggregate.day, seq),
            min(max(at, lo), hi) if within is not None else at,
            seq,
            aggregate.timestamp,
            0,
            period_end,
        )

    if kind == ADD:
        diff = expected - recorded
        plan.action = Action.CORRECT if diff < 0 else Action.SEND if figure.empty else Action.TOP_UP
        plan.reason = "source went down" if diff < 0 else "new day" if figure.empty else "late rows"
        plan.events = [event(diff, stamp)]
    elif kind == COUNT:
        diff = expected - recorded
        if diff < 0:
            # The run cancels the newest events it may still cancel (see the run's corrections).
            plan.action, plan.reason, plan.cancel = Action.CORRECT, "fewer rows than events", -diff
            return plan
        plan.action = Action.SEND if figure.empty else Action.TOP_UP
        plan.reason = "new day" if figure.empty else "late rows"
        plan.events = [event(1, stamp) for _ in range(diff)]
    else:
        if not figure.empty and stamp <= figure.newest_stamp:
            # Same snapshot time with another figure (a row corrected in place): one second later,
            # inside the day, so the new figure is the newest.
            stamp = min(figure.newest_stamp + 1, day_end(aggregate.day) - 1, now)
        plan.action = Action.SEND if figure.empty else Action.TOP_UP
        plan.reason = "new day" if figure.empty else "new figure"
        plan.events = [event(expected, stamp)]
    return plan


#: What becomes of usage no open invoice will carry (the result's keys of the same names).
INVOICE_FINAL = "invoice_final"
SUBSCRIPTION_ENDED = "subscription_ended"
NO_INVOICE = "no_invoice"
HELD_BECAUSE = {FINAL: INVOICE_FINAL, ENDED: SUBSCRIPTION_ENDED, NONE: NO_INVOICE}
#: Usage of a customer Stripe does not know (yet): Stripe would take its events and drop them.
CUSTOMER_UNKNOWN = "customer_unknown"
UNKNOWN_CUSTOMER = "held: Stripe does not know the customer yet; the first run after it exists sends it"


@dataclass(frozen=True, slots=True)
class Held:
    """Usage of one part of a customer-day that no open invoice will carry: not sent."""

    outcome: str
    value: int
    start: int
    end: int
    #: The period it belongs to, when it had one (``invoice_final``).
    period_end: int | None = None
    #: Why, in words, where the outcome does not say it all (``customer_unknown``).
    reason: str = ""

    def describe(self, plan: DayPlan) -> dict[str, Any]:
        """JSON-safe sample."""
        return {
            "event_name": plan.event_name,
            "customer_id": plan.customer_id,
            "day": plan.day.isoformat(),
            "from": rfc3339(self.start),
            "to": rfc3339(self.end),
            "value": self.value,
            **({"period_end": rfc3339(self.period_end)} if self.period_end else {}),
            **({"reason": self.reason} if self.reason else {}),
        }


def hold_unknown(plan: DayPlan) -> Held | None:
    """Hold what ``plan`` would send for a customer Stripe does not know, and say so in the plan.

    Stripe answers 200 to a meter event for an unknown customer and drops it later, so nothing is
    sent (nor written to the ledger): the first run after the customer exists plans the same
    events again. ``None`` when the plan sends nothing anyway (the ledger holds the figure, or
    an earlier event is still unsettled).

    .. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api
    """
    if not plan.events and not plan.cancel:
        return None
    value = sum(e.value for e in plan.events)
    plan.events, plan.cancel = [], 0
    plan.action, plan.reason = Action.LEAVE_ALONE, UNKNOWN_CUSTOMER
    start = day_start(plan.day)
    return Held(CUSTOMER_UNKNOWN, value, start, start + SECONDS_PER_DAY, reason=UNKNOWN_CUSTOMER)


def part_figure(entries: list[Entry], part: DayPart) -> DayFigure:
    """The ledger's figure for one part of a split day: the events planned for it (``part``), or,
    for events written before the day was split, those stamped inside it."""
    figure = DayFigure()
    for e in entries:
        mine = e.part == part.start if e.part else part.start <= e.stamp < part.end
        if mine:
            figure.add(e.seq, e.value, e.stamp, e.source_at, e.state)
    return figure


def plan_in_periods(
    aggregate: DailyAggregate,
    spec: MeterSpec,
    figure: DayFigure | None,
    entries: list[Entry] | None,
    periods: PeriodBook,
    *,
    now: int,
    oldest: int,
    carry: bool,
    truth: bool = False,
) -> tuple[DayPlan, list[Held]]:
    """Plan one customer-day part by part, each part's events stamped in the billing period its
    usage belongs to, and only while an invoice will still carry them.

    A day without a period boundary is one part. Each part is planned like a day
    (:func:`plan_day`: its source figure minus the ledger's events for it), then: in an ``open``
    or ``draft`` period the events are stamped inside the part and the period (a minute clear of
    a boundary, as Stripe's summaries are aligned to minutes); in a ``final`` one they are held,
    or with ``carry`` stamped in the customer's open period (named so in the ledger); after the
    subscription ended, or with no subscription at all, they are held.

    ``truth`` (:func:`plan_day`): a part the ledger billed that the source has no rows for any
    more is planned too, down to nothing.
    """
    day_figure = figure or DayFigure()
    if not aggregate.parts:
        return _plan_whole_day(
            aggregate, spec, day_figure, periods, now=now, oldest=oldest, carry=carry, truth=truth
        )
    return _plan_by_parts(
        aggregate, spec, day_figure, entries or [], periods, now=now, oldest=oldest, carry=carry, truth=truth
    )


def _plan_whole_day(
    aggregate: DailyAggregate,
    spec: MeterSpec,
    day_figure: DayFigure,
    periods: PeriodBook,
    *,
    now: int,
    oldest: int,
    carry: bool,
    truth: bool,
) -> tuple[DayPlan, list[Held]]:
    """:func:`plan_in_periods` of a day no period boundary splits."""
    # The common case, kept lean (a night plans every customer-day): one part, the day, in
    # an open or draft period: its events are made where they belong at once.
    start = day_start(aggregate.day)
    name, customer, moment = aggregate.event_name, aggregate.customer_id, aggregate.timestamp
    found = periods.billable(name, customer, moment, read_drafts=False)
    plan = None
    if found is None:
        # Not in an open period: whether a draft still takes it is read (the drafts listed)
        # only when there is usage to send (a re-run of billed days reads none).
        plan = plan_day(aggregate, spec, day_figure, now=now, oldest=oldest, truth=truth)
        if not plan.events:
            return plan, []
        found = periods.billable(name, customer, moment)
    if found is not None:
        # The whole day in the period: plan_day's stamps (inside the day) are inside it.
        period_start, period_end = found
        inside = period_start <= start and start + SECONDS_PER_DAY <= period_end
        within = None if inside else _inside((start, start + SECONDS_PER_DAY), found, oldest, now)
        plan = plan_day(
            aggregate,
            spec,
            day_figure,
            now=now,
            oldest=oldest,
            within=within,
            period_end=period_end,
            truth=truth,
        )
        return plan, []
    assert plan is not None
    whole = (start, start + SECONDS_PER_DAY)
    placed = _place(plan.events, whole, aggregate, periods, now=now, oldest=oldest, carry=carry)
    if isinstance(placed, Held):
        plan.events = []
        plan.action, plan.reason = Action.LEAVE_ALONE, "held: no open invoice carries it"
        return plan, [placed]
    plan.events = placed
    return plan, []


def _plan_by_parts(
    aggregate: DailyAggregate,
    spec: MeterSpec,
    day_figure: DayFigure,
    entries: list[Entry],
    periods: PeriodBook,
    *,
    now: int,
    oldest: int,
    carry: bool,
    truth: bool,
) -> tuple[DayPlan, list[Held]]:
    """:func:`plan_in_periods` of a day split at period boundaries: each part from its own rows
    in the ledger (``entries``, the day's)."""
    plan = DayPlan(
        aggregate.event_name,
        aggregate.customer_id,
        aggregate.day,
        source_figure(aggregate, spec),
        ledger_recorded(spec, day_figure),
        Action.LEAVE_ALONE,
        reason="recorded",
    )
    if day_figure.open:
        plan.reason = UNSETTLED
        return plan, []
    held: list[Held] = []
    seq = day_figure.max_seq
    planned: list[PlannedEvent] = []
    billed = {e.part for e in entries if e.part}
    parts = with_ledger_parts(aggregate, billed) if truth else aggregate.parts
    for part in parts:
        mine = part_figure(entries, part)
        mine.max_seq = seq
        piece = DailyAggregate(
            aggregate.event_name,
            aggregate.customer_id,
            aggregate.day,
            part.value,
            part.timestamp,
            part.rows,
            part.last_value,
        )
        sub = plan_day(piece, spec, mine, now=now, oldest=oldest, truth=truth)
        if sub.cancel:
            plan.cancel += sub.cancel
            plan.cancel_parts[(part.start, part.end)] = sub.cancel
            plan.action, plan.reason = Action.CORRECT, sub.reason
        if not sub.events:
            continue
        placed = _place(
            sub.events,
            (part.start, part.end),
            piece,
            periods,
            now=now,
            oldest=oldest,
            carry=carry,
            part=part.start,
        )
        if isinstance(placed, Held):
            held.append(placed)
            continue
        seq = placed[-1].seq
        planned.extend(placed)
        if plan.action == Action.LEAVE_ALONE:
            plan.action, plan.reason = sub.action, sub.reason
    plan.events = planned
    if not planned and not plan.cancel and held:
        plan.action, plan.reason = Action.LEAVE_ALONE, "held: no open invoice carries it"
    return plan, held


def plan_late_in_periods(
    aggregate: DailyAggregate,
    spec: MeterSpec,
    figure: DayFigure | None,
    periods: PeriodBook,
    *,
    now: int,
    oldest: int,
    carry: bool,
    truth: bool = False,
) -> tuple[DayPlan, list[Held]]:
    """Plan a customer-day older than Stripe's window (billed late, at ``oldest``) in the billing
    period that instant falls in: sent while that period's invoice is open or a draft, else held
    (or, with ``carry``, stamped in the customer's open period), as any other day's usage."""
    plan = plan_day(aggregate, spec, figure, now=now, oldest=oldest, truth=truth)
    if not plan.events:
        return plan, []
    stamp = plan.events[0].timestamp
    piece = DailyAggregate(
        aggregate.event_name,
        aggregate.customer_id,
        aggregate.day,
        aggregate.value,
        stamp,
        aggregate.rows,
        aggregate.last_value,
    )
    placed = _place(plan.events, (stamp, stamp + 1), piece, periods, now=now, oldest=oldest, carry=carry)
    if isinstance(placed, Held):
        plan.events = []
        plan.action, plan.reason = Action.LEAVE_ALONE, "held: no open invoice carries it"
        return plan, [placed]
    plan.events = placed
    return plan, []


def with_ledger_parts(aggregate: DailyAggregate, billed: set[int]) -> tuple[DayPart, ...]:
    """The day's parts: the source's, and, empty, those the ledger billed (``billed``: their
    starts) that the source has no rows in any more: each ends where the next begins."""
    have = {part.start for part in aggregate.parts}
    starts = billed - have
    if not starts:
        return aggregate.parts
    day_end_ = day_end(aggregate.day)
    bounds = sorted(have | starts | {day_end_})
    empty = [DayPart(s, bounds[bounds.index(s) + 1], 0, s, 0, 0) for s in starts]
    return tuple(sorted([*aggregate.parts, *empty], key=lambda p: p.start))


def _place(
    events: list[PlannedEvent],
    span: tuple[int, int],
    aggregate: DailyAggregate,
    periods: PeriodBook,
    *,
    now: int,
    oldest: int,
    carry: bool,
    part: int = 0,
) -> list[PlannedEvent] | Held:
    """``events`` of one part (``span``), stamped in their billing period; or what is held instead.

    Events keep the sequence numbers (and identifiers) they were planned with: a part's events
    are planned after the parts before it took theirs.
    """
    name, customer = aggregate.event_name, aggregate.customer_id
    span_start, span_end = span
    carried_from = None
    # Open or draft, by the lean look-up (a night has thousands of split days); else the state.
    found = periods.billable(name, customer, aggregate.timestamp)
    state, period = (OPEN, None) if found is not None else periods.state(name, customer, aggregate.timestamp)
    if found is None and state in BILLABLE and period is not None:
        found = (period.start, period.end)
    if found is not None:
        lo, hi = _inside(span, found, oldest, now)
        _, period_end = found
    elif state == FINAL and carry and (open_ := periods.open_period(name, customer)) is not None:
        lo = hi = min(max(now, open_.start), open_.end - 1)
        period_end, carried_from = open_.end, period.end if period else None
    else:
        return Held(
            HELD_BECAUSE[state],
            sum(e.value for e in events),
            span_start,
            span_end,
            period.end if period else None,
        )
    return [
        PlannedEvent(
            e.event_name,
            e.customer_id,
            e.day,
            e.value,
            e.identifier,
            min(max(e.timestamp, lo), hi),
            e.seq,
            e.source_at,
            part,
            period_end,
            carried_from,
        )
        for e in events
    ]


def _who(aggregate: DailyAggregate) -> tuple[str, str]:
    return aggregate.event_name, aggregate.customer_id


def _inside(span: tuple[int, int], period: tuple[int, int], oldest: int, now: int) -> tuple[int, int]:
    """The stamps an event of a part (``span``) may carry: inside the part and its period
    (start, end), a whole minute clear of a boundary that falls inside a minute, within Stripe's
    window."""
    (span_start, span_end), (period_start, period_end) = span, period
    lo, hi = max(span_start, period_start), min(span_end, period_end) - 1
    if lo % 60 and hi - lo > 120:
        lo += 60 - lo % 60
    if (hi + 1) % 60 and hi - lo > 120:
        hi -= (hi + 1) % 60
    return max(lo, oldest), max(min(hi, now), lo)
