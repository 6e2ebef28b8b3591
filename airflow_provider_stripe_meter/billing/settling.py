"""Before planning: settle the ledger rows an earlier run left open.

A run killed between writing a row and learning Stripe's answer leaves it ``pending``; one that
saw its meter deactivated, or read back a figure that differed, leaves ``unverified`` rows; a
cancel cut short leaves ``cancelling``. ``pending`` rows Stripe still refuses a repeat of are
sent again under their identifiers, ``cancelling`` ones cancelled again, and the rest read from
Stripe's meter event summaries (:meth:`Settler._read`).

.. seealso:: https://docs.stripe.com/api/billing/meter-event-summary/list
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow_provider_stripe_meter.billing.meters import ADD, COUNT
from airflow_provider_stripe_meter.billing.plans import PlannedEvent, ledger_identifier
from airflow_provider_stripe_meter.billing.settings import FRESH_MARGIN
from airflow_provider_stripe_meter.ledger.entries import (
    ACCEPTED,
    CANCELLED,
    CANCELLING,
    DROPPED,
    LIVE,
    PENDING,
    REJECTED,
    UNVERIFIED,
    Change,
    Entry,
)
from airflow_provider_stripe_meter.utils.days import day_end, day_of, day_start
from airflow_provider_stripe_meter.utils.errors import Rejected

if TYPE_CHECKING:
    from collections.abc import Callable

    from airflow_provider_stripe_meter.billing.context import RunContext, Writer
    from airflow_provider_stripe_meter.billing.meters import MeterSpec
    from airflow_provider_stripe_meter.billing.periods import PeriodBook
    from airflow_provider_stripe_meter.utils.clock import Clock


#: Slots skipped after Stripe showed events this ledger does not know of: more than the events a
#: lost ledger could have sent for one customer-day of a ``sum`` meter (one a run), and for a
#: ``count`` meter this plus Stripe's figure (one event a row).
SLOT_GAP = 1000


class InQuestion(NamedTuple):
    """One customer-day's (or part's) rows in question, to judge against Stripe's figure."""

    #: The rows whose fate Stripe's figure decides.
    rows: list[Entry]
    #: The other rows of the day Stripe holds for certain.
    certain: list[Entry]
    #: Stripe's figure for the day (or part), by the meter's formula.
    figure: int
    #: Stripe does not know the customer (it dropped every event).
    unknown: bool


class Settler:
    """Settles one meter's open rows of a run: rows still in Stripe's identifier window are sent
    again through ``deliver`` (the run's delivery), the rest read from Stripe's summaries."""

    def __init__(
        self,
        ctx: RunContext,
        spec: MeterSpec,
        deliver: Callable[[list[PlannedEvent]], tuple[list[Change], set[str]]],
        periods: PeriodBook | None = None,
    ) -> None:
        self.ctx, self.spec, self.deliver, self.periods = ctx, spec, deliver, periods
        self.ledger, self.account = ctx.ledger, ctx.account
        #: How many open rows were settled, and how many could not be; rows written to take
        #: Stripe's figure where it holds usage this ledger did not send.
        self.adopted = 0
        self.settled = 0
        self.unsettled: list[Entry] = []

    def settle(self) -> None:
        """Settle every open row of the meter (of any earlier run)."""
        open_rows = [e for e in self.ledger.open_entries(self.account, self.spec.meter_id)]
        if not open_rows:
            return
        self.ctx.log.info("Settling %d ledger rows earlier runs left open", len(open_rows))
        window = self.ctx.settings.timing.identifier_window
        now = self.ctx.clock.now()
        resend, cancel, read = [], [], []
        periods = self.periods
        for entry in open_rows:
            if entry.state == CANCELLING:
                cancel.append(entry)
            elif (
                entry.state == PENDING
                and window is not None
                and now - entry.sent_at < (window - FRESH_MARGIN).total_seconds()
                # Sent again now, an event whose invoice has locked since would be billed
                # nowhere: whether the first send landed (before the lock) is read instead.
                and (
                    periods is None
                    or periods.carries(
                        entry.event_name, entry.customer_id, entry.stamp, entry.period_end, now
                    )
                )
            ):
                resend.append(entry)
            else:
                read.append(entry)
        self._cancel(cancel)
        self._resend(resend)
        self._read(read)

    def _cancel(self, entries: list[Entry]) -> None:
        changes: list[Change] = []
        for entry in entries:
            try:
                self.ctx.stripe.cancel_meter_event(entry.event_name, entry.identifier)
                changes.append(Change(entry.identifier, CANCELLED, self.ctx.clock.now(), "cancelled"))
            except Rejected as err:
                # Past Stripe's 24 hours: the event stands, and the plan reports the day over.
                changes.append(
                    Change(entry.identifier, ACCEPTED, entry.answered_at, f"cancel refused: {err}"[:250])
                )
        self.ledger.resolve(self.account, changes)
        self.settled += len(changes)

    def _resend(self, entries: list[Entry]) -> None:
        if not entries:
            return
        events = [
            PlannedEvent(
                e.event_name,
                e.customer_id,
                e.day,
                e.value,
                e.identifier,
                e.stamp,
                e.seq,
                e.source_at,
                e.part,
                e.period_end,
                attempt=e.attempt,
            )
            for e in entries
        ]
        changes, failed = self.deliver(events)
        self.ledger.resolve(self.account, changes)
        self.settled += len(changes)
        self.unsettled.extend(e for e in entries if e.identifier in failed)

    def _read(self, entries: list[Entry]) -> None:
        """Settle ``entries`` from Stripe's summaries, per (customer, day the events were stamped
        in), once they have had ``summary_lag`` to settle (left open if that is further away than
        ``settle_timeout``).

        Each customer-day's rows are then judged against Stripe's figure (:meth:`judge`).
        """
        if not entries:
            return
        ctx = self.ctx
        if not wait_for_summaries(ctx, max((e.answered_at or e.sent_at) for e in entries)):
            self.unsettled.extend(entries)
            return
        customers = sorted({e.customer_id for e in entries})
        days = sorted({day_of(e.stamp) for e in entries})
        found, unknown = ctx.stripe.recorded_per_day(
            self.spec.meter_id, customers, days[0], days[-1], max_rps=ctx.settings.read_rps
        )
        ctx.book.summary_requests += len(customers)
        start, end = day_start(days[0]), day_end(days[-1])
        others = [
            e
            for e in self.ledger.entries_stamped(self.account, self.spec.meter_id, customers, start, end)
            if e.state in LIVE and e.identifier not in {x.identifier for x in entries}
        ]
        certain: dict[tuple[str, date], list[Entry]] = defaultdict(list)
        for entry in others:
            certain[(entry.customer_id, day_of(entry.stamp))].append(entry)
        groups: dict[tuple[str, date], list[Entry]] = defaultdict(list)
        for entry in entries:
            groups[(entry.customer_id, day_of(entry.stamp))].append(entry)
        questions = []
        for key, group in groups.items():
            customer, _ = key
            questions.append(InQuestion(group, certain[key], found.get(key, 0), customer in unknown))
        self.judge(questions)

    def judge(self, groups: list[InQuestion]) -> None:
        """Settle each group of rows against Stripe's figure for their customer and day (or part).

        The events of one customer reach Stripe one at a time, so those that landed are the first
        ones answered: the ledger takes the first ``k`` whose total makes Stripe's figure, and marks
        the rest ``dropped`` (billed nowhere; the plan sends their usage again), all of them for a
        customer Stripe does not know. Where no ``k`` explains the figure (Stripe holds events this
        ledger did not send, or lacks events it recorded as taken), the ledger takes Stripe's
        figure; where no rows can, they stay open.
        """
        changes: list[Change] = []
        adopted: list[Entry] = []
        now = self.ctx.clock.now()
        for group, certain, figure, unknown in groups:
            group.sort(key=lambda e: (e.answered_at or e.sent_at, e.seq))
            if unknown:
                changes += [Change(e.identifier, DROPPED, now, "customer unknown to Stripe") for e in group]
                continue
            landed = self._landed(group, certain, figure)
            if landed is None:
                # No count of these events explains Stripe's figure: Stripe holds events this
                # ledger did not send (a duplicate answer said so, or another sender), or lacks
                # some it recorded as taken. The ledger takes Stripe's figure for the day, so the
                # plan sends the true difference.
                mirrored = self._mirror(group, certain, figure, now)
                if mirrored is None:
                    self.unsettled.extend(group)
                    continue
                changes += [
                    Change(e.identifier, DROPPED, now, "settled: Stripe's figure taken") for e in group
                ]
                adopted.extend(mirrored)
                continue
            changes += [
                Change(e.identifier, ACCEPTED, e.answered_at or now, "settled from summaries")
                for e in group[:landed]
            ]
            changes += [
                Change(e.identifier, DROPPED, now, "not in Stripe's summaries") for e in group[landed:]
            ]
        # The figure Stripe holds is written first: a run killed in between leaves both, and the
        # next settles the group again (its rows are still open) against the same figure.
        self.ledger.insert(adopted)
        self.ledger.resolve(self.account, changes)
        self.settled += len(changes)
        self.adopted += len(adopted)
        if adopted:
            self.ctx.log.warning(
                "Stripe's summaries differ from this ledger for %d customer-days (e.g. %s): "
                "the ledger takes Stripe's figures and the plan sends the difference to the source",
                len({(e.customer_id, e.day) for e in adopted}),
                sorted({f"{e.customer_id} {e.day.isoformat()}" for e in adopted})[:3],
            )

    def _mirror(
        self, group: list[Entry], certain: list[Entry], stripe_figure: int, now: float
    ) -> list[Entry] | None:
        """Rows that make the ledger hold ``stripe_figure`` beside ``certain`` in place of ``group``
        (each ``accepted``, noted as taken from Stripe); ``None`` where no rows can (a ``count``
        figure below the events the ledger is sure of)."""
        kind, spec = self.spec.kind, self.spec
        first = group[0]
        if any((e.day, e.part) != (first.day, first.part) for e in group):
            return None  # rows of several days or parts: one figure cannot say how it splits
        if kind == COUNT:
            values = [1] * (stripe_figure - len(certain))
            if stripe_figure < len(certain):
                return None
        elif kind == ADD:
            diff = stripe_figure - sum(e.value for e in certain)
            if diff < 0:
                return None  # less than the rows it is sure of: a summary trailing them, not evidence
            values = [diff] if diff else []
        else:
            values = [stripe_figure]
        known = self.ledger.figures(self.account, spec.meter_id, first.day, first.day).get(
            (first.customer_id, first.day)
        )
        # Stripe holds events in slots this ledger does not know of (a lost ledger's, another
        # sender's): the rows written now, and the events planned after them, are numbered past
        # a gap, so an identifier Stripe still remembers (24 hours) is not used again and dropped.
        gap = SLOT_GAP + (stripe_figure if kind == COUNT else 0)
        seq = (known.max_seq if known is not None else max(e.seq for e in group)) + gap
        stamp = max(e.stamp for e in group)
        return figure_rows(
            self.ctx.writer,
            spec,
            first,
            seq,
            values,
            stamp,
            now,
            "stripe:",
            "Stripe's figure: its summaries differ from what this ledger sent",
        )

    def _landed(self, group: list[Entry], certain: list[Entry], stripe_figure: int) -> int | None:
        """How many of ``group`` (in the order Stripe took them) landed, given Stripe's figure."""
        kind = self.spec.kind
        if kind == COUNT:
            landed = stripe_figure - len(certain)
            return landed if 0 <= landed <= len(group) else None
        if kind == ADD:
            total = sum(e.value for e in certain)
            for landed in range(len(group) + 1):
                if total == stripe_figure:
                    return landed
                if landed < len(group):
                    total += group[landed].value
            return None
        # The newest event decides: all landed if Stripe shows the newest open one's figure;
        # otherwise none is counted (sending the figure again changes nothing if one did land).
        newest = max(group, key=lambda e: (e.stamp, e.seq))
        return len(group) if newest.value == stripe_figure else 0


def figure_rows(
    writer: Writer,
    spec: MeterSpec,
    where: Entry | tuple[str, str, date, int],
    after_seq: int,
    values: list[int],
    stamp: int,
    now: float,
    prefix: str,
    note: str,
) -> list[Entry]:
    """``accepted`` rows that make the ledger hold what Stripe's summaries show (never sent: their
    identifiers carry ``prefix``), numbered after ``after_seq`` in the customer-day (and part) of
    ``where``: a ledger row, or (event name, customer, day, part); written by ``writer``."""
    if isinstance(where, Entry):
        name, customer, day, part, period_end = (
            where.event_name,
            where.customer_id,
            where.day,
            where.part,
            where.period_end,
        )
    else:
        (name, customer, day, part), period_end = where, None
    return [
        Entry(
            account=writer.account,
            meter_id=spec.meter_id,
            event_name=name,
            customer_id=customer,
            day=day,
            seq=seq,
            identifier=prefix + ledger_identifier(spec, customer, day, seq),
            value=value,
            stamp=stamp,
            source_at=-1,
            state=ACCEPTED,
            run_id=writer.run_id,
            attempt=writer.attempt,
            sent_at=now,
            answered_at=now,
            note=note,
            part=part,
            period_end=period_end,
        )
        for seq, value in enumerate(values, start=after_seq + 1)
    ]


def wait_for_summaries(ctx: RunContext, latest: float) -> bool:
    """Sleep until Stripe's summaries show what was answered at ``latest`` (``summary_lag`` on).

    ``False`` without sleeping when that is further away than ``settle_timeout``: the caller
    leaves the rows open for a later run.
    """
    wait = latest + ctx.settings.summary_lag - ctx.clock.now()
    if wait > ctx.settings.settle_seconds:
        return False
    if wait > 0:
        ctx.log.info("Waiting %.1f s for Stripe's summaries to show the events in question", wait)
        ctx.clock.sleep(wait)
    return True


def stripe_view(spec: MeterSpec, entries: list[Entry]) -> int:
    """What Stripe bills for live ``entries`` stamped in one day, by the meter's formula."""
    live = [e for e in entries if e.state in LIVE]
    if spec.kind == ADD:
        return sum(e.value for e in live)
    if spec.kind == COUNT:
        return len(live)
    if not live:
        return 0
    if spec.event_time_window is None:
        return max(live, key=lambda e: (e.stamp, e.seq)).value
    return max(live, key=lambda e: (e.answered_at or e.sent_at, e.seq)).value


#: Why a row is left ``unverified`` after a duplicate answer to a request of its own try.
FOREIGN = (
    "duplicate: Stripe holds an event under this identifier that this ledger did not send (another "
    "ledger billing this meter, commits the ledger lost, or another sender)"
)


#: Why a row was not sent: its period's invoice locked (or would, before it landed) meanwhile.
WITHHELD = "held: its billing period's invoice locks before the event would land; not sent"


def resolved_states(
    clock: Clock,
    events: list[PlannedEvent],
    answered: dict[str, float],
    rejected: set[str],
    failed: set[str],
    foreign: set[str] = frozenset(),  # type: ignore[assignment]
    withheld: set[str] = frozenset(),  # type: ignore[assignment]
) -> tuple[list[Change], set[str]]:
    """Ledger changes from a delivery: answered events are accepted, rejected ones rejected.

    Failed events stay ``pending`` (no change): the next run sends them again under the same
    identifier. An event refused as a duplicate although its request carried its row's own
    idempotency key (``foreign``) names a slot Stripe holds an event of someone else's in: it is
    not counted as billed but left ``unverified``, for the next run to settle from Stripe's
    summaries. Every set and ``answered`` (when Stripe answered) is keyed by event identifier.
    Returns the changes and the identifiers that failed.
    """
    changes: list[Change] = []
    failed_ids: set[str] = set()
    for event in events:
        identifier = event.identifier
        if identifier in failed:
            failed_ids.add(identifier)
        elif identifier in withheld:
            # Not sent: the row is not live, so the next run plans the usage again (held, or
            # carried into the open period with billing_periods="carry").
            changes.append(Change(identifier, REJECTED, clock.now(), WITHHELD))
        elif identifier in foreign:
            changes.append(Change(identifier, UNVERIFIED, answered.get(identifier, clock.now()), FOREIGN))
        elif identifier in rejected:
            changes.append(Change(identifier, REJECTED, answered.get(identifier), "rejected by Stripe"))
        else:
            changes.append(Change(identifier, ACCEPTED, answered.get(identifier, clock.now()), ""))
    return changes, failed_ids


def describe(entry: Entry) -> dict[str, Any]:
    """A JSON-safe sample of a ledger row."""
    return {
        "event_name": entry.event_name,
        "customer_id": entry.customer_id,
        "day": entry.day.isoformat(),
        "identifier": entry.identifier,
        "value": entry.value,
        "state": entry.state,
    }
