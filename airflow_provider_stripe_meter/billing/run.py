"""One billing run, top to bottom: meters, settle, plan, deliver, check, result.

The ledger (:mod:`airflow_provider_stripe_meter.ledger`) holds every event the runs sent, so a run
knows what Stripe holds of ours without reading Stripe: it sends the source minus the ledger, and
a run that sends nothing reads nothing from Stripe but its meters. Each slice of events is
written ``pending`` before it leaves and resolved by Stripe's answers (:mod:`.delivering`;
:mod:`.settling` settles what a killed run left). The phases share the run's :mod:`.context`.
The histories this protects are in docs/guarantees.md, tested in
``tests/billing/test_ledger_run.py``, ``test_divergence.py`` and ``test_histories_machine.py``.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from functools import partial
from typing import TYPE_CHECKING

from airflow_provider_stripe_meter.billing.ahead import PlanAhead
from airflow_provider_stripe_meter.billing.book import CustomerDay, RunBook
from airflow_provider_stripe_meter.billing.context import RunContext, Writer
from airflow_provider_stripe_meter.billing.coverage import NOTHING, Coverage
from airflow_provider_stripe_meter.billing.delivering import Delivery
from airflow_provider_stripe_meter.billing.meters import ADD, COUNT, MeterUnsupportedError, meter_spec
from airflow_provider_stripe_meter.billing.outcomes import DayOutcome
from airflow_provider_stripe_meter.billing.plans import (
    INVOICE_FINAL,
    OLDER_VIEW,
    UNSETTLED,
    Held,
    hold_unknown,
    plan_day,
    plan_in_periods,
    plan_late_in_periods,
    with_ledger_parts,
)
from airflow_provider_stripe_meter.billing.result import BatchResult, SourceFigures, summarize
from airflow_provider_stripe_meter.billing.settling import (
    FOREIGN,
    WITHHELD,
    InQuestion,
    Settler,
    describe,
    figure_rows,
    stripe_view,
    wait_for_summaries,
)
from airflow_provider_stripe_meter.ledger.entries import (
    ACCEPTED,
    CANCELLED,
    CANCELLING,
    DROPPED,
    OPEN,
    REJECTED,
    UNVERIFIED,
    Change,
    Entry,
)
from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate
from airflow_provider_stripe_meter.utils.clock import SYSTEM, Clock
from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY, day_end, day_of, day_start, rfc3339
from airflow_provider_stripe_meter.utils.errors import (
    Refused,
)

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.billing.meters import MeterSpec
    from airflow_provider_stripe_meter.billing.periods import PeriodBook
    from airflow_provider_stripe_meter.billing.plans import Key, PlannedEvent
    from airflow_provider_stripe_meter.billing.ports import CustomerStore, LedgerStore, Log, StripeMeters
    from airflow_provider_stripe_meter.billing.settings import RunSettings
    from airflow_provider_stripe_meter.ledger.entries import DayFigure
    from airflow_provider_stripe_meter.utils.unchanged import Unchanged

#: Events a run may plan for count meters (one event per row) before it refuses to start.
MAX_COUNT_EVENTS = 1_000_000
#: New customers a run asks Stripe about one by one; more, and it lists every customer once
#: (100 a page: cheaper from a few hundred on, and what a first run over a whole base needs).
CUSTOMER_LOOKUPS = 100
#: Customers missing from Stripe's full list that are still asked about one by one (one created
#: while the list was read is found so); past this, they are held unasked.
CUSTOMER_RECHECKS = 1_000


@dataclass(frozen=True)
class Usage:
    """What the source holds, aggregated per (event name, customer, UTC day)."""

    aggregates: list[DailyAggregate]
    source: SourceFigures
    #: Customer-days older than Stripe's window (``too_old="bill_at_oldest"``).
    late: tuple[DailyAggregate, ...] = ()
    #: The oldest instant Stripe still accepts, as the source was read.
    oldest: int = 0
    #: The customers' billing periods on the meters (``None``: billed by UTC day alone).
    periods: PeriodBook | None = None
    #: Where the source is the truth (:mod:`.coverage`): a customer-day billed there that has
    #: fewer, smaller or no rows now is corrected.
    covers: Coverage = NOTHING
    #: Event names the coverage is about even when the source has no row of them (a fixed
    #: ``event_name``): their billed days without rows are corrected too.
    event_names: frozenset[str] = frozenset()
    #: Customer-days the database found the ledger already holds exactly (not in ``aggregates``):
    #: counted as already recorded, never planned (``None``: the ledger was not subtracted).
    unchanged: Unchanged | None = None


@dataclass(frozen=True, slots=True)
class _MeterDays:
    """What planning one meter's customer-days reads of the ledger, read once per meter."""

    spec: MeterSpec
    #: The ledger's figure per (customer, day).
    figures: dict[tuple[str, date], DayFigure]
    #: Whether the meter is billed in periods (it has a metered price).
    in_periods: bool
    #: The ledger rows of the days split at a period boundary, per (customer, day).
    by_day: dict[tuple[str, date], list[Entry]]


#: Events written, sent and resolved together: what a run killed at any instant leaves pending.
SLICE = 5_000
#: Stripe cancels a meter event only within 24 hours of receiving it; an hour is kept in hand.
CANCEL_WINDOW = 23 * 3600


class BillingRun:
    """One run of the batch operator against the ledger, in plain Python (Stripe and the ledger are ports)."""

    def __init__(
        self,
        settings: RunSettings,
        stripe: StripeMeters,
        ledger: LedgerStore,
        writer: Writer,
        log: Log,
        now: int,
        customers: CustomerStore | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self.settings, self.stripe, self.ledger, self.log = settings, stripe, ledger, log
        #: What the run reads "now" from and waits on (a test passes a virtual one).
        self.clock = clock
        #: The customers Stripe has shown to exist (``None``: not checked, every one is sent).
        self.customers = customers
        #: Customers of the source Stripe does not know: their usage is held, not sent.
        self.unknown: set[str] = set()
        self.writer, self.account = writer, writer.account
        self.book = RunBook(now=now, sample_limit=settings.sample_limit)
        #: What the phases (settling, delivery, the checks) are given of the run.
        self.ctx = RunContext(settings, stripe, ledger, writer, log, self.book, clock)
        #: Per event name, the identifiers of this run's events Stripe accepted.
        self.accepted: dict[str, list[str]] = defaultdict(list)
        #: Per event name, the identifiers of earlier runs' events Stripe took when settling sent them again.
        self.resent: dict[str, list[str]] = defaultdict(list)
        #: Ledger work: rows written, open rows settled, rows left unsettled.
        self.figures = {"written": 0, "settled": 0, "unsettled": 0, "cancelled": 0}
        #: Sending, and what the answers said (:mod:`.delivering`).
        self.delivery = Delivery(self.ctx)
        #: The customer-days planned and their events not sent yet (:meth:`plan`).
        self.planned: PlanAhead[Key, PlannedEvent] = PlanAhead(iter(()))
        #: Where the source is the truth (:attr:`Usage.covers`).
        self.covers: Coverage = NOTHING
        #: The customers' billing periods (:attr:`Usage.periods`): asked again as each event leaves.
        self.periods: PeriodBook | None = None

    # -- the run ---------------------------------------------------------------------------------

    def execute(self, usage: Usage) -> BatchResult:
        """Bill ``usage``: meters -> settle -> plan -> deliver -> correct -> check -> result.

        Sending starts once the first slice is planned; each next slice is planned while the
        requests of the one before are out (:mod:`.ahead`).
        """
        aggregates = _merge([*usage.aggregates, *usage.late])
        self.covers, self.periods = usage.covers, usage.periods
        self.delivery.periods = usage.periods
        self.book.unchanged = usage.unchanged
        names = {name for name, _, _ in aggregates} | (set(usage.event_names) if usage.covers else set())
        if usage.unchanged is not None:
            # A night the ledger holds whole still reads its meters and settles open rows.
            names |= usage.unchanged.event_names
        if names:
            self.read_meters(names)
            self.settle()
            self.unknown = self.check_customers({customer for _, customer, _ in aggregates}, usage.periods)
            if self.settings.adopt and not self.settings.dry_run:
                self.adopt(aggregates)
            if usage.covers:
                aggregates = self.with_emptied(aggregates)
            self.plan(aggregates, usage.oldest, usage.periods, first=None if self.settings.dry_run else SLICE)
            if not self.settings.dry_run:
                self.deliver_planned()
                self.cancel_over()
                self.check_meters()
                # A recovery run reads back what it sent: a slot a lost ledger had used inside
                # Stripe's identifier window would drop it again, silently on the v2 stream.
                if self.settings.confirm == "summaries" or self.settings.adopt:
                    self.read_back()
        result = summarize(self.book, self.settings, usage.source)
        result.ledger = dict(self.figures)
        result.covers = usage.covers.describe()
        result.invoices = self.book.invoices(usage.periods, set(self.book.specs))
        if self.figures["unsettled"] and not self.settings.dry_run:
            result.success = False
        return result

    def last_meters(self, event_names: set[str]) -> set[str]:
        """Of ``event_names``, those whose meter bills the ``last`` value (their meters read now)."""
        self.read_meters(event_names)
        return {name for name in event_names if self.book.specs[name].kind not in (ADD, COUNT)}

    def subtractable(self, event_names: set[str]) -> dict[str, tuple[str, bool]]:
        """Of ``event_names``' active meters, those that sum or count: per event name, the meter id
        and whether it counts rows. The database may leave their customer-days the ledger holds
        exactly out of the run (:class:`Usage.unchanged`); a ``last`` meter's all come back.

        Meters read here are not kept for the run (an event name the source has no row of is
        not one of its meters); the hook lists the meters once either way.
        """
        out: dict[str, tuple[str, bool]] = {}
        for name in sorted(event_names):
            try:
                spec = self.book.specs.get(name) or meter_spec(self.stripe.active_meter(name))
            except MeterUnsupportedError:
                # A meter the run cannot bill (another team's, say): not subtracted; a source
                # row of it fails the run when its meters are read, as on the worker.
                continue
            if spec.kind in (ADD, COUNT):
                out[name] = (spec.meter_id, spec.kind == COUNT)
        return out

    def read_meters(self, event_names: set[str]) -> None:
        """Each meter's settings; an unknown or inactive meter fails before anything is sent.

        A meter read earlier in the run (:meth:`last_meters`) is not read again.
        """
        for name in sorted(event_names - set(self.book.specs)):
            meter = self.stripe.active_meter(name)
            self.book.deactivated_at[name] = (meter.get("status_transitions") or {}).get("deactivated_at")
            # The payload keys are the meter's own: an event under other keys would be dropped.
            self.book.specs[name] = meter_spec(meter)

    def check_customers(self, customers: set[str], periods: PeriodBook | None = None) -> set[str]:
        """The customers of the source Stripe does not know (their usage is held, not sent).

        Stripe answers 200 to a meter event for a customer it does not know and drops it later,
        reported only in the meter's error reports: a CRM that creates customers after the
        nightly run would be under-billed without a word. A customer Stripe has shown to exist
        is in the known-customers table; the rest are asked about one by one
        (``GET /v1/customers/{id}``) or by listing every customer once, whichever asks less.
        Customers with a subscription on a metered price exist. Those found are written to the table (not on a
        dry run), so a night of known customers asks Stripe nothing.

        .. seealso:: https://docs.stripe.com/api/customers/retrieve
        """
        if self.customers is None or not customers:
            return set()
        unchecked = customers - self.customers.known(self.account, customers)
        found: set[str] = set()
        if periods is not None and unchecked:
            # A subscription belongs to a customer: Stripe knows everyone the periods were read for.
            found = {customer for (_, customer) in periods.customers} & unchecked
            unchecked -= found
        unknown: set[str] = set()
        if unchecked:
            read_rps = self.settings.read_rps
            # One request per customer, or the whole list at 100 a page (at least as many pages as
            # the source has customers): whichever asks less. A business that signs up a few
            # hundred customers a night among 100,000 asks about those alone.
            try:
                if len(unchecked) <= max(CUSTOMER_LOOKUPS, len(customers) // 100):
                    found |= self.stripe.customers_known(sorted(unchecked), max_rps=read_rps)
                    self.book.customer_requests += len(unchecked)
                else:
                    listed = self.stripe.customer_ids()
                    self.book.customer_requests += max(1, -(-len(listed) // 100))  # 100 a page
                    found |= unchecked & listed
                    missing = sorted(unchecked - listed)
                    again = missing[:CUSTOMER_RECHECKS]
                    if again:
                        found |= self.stripe.customers_known(again, max_rps=read_rps)
                        self.book.customer_requests += len(again)
            except Refused as err:
                # A key restricted to meter events: name the permission the check needs; nothing
                # has been sent yet (docs/permissions.md).
                raise type(err)(
                    "Checking that Stripe knows the source's customers before sending needs the key to "
                    f"read Customers (a restricted key's Customers: Read permission). {err}",
                    err.details,
                ) from err
            unknown = unchecked - found
        if found and not self.settings.dry_run:
            self.customers.add(self.account, found, int(self.clock.now()))
        if unknown:
            self.log.warning(
                "%d customers of the source are unknown to Stripe (e.g. %s): their usage is held, not "
                "sent, until they exist",
                len(unknown),
                sorted(unknown)[:5],
            )
        return unknown

    def with_emptied(self, aggregates: dict[Key, DailyAggregate]) -> dict[Key, DailyAggregate]:
        """``aggregates`` and, empty, the customer-days the ledger billed inside the coverage that
        the source has no rows for any more (every row deleted): planned down to nothing.

        One ledger query per meter over the covered days; the rows of the days found (a split
        day keeps its parts) are read for those customers alone.
        """
        covers = self.covers
        days = covers.days
        out = dict(aggregates)
        for name, spec in self.book.specs.items():
            figures = self.ledger.figures(self.account, spec.meter_id, days[0], days[-1])
            read = covers.every_customer or {c for n, c, _ in aggregates if n == name}
            gone = [
                (customer, day)
                for (customer, day), figure in figures.items()
                if (name, customer, day) not in aggregates
                and not figure.empty
                and covers.truth(day, figure.source_at)
                and (read is True or customer in read)
            ]
            if not gone:
                continue
            parts: dict[tuple[str, date], set[int]] = defaultdict(set)
            first, last = min(d for _, d in gone), max(d for _, d in gone)
            for entry in self.ledger.entries_of(
                self.account, spec.meter_id, {c for c, _ in gone}, first, last
            ):
                if entry.part:
                    parts[(entry.customer_id, entry.day)].add(entry.part)
            for customer, day in gone:
                start = day_start(day)
                empty = DailyAggregate(name, customer, day, 0, start, 0, 0)
                out[(name, customer, day)] = DailyAggregate(
                    name, customer, day, 0, start, 0, 0, with_ledger_parts(empty, parts[(customer, day)])
                )
            self.log.info(
                "%d customer-days of %s billed inside the run's coverage have no rows any more: "
                "corrected to nothing (e.g. %s)",
                len(gone),
                name,
                [f"{c} {d.isoformat()}" for c, d in sorted(gone)[:3]],
            )
        return out

    def adopt(self, aggregates: dict[Key, DailyAggregate]) -> int:
        """Write what Stripe's summaries show beyond the ledger into it, per customer-day.

        For a ledger that was lost, wholly or in part (a failover that lost commits, a restored
        backup), or started on a meter billed before it: one summaries request per customer,
        then, where Stripe holds more than the ledger's events for a customer-day, rows for the
        difference (``count``: one per event; ``last``: the figure, for a day the ledger holds
        nothing of), ``accepted`` and noted as adopted, so the plan sends only what Stripe lacks.

        Where Stripe holds *less* than the ledger's rows of a ``sum`` or ``count`` customer-day
        (or part), none of its rows is open, and every one was answered twice ``summary_lag``
        ago or more (so no summary still trails them), the ledger recorded as taken what Stripe
        dropped: a repeat of a slot a lost ledger had sent (the v2 stream drops it without a
        word), or an event of a customer Stripe did not know. Those rows are judged against
        Stripe's figure as settling judges open rows (:meth:`.Settler.judge`): the ones that
        explain it stay, the rest are ``dropped`` (or the ledger takes Stripe's figure), and the
        plan sends the difference.
        Days with open rows are left to settling. Returns the rows written.
        """
        written = 0
        now = self.clock.now()
        for name, spec in self.book.specs.items():
            days = self._adoption_days(name, spec, aggregates)
            if days:
                written += self._adopt_meter(name, spec, days, now)
        self.figures["adopted"] = written
        self.log.info("Adopted %d ledger rows from Stripe's summaries", written)
        return written

    def _adoption_days(
        self, name: str, spec: MeterSpec, aggregates: dict[Key, DailyAggregate]
    ) -> set[tuple[str, date]]:
        """The (customer, day)s of meter ``name`` an adopting run asks Stripe about."""
        days = {(c, d) for n, c, d in aggregates if n == name}
        covered = self.covers.days
        if covered:
            # Inside the coverage a lost event may have no source row any more (deleted since):
            # every customer the ledger, the known-customers table or the source knows is asked
            # about, for every covered day.
            found_days = self.ledger.figures(self.account, spec.meter_id, covered[0], covered[-1])
            known = {c for c, _ in found_days} | {c for c, _ in days}
            if self.customers is not None:
                known |= self.customers.every(self.account)
            days |= {(c, d) for c in known for d in covered}
        return days

    def _adopt_meter(self, name: str, spec: MeterSpec, days: set[tuple[str, date]], now: float) -> int:
        """Adopt Stripe's figures for ``days`` of one meter (:meth:`adopt`); the rows written."""
        first, last = min(d for _, d in days), max(d for _, d in days)
        newest = spec.kind not in (ADD, COUNT)
        held = self.ledger.figures(self.account, spec.meter_id, first, last, newest=newest)
        wanted = {cd for cd in days if cd not in held or (spec.kind in (ADD, COUNT) and not held[cd].open)}
        if not wanted:
            return 0
        customers = sorted({customer for customer, _ in wanted})
        found, unknown = self.stripe.recorded_per_day(
            spec.meter_id, customers, first, last, max_rps=self.settings.read_rps
        )
        self.book.summary_requests += len(customers)
        entries: list[Entry] = []
        # Stripe's summaries count events by their stamp; so does the ledger's side of the
        # comparison (usage carried into a later period, or billed late, is stamped on another
        # day than the one it bills).
        stamped: dict[tuple[str, date], list[Entry]] = defaultdict(list)
        for row in self.ledger.entries_stamped(
            self.account, spec.meter_id, customers, day_start(first), day_end(last)
        ):
            stamped[(row.customer_id, day_of(row.stamp))].append(row)
        split = self._split_days(name, spec, {cd for cd, f in found.items() if cd in wanted and f})
        # Rows Stripe holds less than, once no summary can still trail them: answered twice
        # summary_lag ago or more (the margin is the recovery's own: it judges rows the ledger
        # holds as taken, where a summary trailing longer than summary_lag would have the run
        # send again what Stripe holds).
        behind: list[InQuestion] = []
        left = 0
        settled_before = now - 2 * self.settings.summary_lag
        for customer, day in sorted(wanted):
            figure = found.get((customer, day), 0)
            mine = held.get((customer, day))
            seq = mine.max_seq if mine is not None else 0
            # A day split at a period boundary is adopted part by part (a summaries request
            # each), so each invoice's part holds what Stripe holds in it.
            for part, stamp, theirs, rows in split.get((customer, day)) or [
                (0, day_start(day), figure, stamped[(customer, day)])
            ]:
                more = theirs - stripe_view(spec, rows)
                if (more < 0 or customer in unknown) and spec.kind in (ADD, COUNT):
                    # Only rows answered as taken are judged. An open row stamped here (usage of
                    # another day carried or billed late into this one) is settling's to decide:
                    # Stripe's figure may not show it yet, and judging it dropped would send it again.
                    live = [e for e in rows if e.state == ACCEPTED]
                    if not live:
                        continue
                    recent = max(e.answered_at or e.sent_at for e in live) > settled_before
                    if recent or any(e.state in OPEN for e in rows):
                        left += 1
                        continue
                    gone = customer in unknown
                    behind.append(InQuestion(live, [], 0 if gone else theirs, gone))
                    continue
                if more <= 0:
                    continue
                values = [1] * more if spec.kind == COUNT else [more] if spec.kind == ADD else [figure]
                # Stamped at the part's start: any snapshot the source has of it is newer.
                entries += figure_rows(
                    self.writer,
                    spec,
                    (name, customer, day, part),
                    seq,
                    values,
                    stamp,
                    now,
                    "adopted:",
                    "adopted from Stripe's summaries",
                )
                seq += len(values)
        self._settle_behind(name, spec, behind, left)
        return len(self.ledger.insert(entries))

    def _settle_behind(self, name: str, spec: MeterSpec, behind: list[InQuestion], left: int) -> None:
        """Judge the rows of the customer-days where Stripe holds less than the ledger
        (:meth:`.Settler.judge`); ``left`` such days were left alone (rows too recent, or open)."""
        if left:
            self.log.info(
                "%d customer-days of %s show less in Stripe's summaries than the ledger holds, "
                "with rows answered less than twice summary_lag ago or still open: left to a later run",
                left,
                name,
            )
        if not behind:
            return
        judge = Settler(self.ctx, spec, self.deliver, self.periods)
        judge.judge(behind)
        self._count(judge)

    def _count(self, settler: Settler) -> None:
        """Add what ``settler`` settled, took from Stripe and left open to the run's figures."""
        self.figures["settled"] += settler.settled
        if settler.adopted:
            self.figures["taken_from_stripe"] = self.figures.get("taken_from_stripe", 0) + settler.adopted
        self.figures["unsettled"] += len(settler.unsettled)

    def _split_days(
        self, name: str, spec: MeterSpec, days: set[tuple[str, date]]
    ) -> dict[tuple[str, date], list[tuple[int, int, int, list[Entry]]]]:
        """Of ``days`` (customer, day) to adopt, those split at a billing period boundary: per
        part (start, a stamp inside it, what Stripe holds there, the ledger's rows stamped there).

        Stripe's summaries take minute-aligned ranges and a part's events are stamped a whole
        minute clear of a boundary (:func:`.plans._inside`), so the part ending at a boundary is
        read up to the boundary's minute. ``sum`` and ``count`` meters only (a ``last`` figure
        belongs to the whole day).
        """
        periods = self.periods
        if periods is None or not periods.covers(name) or spec.kind not in (ADD, COUNT) or not days:
            return {}
        bounds = periods.split()
        cut: dict[tuple[str, date], list[int]] = {}
        for customer, day in days:
            start = day_start(day)
            inside = [b for b in bounds.get((name, customer), ()) if start < b < start + SECONDS_PER_DAY]
            edges = [start, *inside, start + SECONDS_PER_DAY]
            if inside and all(hi - hi % 60 - (lo - lo % 60) >= 120 for lo, hi in itertools.pairwise(edges)):
                # (a part under two minutes is not stamped a minute clear of its boundary)
                cut[(customer, day)] = edges
        if not cut:
            return {}
        # By stamp, as Stripe's summaries count them (carried usage is stamped elsewhere).
        entries = self.ledger.entries_stamped(
            self.account,
            spec.meter_id,
            {c for c, _ in cut},
            day_start(min(d for _, d in cut)),
            day_end(max(d for _, d in cut)),
        )
        by_day: dict[tuple[str, date], list[Entry]] = defaultdict(list)
        for entry in entries:
            by_day[(entry.customer_id, day_of(entry.stamp))].append(entry)
        out: dict[tuple[str, date], list[tuple[int, int, int, list[Entry]]]] = {}
        for (customer, day), edges in cut.items():
            parts = []
            for lo, hi in itertools.pairwise(edges):
                # The same minute-aligned range on both sides.
                low, high = lo - lo % 60, hi - hi % 60
                theirs = self.stripe.usage_between(spec.meter_id, customer, low, high)
                self.book.summary_requests += 1
                live = [e for e in by_day[(customer, day)] if e.state == ACCEPTED and low <= e.stamp < high]
                parts.append((lo, lo, theirs or 0, live))
            out[(customer, day)] = parts
        return out

    def settle(self) -> None:
        """Settle every meter's open rows (those still open are reported by the plan)."""
        if self.settings.dry_run:
            return
        for spec in self.book.specs.values():
            settler = Settler(self.ctx, spec, self._deliver_resent, self.periods)
            settler.settle()
            self._count(settler)
            for entry in settler.unsettled:
                self.book.samples.add(
                    "unsettled",
                    {**describe(entry), "reason": "Stripe's figure does not settle this earlier event yet"},
                )

    def plan(
        self,
        aggregates: dict[Key, DailyAggregate],
        oldest: int,
        periods: PeriodBook | None = None,
        *,
        first: int | None = None,
    ) -> None:
        """Plan every customer-day: the source's figure minus the ledger's, in billing periods
        where the meter has a metered price (``periods``).

        With ``first``, only until that many events are planned: :meth:`deliver_planned` plans
        the rest a slice ahead of the slice being sent (:mod:`.ahead`).
        """
        self.planned = PlanAhead(self._plan_days(aggregates, oldest, periods))
        self.planned.fill(first)

    def _plan_days(
        self, aggregates: dict[Key, DailyAggregate], oldest: int, periods: PeriodBook | None
    ) -> Iterator[tuple[Key, list[PlannedEvent], bool]]:
        """Plan each customer-day in turn, keep it in the book, and yield its events (and whether
        it is billed late)."""
        book = self.book
        count_events = sum(a.rows for a in aggregates.values() if book.specs[a.event_name].kind == COUNT)
        if count_events > MAX_COUNT_EVENTS:
            raise MeterUnsupportedError(
                f"{count_events} rows on count meters would be {count_events} events (one per row), over "
                f"the {MAX_COUNT_EVENTS} a run sends; count rows in SQL and bill them on a sum meter",
                {"type": "meter_unsupported", "count_events": count_events},
            )
        oldest_day = day_of(oldest)
        for name, spec in book.specs.items():
            keys = [key for key, aggregate in aggregates.items() if aggregate.event_name == name]
            if not keys:
                continue
            meter = self._meter_days(name, spec, keys, aggregates, periods)
            # A day whose usage lands in a period that ended waits on that period's draft: the
            # drafts are listed in the background while the other days are planned and sent,
            # and those days are planned last.
            deferred: list[Key] = []
            for key in keys:
                _, customer, usage_day = key
                if (
                    meter.in_periods
                    and periods is not None
                    and customer not in self.unknown
                    and usage_day >= oldest_day
                    and _waits_on_drafts(
                        aggregates[key],
                        spec,
                        meter.figures.get((customer, usage_day)),
                        periods,
                        oldest,
                        self.covers,
                    )
                ):
                    deferred.append(key)
                    continue
                yield self._plan_one(key, aggregates[key], meter, periods, oldest, oldest_day)
            for key in deferred:
                yield self._plan_one(key, aggregates[key], meter, periods, oldest, oldest_day)

    def _meter_days(
        self,
        name: str,
        spec: MeterSpec,
        keys: list[Key],
        aggregates: dict[Key, DailyAggregate],
        periods: PeriodBook | None,
    ) -> _MeterDays:
        """What planning the customer-days ``keys`` of meter ``name`` reads of the ledger: one query for
        the days' figures, one for the rows of the days split at a period boundary."""
        days = [day for _, _, day in keys]
        newest = spec.kind not in (ADD, COUNT)
        if self.book.unchanged is not None and not newest:
            # The database left out the days the ledger holds: the few that came back are read
            # by day, or by customer where a day brought back few (not every day between).
            figures = self.ledger.figures_of(
                self.account, spec.meter_id, [(customer, day) for _, customer, day in keys]
            )
        else:
            figures = self.ledger.figures(self.account, spec.meter_id, min(days), max(days), newest=newest)
        in_periods = periods is not None and periods.covers(name)
        split = [key for key in keys if aggregates[key].parts] if in_periods else []
        # A split day is planned part by part, from its rows (a few per customer a period).
        by_day: dict[tuple[str, date], list[Entry]] = defaultdict(list)
        if split:
            for entry in self.ledger.entries_of(
                self.account,
                spec.meter_id,
                {customer for _, customer, _ in split},
                min(day for _, _, day in split),
                max(day for _, _, day in split),
            ):
                by_day[(entry.customer_id, entry.day)].append(entry)
        return _MeterDays(spec, figures, in_periods, by_day)

    def _plan_one(
        self,
        key: Key,
        aggregate: DailyAggregate,
        meter: _MeterDays,
        periods: PeriodBook | None,
        oldest: int,
        oldest_day: date,
    ) -> tuple[Key, list[PlannedEvent], bool]:
        """Plan one customer-day, keep it in the book, and say what it sends (and whether late)."""
        book, spec, covers = self.book, meter.spec, self.covers
        _, customer, usage_day = key
        figure = meter.figures.get((customer, usage_day))
        truth = covers.truth(usage_day, figure.source_at) if figure is not None and covers else False
        # Usage of a day older than Stripe's window is billed late (counted apart).
        late = usage_day < oldest_day
        if customer in self.unknown:
            plan = plan_day(aggregate, spec, figure, now=book.now, oldest=oldest, truth=truth)
            unknown = hold_unknown(plan)
            if unknown is not None:
                # Not sent, not written: the first run after the customer exists sends it.
                book.hold(unknown, plan)
                day = CustomerDay(aggregate, plan, DayOutcome.CUSTOMER_UNKNOWN, held=True)
                (book.late if late else book.days)[key] = day
                return key, plan.events, late
            held: list[Held] = []
        elif meter.in_periods:
            assert periods is not None
            if late:
                # Billed late, at the oldest instant Stripe accepts: in the period that holds it.
                plan, held = plan_late_in_periods(
                    aggregate,
                    spec,
                    figure,
                    periods,
                    now=book.now,
                    oldest=oldest,
                    carry=self.settings.carry,
                    truth=truth,
                )
            else:
                plan, held = plan_in_periods(
                    aggregate,
                    spec,
                    figure,
                    meter.by_day.get((customer, usage_day)),
                    periods,
                    now=book.now,
                    oldest=oldest,
                    carry=self.settings.carry,
                    truth=truth,
                )
            for part in held:
                book.hold(part, plan)
        else:
            plan = plan_day(aggregate, spec, figure, now=book.now, oldest=oldest, truth=truth)
            held = []
        day = CustomerDay(aggregate, plan, held=bool(held))
        if plan.reason == OLDER_VIEW and plan.expected != plan.recorded:
            # Left alone (an hourly run retried after the nightly one, or the day's newest
            # row deleted since): shown, so a deletion is not missed.
            book.samples.add("older_view", {**plan.line(), "reason": OLDER_VIEW})
        if plan.reason == UNSETTLED:
            day.outcome = DayOutcome.FAILED
            book.samples.add(DayOutcome.FAILED, {**plan.line(), "reason": UNSETTLED})
        (book.late if late else book.days)[key] = day
        return key, plan.events, late

    # -- delivery --------------------------------------------------------------------------------

    def _all_days(self) -> dict[Key, CustomerDay]:
        return {**self.book.days, **self.book.late}

    def deliver_planned(self) -> None:
        """Write, send and resolve every planned event, a slice at a time, planning the next
        slice while the requests of the one before are out."""
        planned, book = self.planned, self.book
        while batch := planned.take(SLICE):
            ahead = partial(planned.fill_quietly, SLICE)
            if not planned.done:
                self.meanwhile.append(ahead)
            days = {key: book.days[key] if key in book.days else book.late[key] for key, _ in batch}
            self._deliver_slice(batch, days)
            if ahead in self.meanwhile:
                # Nothing of the slice was sent (another run had it): the next take() plans.
                self.meanwhile.remove(ahead)

    def _deliver_slice(
        self, batch: Sequence[tuple[Key, Sequence[PlannedEvent]]], days: dict[Key, CustomerDay]
    ) -> None:
        now = self.clock.now()
        specs = self.book.specs
        entries = [
            Entry(
                account=self.account,
                meter_id=specs[e.event_name].meter_id,
                event_name=e.event_name,
                customer_id=e.customer_id,
                day=e.day,
                seq=e.seq,
                identifier=e.identifier,
                value=e.value,
                stamp=e.timestamp,
                source_at=e.source_at,
                state="pending",
                run_id=self.writer.run_id,
                attempt=self.writer.attempt,
                sent_at=now,
                note=f"carried from the period ending {rfc3339(e.carried_from)}" if e.carried_from else "",
                part=e.part,
                period_end=e.period_end,
            )
            for _, events in batch
            for e in events
        ]
        owned = self.ledger.insert(entries)
        self.figures["written"] += len(owned)
        to_send: list[PlannedEvent] = []
        released: list[Change] = []
        for key, events in batch:
            if all(e.identifier in owned for e in events):
                to_send.extend(events)
                continue
            # Another run planned the same next event for this day at the same time: the table's
            # key let one of them in. This run stands back; its retry plans the day again.
            released += [
                Change(e.identifier, REJECTED, now, "another run billed this day at the same time")
                for e in events
                if e.identifier in owned
            ]
            days[key].outcome = DayOutcome.FAILED
            self.book.samples.add(
                DayOutcome.FAILED,
                {**days[key].plan.line(), "reason": "another run billed this day at the same time"},
            )
        self.ledger.resolve(self.account, released)
        changes, failed = self.deliver(to_send)
        self.ledger.resolve(self.account, changes)
        self._record_outcomes(to_send, changes, failed, days)

    def _record_outcomes(
        self,
        sent: list[PlannedEvent],
        changes: list[Change],
        failed: set[str],
        days: dict[Key, CustomerDay],
    ) -> None:
        """Each customer-day's outcome from what became of its events ``sent``: withheld events
        held, then unconfirmed (a foreign duplicate), rejected, failed or sent, in that order."""
        rejected = {c.identifier for c in changes if c.state == REJECTED and c.note != WITHHELD}
        foreign = {c.identifier for c in changes if c.state == UNVERIFIED}
        withheld = {c.identifier for c in changes if c.state == REJECTED and c.note == WITHHELD}
        by_key: dict[Key, list[PlannedEvent]] = defaultdict(list)
        for event in sent:
            by_key[event.key].append(event)
        for key, events in by_key.items():
            ids = {e.identifier for e in events}
            day = days[key]
            kept = [e for e in events if e.identifier in withheld]
            if kept:
                day.held = True
                for e in kept:
                    self.book.hold(
                        Held(INVOICE_FINAL, e.value, e.timestamp, e.timestamp + 1, e.period_end, WITHHELD),
                        day.plan,
                    )
                if len(kept) == len(events):
                    continue
            if ids & foreign:
                day.outcome = DayOutcome.UNCONFIRMED
                self.book.samples.add(
                    DayOutcome.UNCONFIRMED,
                    {**day.plan.line(), "reason": FOREIGN, "identifiers": sorted(ids & foreign)[:3]},
                )
            elif ids & rejected:
                day.outcome = DayOutcome.REJECTED
            elif ids & failed:
                day.outcome = DayOutcome.FAILED
            else:
                day.outcome = DayOutcome.SENT
                self.accepted[events[0].event_name].extend(ids - withheld)

    def deliver(self, events: list[PlannedEvent]) -> tuple[list[Change], set[str]]:
        """Send ``events`` through the run's API; return the ledger changes and the failed identifiers."""
        return self.delivery.send(events)

    def _deliver_resent(self, events: list[PlannedEvent]) -> tuple[list[Change], set[str]]:
        """:meth:`deliver` for an earlier run's pending events sent again while settling: what
        Stripe took is noted, so the meters' check after the last send covers it too (a meter
        deactivated meanwhile drops them with a 200 as it drops the plan's)."""
        changes, failed = self.deliver(events)
        took = {c.identifier for c in changes if c.state == ACCEPTED}
        for event in events:
            if event.identifier in took:
                self.resent[event.event_name].append(event.identifier)
        return changes, failed

    @property
    def meanwhile(self) -> list[Callable[[], None]]:
        """Work done while the first requests are out (:attr:`.delivering.Delivery.meanwhile`)."""
        return self.delivery.meanwhile

    @meanwhile.setter
    def meanwhile(self, work: list[Callable[[], None]]) -> None:
        self.delivery.meanwhile = work

    # -- corrections and checks ------------------------------------------------------------------

    def cancel_over(self) -> None:
        """Cancel the newest events of ``count`` days with more events than rows, where Stripe allows it."""
        days = self._all_days()
        over = {key: day for key, day in days.items() if day.plan.cancel}
        if not over:
            return
        by_meter: dict[str, list[Key]] = defaultdict(list)
        for key in over:
            name, _, _ = key
            by_meter[name].append(key)
        now = self.clock.now()
        for name, keys in by_meter.items():
            spec = self.book.specs[name]
            entries = self.ledger.entries_of(
                self.account,
                spec.meter_id,
                {customer for _, customer, _ in keys},
                min(day for _, _, day in keys),
                max(day for _, _, day in keys),
            )
            by_key: dict[Key, list[Entry]] = defaultdict(list)
            for entry in entries:
                if entry.state == ACCEPTED:
                    by_key[entry.key].append(entry)
            for key in keys:
                day = over[key]
                newest_first = sorted(by_key[key], key=lambda e: e.seq, reverse=True)
                if day.plan.cancel_parts:
                    # A split day: each part's own newest events, so each invoice loses its own.
                    newest = [
                        e
                        for (start, end), n in day.plan.cancel_parts.items()
                        for e in [e for e in newest_first if _in_part(e, start, end)][:n]
                    ]
                else:
                    newest = newest_first[: day.plan.cancel]
                cancellable = [e for e in newest if e.answered_at and now - e.answered_at < CANCEL_WINDOW]
                if len(cancellable) < day.plan.cancel:
                    day.outcome = DayOutcome.OVER
                    self.book.samples.add(
                        DayOutcome.OVER,
                        {
                            **day.plan.line(),
                            "reason": "fewer rows than events, and Stripe cancels events only within 24 "
                            "hours of receiving them: credit the customer",
                        },
                    )
                    continue
                # Marked before the cancel leaves: a run killed in between cancels again next time.
                self.ledger.resolve(
                    self.account, [Change(e.identifier, CANCELLING, e.answered_at, "") for e in cancellable]
                )
                changes: list[Change] = []
                for entry in cancellable:
                    self.stripe.cancel_meter_event(entry.event_name, entry.identifier)
                    changes.append(
                        Change(entry.identifier, CANCELLED, self.clock.now(), "source has fewer rows")
                    )
                self.ledger.resolve(self.account, changes)
                self.figures["cancelled"] += len(changes)
                day.outcome = DayOutcome.SENT

    def check_meters(self) -> None:
        """Read each meter sent to once more: Stripe drops events of a meter deactivated meanwhile.

        One request per meter. A meter inactive now, or deactivated and reactivated since the
        run planned, leaves this run's events ``unverified`` in the ledger: the next run (the
        meter active again) settles them from Stripe's summaries and sends what was dropped.
        """
        book = self.book
        for name in sorted({n for n, ids in [*self.accepted.items(), *self.resent.items()] if ids}):
            spec = book.specs[name]
            meter = self.stripe.retrieve_meter(spec.meter_id)
            deactivated_at = (meter.get("status_transitions") or {}).get("deactivated_at")
            if meter.get("status") == "active" and deactivated_at == book.deactivated_at.get(name):
                continue
            book.deactivated.add(name)
            self.ledger.resolve(
                self.account,
                [
                    Change(i, UNVERIFIED, self.clock.now(), "meter deactivated during the run")
                    for i in [*self.accepted[name], *self.resent[name]]
                ],
            )
            # An earlier run's events sent again while settling belong to no day of this plan:
            # they are open again, for the next run to settle.
            self.figures["unsettled"] += len(self.resent[name])
            for identifier in self.resent[name][: self.settings.sample_limit]:
                book.samples.add(
                    "unsettled",
                    {
                        "identifier": identifier,
                        "reason": f"sent again while settling; meter {spec.meter_id} was deactivated "
                        "during the run",
                    },
                )
            for (event_name, _, _), day in self._all_days().items():
                if event_name == name and day.outcome == DayOutcome.SENT:
                    day.outcome = DayOutcome.UNCONFIRMED
                    book.samples.add(
                        DayOutcome.UNCONFIRMED,
                        {
                            **day.plan.line(),
                            "reason": f"meter {spec.meter_id} was deactivated during the run",
                        },
                    )

    def read_back(self) -> None:
        """Read back every customer sent to, once settled (``confirm="summaries"``).

        One summaries request per customer. A customer Stripe does not know had its events
        dropped: they are marked so in the ledger (the next run sends them again, once Stripe
        knows the customer) and the day is ``customer_unknown``. A figure that differs from the
        ledger's leaves the day ``unconfirmed`` and its events ``unverified``, for the next run
        to settle.
        """
        days = self._all_days()
        for name, identifiers in self.accepted.items():
            spec = self.book.specs[name]
            sent = {
                key: day
                for key, day in days.items()
                if day.aggregate.event_name == name and day.outcome == DayOutcome.SENT
            }
            if not sent:
                continue
            events = [e for day in sent.values() for e in day.plan.events]
            if not wait_for_summaries(self.ctx, self.delivery.last_answer):
                continue
            stamps = sorted({day_of(e.timestamp) for e in events})
            customers = sorted({customer for _, customer, _ in sent})
            found, unknown = self.stripe.recorded_per_day(
                spec.meter_id, customers, stamps[0], stamps[-1], max_rps=self.settings.read_rps
            )
            self.book.summary_requests += len(customers)
            rows = self.ledger.entries_stamped(
                self.account, spec.meter_id, customers, day_start(stamps[0]), day_end(stamps[-1])
            )
            by_stamp: dict[tuple[str, date], list[Entry]] = defaultdict(list)
            for row in rows:
                by_stamp[(row.customer_id, day_of(row.stamp))].append(row)
            mine = set(identifiers)
            changes: list[Change] = []
            for (_, customer, _), day in sent.items():
                ids = [e.identifier for e in day.plan.events if e.identifier in mine]
                if customer in unknown:
                    day.outcome = DayOutcome.CUSTOMER_UNKNOWN
                    changes += [
                        Change(i, DROPPED, self.clock.now(), "customer unknown to Stripe") for i in ids
                    ]
                    self.book.samples.add(
                        day.outcome, {**day.plan.line(), "reason": "Stripe does not know it"}
                    )
                    continue
                checks = {(customer, day_of(e.timestamp)) for e in day.plan.events}
                if all(stripe_view(spec, by_stamp[c]) == found.get(c, 0) for c in checks):
                    day.confirmed = True
                    continue
                day.outcome = DayOutcome.UNCONFIRMED
                changes += [Change(i, UNVERIFIED, self.clock.now(), "read back differs") for i in ids]
                self.book.samples.add(
                    day.outcome,
                    {
                        **day.plan.line(),
                        "reason": "Stripe accepted the events but its settled summary differs",
                    },
                )
            self.ledger.resolve(self.account, changes)


def _waits_on_drafts(
    aggregate: DailyAggregate,
    spec: MeterSpec,
    figure: DayFigure | None,
    periods: PeriodBook,
    oldest: int,
    covers: Coverage = NOTHING,
) -> bool:
    """Whether planning the day would wait on drafts not listed yet: some of its usage lies in a
    period that ended, and the day has something to send (then their listing is started)."""
    instants = [part.timestamp for part in aggregate.parts] if aggregate.parts else [aggregate.timestamp]
    ends = [
        end
        for end in (periods.ended_end(aggregate.event_name, aggregate.customer_id, t) for t in instants)
        if end is not None
    ]
    truth = figure is not None and covers.truth(aggregate.day, figure.source_at)
    if not ends or not plan_day(aggregate, spec, figure, now=periods.now, oldest=oldest, truth=truth).events:
        return False
    return periods.prefetch_drafts(min(ends))


def _in_part(entry: Entry, start: int, end: int) -> bool:
    """Whether ``entry`` bills the part ``[start, end)`` of its day (as :func:`.plans.part_figure`)."""
    return entry.part == start if entry.part else start <= entry.stamp < end


def _merge(aggregates: list[DailyAggregate]) -> dict[Key, DailyAggregate]:
    """One aggregate per customer-day: the rows of a day partly past Stripe's window come in two parts."""
    out: dict[Key, DailyAggregate] = {}
    for a in aggregates:
        key = (a.event_name, a.customer_id, a.day)
        known = out.get(key)
        if known is None:
            out[key] = a
            continue
        later = a if a.timestamp >= known.timestamp else known
        out[key] = DailyAggregate(
            a.event_name,
            a.customer_id,
            a.day,
            known.value + a.value,
            later.timestamp,
            known.rows + a.rows,
            later.last_value,
        )
    return out
