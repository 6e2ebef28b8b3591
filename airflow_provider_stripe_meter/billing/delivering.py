"""Delivering a slice of planned events and learning what became of each one.

:class:`Delivery` sends through the run's API (:mod:`.sending`), decides as each event leaves
whether an invoice still carries it (an event whose invoice locked is withheld, or left pending
where it may have landed already), notes when each answer came, does the run's other work while
requests are out, and turns the answers into ledger changes (:func:`.settling.resolved_states`).
It depends on the run's :class:`~.context.RunContext` alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from airflow_provider_stripe_meter.billing.sending import make_deliverer
from airflow_provider_stripe_meter.billing.settling import resolved_states
from airflow_provider_stripe_meter.utils.errors import Duplicate, MeterFailure, Rejected, Withheld

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.billing.context import RunContext
    from airflow_provider_stripe_meter.billing.periods import PeriodBook
    from airflow_provider_stripe_meter.billing.plans import PlannedEvent
    from airflow_provider_stripe_meter.ledger.entries import Change

Send = Callable[[list["PlannedEvent"]], None]


class Delivery:
    """Sends a run's events, a slice at a time, and keeps what the run learns from the answers."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        #: The customers' billing periods (``None``: billed by UTC day): asked as each event leaves.
        self.periods: PeriodBook | None = None
        #: When the last answer came (what a read-back waits on).
        self.last_answer = 0.0
        #: Ledger-side work that need not come first (writing the subscriptions table, planning
        #: the next slice): done on this thread while the next slice's requests are out. Work
        #: that fails is logged; it keeps what it has left for whoever calls it next.
        self.meanwhile: list[Callable[[], None]] = []
        #: Events Stripe refused as duplicates of events this ledger did not send.
        self.foreign: list[PlannedEvent] = []
        #: Events not sent because their period's invoice locked before they would land.
        self.withheld: list[PlannedEvent] = []

    def send(self, events: list[PlannedEvent]) -> tuple[list[Change], set[str]]:
        """Send ``events`` through the run's API; return the ledger changes and the failed identifiers."""
        if not events:
            return [], set()
        ctx, periods = self.ctx, self.periods
        answers = _Answers(self)
        withheld_now: list[PlannedEvent] = []
        if periods is not None and ctx.settings.api != "v1":
            # 100 customers a request: each fresh event is decided once, as its slice leaves (a
            # slice goes out in seconds, well inside the 10 minutes kept before a lock).
            at = ctx.clock.now()
            kept: list[PlannedEvent] = []
            for e in events:
                carried = periods.carries(e.event_name, e.customer_id, e.timestamp, e.period_end, at)
                (kept if carried or e.attempt else withheld_now).append(e)
            events = kept
        # Every event's identifier is new to Stripe or names an event of ours, so the stream,
        # which drops repeats without a word, is as exact as v1 here.
        work, self.meanwhile = self.meanwhile, []
        report = make_deliverer(
            ctx.settings.api,
            ctx.book.specs,
            ctx.settings,
            ctx.stripe,
            ctx.log,
            answers.noting,
            attempt=ctx.writer.attempt,
        ).run(events, meanwhile=partial(self._meanwhile, work) if work else None)
        ctx.book.reports.append(report)
        report.withheld.extend(withheld_now)
        events = [*events, *withheld_now]
        rejected = {e.identifier for e in report.rejected_items}
        # Each request carried its row's idempotency key, so Stripe replays our own answer to a
        # retry: a duplicate answer is evidence that Stripe holds what this ledger does not.
        foreign = {e.identifier for e in report.already} if ctx.settings.api == "v1" else set()
        if foreign:
            self.foreign.extend(e for e in report.already)
            ctx.log.warning(
                "Stripe already holds events under %d identifiers this ledger did not send (e.g. %s): "
                "another ledger bills this meter (every DAG billing it must share ledger_conn_id and "
                "ledger_table), the ledger lost commits, or something else sends them. Their days "
                "are not counted as billed; the next run settles them from Stripe's summaries.",
                len(foreign),
                [e.identifier for e in report.already[:3]],
            )
        self.withheld.extend(report.withheld)
        return resolved_states(
            ctx.clock,
            events,
            answers.answered,
            rejected,
            {e.identifier for e in report.failed_items},
            foreign,
            {e.identifier for e in report.withheld},
        )

    def _meanwhile(self, work: list[Callable[[], None]]) -> None:
        """Do ``work`` while requests are out; a failure is logged, not raised into the sending."""
        for job in work:
            try:
                job()
            except Exception as err:  # the caller does it again after the run, and raises then
                self.ctx.log.warning("Work left for after the run (it failed while sending): %s", err)


class _Answers:
    """One delivery's answers: when each came, by identifier, and which events went out."""

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        #: When Stripe answered each event, by identifier.
        self.answered: dict[str, float] = {}
        #: Events that went out at least once (a retry of one may find its first try landed).
        self.tried: set[str] = set()
        self.lock = threading.Lock()

    def noting(self, send: Send) -> Send:
        """``send``, deciding each single event as it leaves and noting when its answer came
        (the order Stripe took a customer's events in)."""
        return partial(self._send_and_note, send)

    def _send_and_note(self, send: Send, batch: list[PlannedEvent]) -> None:
        periods = self.delivery.periods
        # The stream's batches mix customers: its events were decided as the slice left.
        if periods is not None and len(batch) == 1:
            # Whether an invoice carries it is decided as it leaves, not at planning: a
            # delivery that outlasts a draft's finalization sends nothing billed nowhere.
            at = self.delivery.ctx.clock.now()
            if not all(
                periods.carries(e.event_name, e.customer_id, e.timestamp, e.period_end, at) for e in batch
            ):
                if any(e.attempt or e.identifier in self.tried for e in batch):
                    # It may have landed already (a lost answer, a killed run's row):
                    # left pending, for the next run to read from Stripe's summaries.
                    raise MeterFailure(
                        "its billing period's invoice locked before an answer came; whether "
                        "it landed is read from Stripe's summaries by the next run",
                        {"type": "invoice_locked"},
                    )
                raise Withheld("its billing period's invoice locks before the event would land")
        with self.lock:
            self.tried.update(e.identifier for e in batch)
        try:
            send(batch)
        except (Duplicate, Rejected):
            self._note(batch)
            raise
        self._note(batch)

    def _note(self, batch: list[PlannedEvent]) -> None:
        delivery = self.delivery
        moment = delivery.ctx.clock.now()
        with self.lock:
            # Under the lock: a slower thread must not put back an earlier moment, or the wait
            # for Stripe's summaries to catch up would end too soon.
            delivery.last_answer = max(delivery.last_answer, moment)
            for event in batch:
                self.answered[event.identifier] = moment
