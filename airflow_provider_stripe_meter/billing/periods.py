"""Billing periods: which invoice a meter event lands on, and until when it can still get there.

Plain Python. Stripe bills a metered price from the events whose **timestamp** lies in the
customer's billing period; once the period's invoice finalizes, usage stamped in it and sent
later is billed nowhere (docs/invoices.md, "How Stripe bills a period"). So a UTC day that
straddles a period boundary is billed as two parts, each stamped inside its own period, and
usage is sent only while an invoice can still carry it. An instant of a (meter, customer) is:

* ``open``: the current period; its invoice is still to come.
* ``draft``: a period that ended and whose draft invoice finalizes later than the margin from now.
* ``final``: a period whose invoice finalized (or finalizes within the margin): too late.
* ``ended``: after the subscription ended: no invoice will ever carry it.
* ``none``: no subscription on the meter at that time (before it started, or none at all).

.. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/configure-grace-period
.. seealso:: https://docs.stripe.com/changelog/basil/2025-03-31/deprecate-subscription-current-period-start-and-end
"""

from __future__ import annotations

import bisect
import calendar
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from itertools import pairwise
from typing import Any, Final, NamedTuple

OPEN, DRAFT, FINAL, ENDED, NONE = "open", "draft", "final", "ended", "none"
#: States whose usage an invoice will still carry.
BILLABLE = (OPEN, DRAFT)
#: A draft whose finalization is nearer than this is treated as final: an event must land (and
#: Stripe's aggregation catch up) before the invoice locks.
FINALIZATION_MARGIN = 600


@dataclass(frozen=True, slots=True)
class Period:
    """One billing period ``[start, end)`` of a subscription item metered on a meter."""

    start: int
    end: int
    subscription: str
    #: When the period's draft invoice finalizes (``None``: no draft seen).
    finalizes_at: int | None = None
    #: The metered price the period bills the meter through.
    price: str = ""
    #: Its draft invoice finalizes only by hand (``auto_advance`` false): it takes usage until
    #: someone finalizes it, at a time no API tells in advance.
    manual: bool = False


class PeriodAt(NamedTuple):
    """The period holding an instant (``None``: none does), and when the subscription ended."""

    period: Period | None
    ended_at: int | None


@dataclass
class CustomerPeriods:
    """A customer's periods on one meter, oldest first, and when its subscription ended."""

    periods: list[Period]
    ended_at: int | None = None
    starts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.periods.sort(key=lambda p: p.start)
        self.starts = [p.start for p in self.periods]

    def at(self, instant: int) -> Period | None:
        """The period holding ``instant``, if any."""
        i = bisect.bisect_right(self.starts, instant) - 1
        if i >= 0 and instant < self.periods[i].end:
            return self.periods[i]
        return None

    def boundaries(self) -> list[int]:
        """Every instant a period starts or ends (where a day must be split)."""
        return sorted({p.start for p in self.periods} | {p.end for p in self.periods})


class PeriodBook:
    """The billing periods of every customer on the meters that have a metered price.

    A meter with no metered price is billed by UTC day alone (``covers`` is false for it): no
    invoice is built from it, so there is no period to land in.
    """

    def __init__(
        self,
        customers: Mapping[tuple[str, str], CustomerPeriods],
        metered: Iterable[str],
        now: int,
        margin: int = FINALIZATION_MARGIN,
    ) -> None:
        self.customers = customers if isinstance(customers, StoredPeriods) else dict(customers)
        self.metered = set(metered)
        self.now, self.margin = now, margin
        #: How long reading them took, and what it read (set by whoever read them).
        self.read_seconds = 0.0
        self.read_figures: dict[str, int] = {}
        #: Writes of the subscriptions table left for :meth:`save`.
        self.pending: list[Callable[[], None]] = []

    def save(self) -> None:
        """Write what reading the periods learnt to the subscriptions table (once). A write that
        fails is kept, with those after it, for the next call."""
        while self.pending:
            self.pending[0]()
            self.pending.pop(0)

    def covers(self, event_name: str) -> bool:
        """Whether the meter of ``event_name`` has a metered price (periods apply)."""
        return event_name in self.metered

    def split(self) -> Mapping[tuple[str, str], tuple[int, ...]]:
        """Per (event name, customer), the instants where its days split, ascending."""
        if isinstance(self.customers, StoredPeriods):
            return self.customers.split()
        return {key: tuple(c.boundaries()) for key, c in self.customers.items() if c.periods}

    def state(self, event_name: str, customer: str, instant: int) -> tuple[str, Period | None]:
        """Where usage at ``instant`` lands: ``open``, ``draft``, ``final``, ``ended`` or ``none``."""
        if isinstance(self.customers, StoredPeriods):
            if (event_name, customer) not in self.customers.raw:
                return NONE, None
            period, ended_at = self.customers.period_at((event_name, customer), instant)
        else:
            found = self.customers.get((event_name, customer))
            if found is None:
                return NONE, None
            period, ended_at = found.at(instant), found.ended_at
        if period is None:
            if ended_at is not None and instant >= ended_at:
                return ENDED, None
            return NONE, None
        if period.end > self.now:
            return OPEN, period
        locks = self.customers.locks if isinstance(self.customers, StoredPeriods) else None
        if locks is not None:
            finalizes_at, manual = locks.lock(period.subscription, period.end)
            period = replace(period, finalizes_at=finalizes_at, manual=manual)
        if period.manual or (
            period.finalizes_at is not None and self.now < period.finalizes_at - self.margin
        ):
            return DRAFT, period
        return FINAL, period

    def carries(
        self, event_name: str, customer: str, instant: int, period_end: int | None, at: float
    ) -> bool:
        """Whether an event stamped at ``instant`` in the period ending at ``period_end`` (what
        the plan placed it in) still lands on that period's invoice if it is sent at ``at``.

        Asked again at the instant each event is sent, so a delivery that outlasts a draft's
        finalization, or a run that resumes another's events, never sends usage billed nowhere.
        A period still open at ``at`` carries it; one that ended during the run, until Stripe's
        shortest grace period (less the margin) has passed, its draft not being known to the
        run; one that ended before, while its draft was open at planning and locks later than
        ``at`` plus the margin (a draft finalized by hand: always).
        """
        if period_end is None or period_end > at:
            return True
        if period_end > self.now:
            return at < period_end + SHORTEST_GRACE - self.margin
        state, period = self.state(event_name, customer, instant)
        if state != DRAFT or period is None:
            return False
        if period.manual:
            return True
        return period.finalizes_at is not None and at < period.finalizes_at - self.margin

    def billable(
        self, event_name: str, customer: str, instant: int, *, read_drafts: bool = True
    ) -> tuple[int, int] | None:
        """The ``open`` or ``draft`` period (start, end) holding ``instant``, if it is in one: what
        :meth:`state` tells, kept lean for the customer-days of a night (100,000 of them).

        With ``read_drafts`` false, a period that ended answers ``None`` without its draft being
        read (for a caller that reads it only when it has usage to send there)."""
        customers = self.customers
        if isinstance(customers, StoredPeriods):
            key = (event_name, customer)
            found = customers.raw.get(key)
            if found is None:
                return None
            if len(found) > 1:
                return self._billable(event_name, customer, instant)
            _, _, _, _, ended_at, current_start, current_end, _ = found[0]
            if ended_at is None and current_start <= instant < current_end:
                # Inside the current period of a subscription with no end set (most of a night's
                # customer-days): no other boundary lies in it (see :class:`StoredPeriods`).
                lo, hi = current_start, current_end
            else:
                period = customers.period_at(key, instant).period
                if period is None:
                    return None
                lo, hi = period.start, period.end
            if hi > self.now:
                return lo, hi
            return self._billable(event_name, customer, instant) if read_drafts else None
        return self._billable(event_name, customer, instant)

    def ended_end(self, event_name: str, customer: str, instant: int) -> int | None:
        """The end of the period holding ``instant`` if that period has ended (then its draft
        decides whether usage still goes on it), without reading any draft; ``None`` otherwise."""
        if self.billable(event_name, customer, instant, read_drafts=False) is not None:
            return None  # open (most customer-days: answered from the current period)
        if isinstance(self.customers, StoredPeriods):
            period = self.customers.period_at((event_name, customer), instant).period
        else:
            found = self.customers.get((event_name, customer))
            period = found.at(instant) if found is not None else None
        return period.end if period is not None and period.end <= self.now else None

    def prefetch_drafts(self, end: int) -> bool:
        """Start listing, in the background, the drafts that say when periods ending at ``end``
        or later lock; ``False`` when they are listed already (or no draft is ever read)."""
        locks = self.customers.locks if isinstance(self.customers, StoredPeriods) else None
        return locks.prefetch(end) if locks is not None else False

    def invoices_read(self) -> int:
        """How many invoices the run read to learn when its periods lock (drafts, and the
        invoices of the last hour where a period ended then)."""
        if isinstance(self.customers, StoredPeriods) and self.customers.locks is not None:
            return self.customers.locks.invoices_read
        return 0

    def manual_drafts(self) -> list[tuple[str, int]]:
        """The (subscription, period end) of every draft the run found that finalizes only by hand."""
        if isinstance(self.customers, StoredPeriods) and self.customers.locks is not None:
            return self.customers.locks.manual()
        return sorted(
            {(p.subscription, p.end) for c in self.customers.values() for p in c.periods if p.manual}
        )

    def _billable(self, event_name: str, customer: str, instant: int) -> tuple[int, int] | None:
        state, period = self.state(event_name, customer, instant)
        return (period.start, period.end) if state in BILLABLE and period is not None else None

    def prices(self) -> set[str]:
        """The metered prices the customers' periods bill through (without building the periods)."""
        if isinstance(self.customers, StoredPeriods):
            return {price for rows in self.customers.raw.values() for _, price, *_ in rows if price}
        return {p.price for c in self.customers.values() for p in c.periods if p.price}

    def open_period(self, event_name: str, customer: str) -> Period | None:
        """The customer's current period on the meter (where carried usage goes), if any."""
        if isinstance(self.customers, StoredPeriods):
            period = self.customers.period_at((event_name, customer), self.now).period
        else:
            found = self.customers.get((event_name, customer))
            period = found.at(self.now) if found is not None else None
        return period if period is not None and period.end > self.now else None


#: Time ranges of one invoice listing read at once.
RANGES = 4
#: Stripe's shortest finalization grace period: a period that ended less long ago has not been
#: finalized automatically on any account, even if its draft is not listed yet.
SHORTEST_GRACE = 3600


class DraftLocks:
    """When each period that ended locks, read from that period's own draft invoice.

    A period's invoice is a draft from the period's end until it finalizes: automatically at the
    draft's ``automatically_finalizes_at`` (the account's grace period after the end, or later if
    finalization was postponed), by hand when ``auto_advance`` is false (then
    ``automatically_finalizes_at`` is null), or earlier if someone finalizes it. So no account-wide
    figure answers for a period: its draft does. A draft is matched to a period through its
    subscription (``parent.subscription_details.subscription``) and the service period of its
    metered line (``line.period``), never through the invoice's own ``period_start``/``period_end``
    (which bound when items could attach), so drafts of other kinds (manual, one-off,
    ``subscription_update``, threshold) are never taken for a period's.

    Drafts are listed only once a run has usage to send into a period that ended (a re-run that
    sends nothing lists none), from the start of that period's UTC day or of yesterday, whichever
    is earlier (a draft is made at its period's end or later): a night that bills yesterday lists
    yesterday's and today's drafts once, in :data:`RANGES` time ranges at once, on a thread of
    its own (:meth:`prefetch`) while the run plans and sends its other days. A period that ended
    with no draft listed is final, unless it ended less than :data:`SHORTEST_GRACE` ago: then the
    invoices of any status made since tell whether it was finalized at once, and if not it is a
    draft locking at that bound (no account finalizes sooner).

    .. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/configure-grace-period
    .. seealso:: https://docs.stripe.com/api/invoices/object#invoice_object-automatically_finalizes_at
    """

    def __init__(
        self,
        list_invoices: Callable[[int, int | None, str | None], Iterable[dict[str, Any]]],
        prices: Iterable[str],
        now: int,
    ) -> None:
        self._list = list_invoices
        self.prices = set(prices)
        self.now = now
        #: Drafts created at or after this instant have been listed (``None``: none yet).
        self.listed_from: int | None = None
        #: Invoices of any status created at or after this instant have been listed.
        self.recent_from: int | None = None
        #: (subscription, period end) -> (``automatically_finalizes_at``, finalizes only by hand).
        self.found: dict[tuple[str, int], tuple[int | None, bool]] = {}
        #: (subscription, period end) of invoices no longer drafts, among the recent ones.
        self.finalized: set[tuple[str, int]] = set()
        #: Invoices read (for the run's figures).
        self.invoices_read = 0
        self._lock = threading.Lock()
        #: The listing started ahead (:meth:`prefetch`), and what it raised.
        self._prefetch: threading.Thread | None = None
        self._failed: Exception | None = None

    def prefetch(self, end: int) -> bool:
        """List the drafts :meth:`lock` needs for periods ending at ``end`` or later on a thread
        of its own (a run plans other days meanwhile); ``False`` if they are listed already.
        (A listing already under way is waited for by the next :meth:`lock`.)"""
        # Not under the listing's lock: asked for every day planned while the listing runs.
        if self._prefetch is not None:
            return True
        if self._covered(end):
            return False
        self._prefetch = threading.Thread(target=self._cover, args=(end,), daemon=True)
        self._prefetch.start()
        return True

    def _covered(self, end: int) -> bool:
        return self.listed_from is not None and end >= self.listed_from

    def _cover(self, end: int) -> None:
        with self._lock:
            if self._covered(end):
                return
            # From the period end's UTC day, and at least from yesterday's start: a night (or an
            # hourly run over yesterday and today) lists once what it will ask about.
            lo = min(end - end % 86400, self.now - self.now % 86400 - 86400)
            try:
                self._read(lo, self.listed_from, "draft")
            except Exception as err:  # raised by the next lock(), on the run's thread
                self._failed = err
                return
            self.listed_from = lo

    def lock(self, subscription: str, end: int) -> tuple[int | None, bool]:
        """When the period of ``subscription`` that ended at ``end`` locks: (instant, by hand).
        ``(None, False)``: it is final (or no invoice carries it)."""
        key = (subscription, end)
        if self._prefetch is not None:  # the run's own thread: the only one that plans
            self._prefetch.join()
            self._prefetch = None
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        self._cover(end)
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        with self._lock:
            found = self.found.get(key)
            if found is not None or self.now >= end + SHORTEST_GRACE:
                return found if found is not None else (None, False)
            # Ended within the hour with no draft listed: its invoice is not made yet (the usage
            # goes on it), or it was finalized at once (by hand, or by a webhook handler); the
            # invoices of any status made since tell which.
            if self.recent_from is None or end < self.recent_from:
                self._read(end, self.recent_from, None)
                self.recent_from = end
            if key in self.finalized:
                return None, False
            return end + SHORTEST_GRACE, False

    def _read(self, lo: int, hi: int | None, status: str | None) -> None:
        """Read the invoices created in ``[lo, hi)``: a night's thousands of drafts are tens of
        pages, each waiting on the one before, so the range is listed in :data:`RANGES` slices
        at once."""
        top = hi if hi is not None else self.now + 1
        cuts = sorted({lo + (top - lo) * k // RANGES for k in range(1, RANGES)} - {lo, top})
        slices: list[tuple[int, int | None]] = [*pairwise([lo, *cuts]), ((cuts or [lo])[-1], hi)]
        if len(slices) == 1:
            self._note(self._list(lo, hi, status))
            return
        with ThreadPoolExecutor(max_workers=len(slices)) as pool:
            listed = [pool.submit(lambda a, b: list(self._list(a, b, status)), a, b) for a, b in slices]
            for future in listed:
                self._note(future.result())

    def _note(self, invoices: Iterable[dict[str, Any]]) -> None:
        for invoice in invoices:
            self.invoices_read += 1
            periods = draft_periods(invoice, self.prices)
            if invoice.get("status") != "draft":
                self.finalized.update((subscription, end) for subscription, _, end in periods)
                continue
            at = invoice.get("automatically_finalizes_at")
            # No scheduled finalization: with ``auto_advance`` off the draft is open until someone
            # finalizes it; with it on, Stripe's automatic finalization is overdue or failed
            # (``last_finalization_error``) and may happen at any moment: taken as final.
            lock = (int(at), False) if at is not None else (None, invoice.get("auto_advance") is False)
            for subscription, _, end in periods:
                known = self.found.get((subscription, end))
                # Two drafts carry the period (rare): the one that locks first decides.
                if known is None or _locks_sooner(lock, known):
                    self.found[(subscription, end)] = lock

    def manual(self) -> list[tuple[str, int]]:
        """The (subscription, period end) of the drafts read that finalize only by hand."""
        return sorted(key for key, (_, manual) in self.found.items() if manual)


def _locks_sooner(a: tuple[int | None, bool], b: tuple[int | None, bool]) -> bool:
    """Whether lock ``a`` comes before lock ``b`` (final first, by hand last)."""

    def rank(lock: tuple[int | None, bool]) -> float:
        at, manual = lock
        return float("inf") if manual else float("-inf") if at is None else float(at)

    return rank(a) < rank(b)


def invoice_subscription(invoice: Mapping[str, Any]) -> str | None:
    """The subscription an invoice was generated for (``None``: another kind of invoice).

    Since API version 2025-03-31.basil it is ``parent.subscription_details.subscription``.

    .. seealso:: https://docs.stripe.com/changelog/basil/2025-03-31/adds-new-parent-field-to-invoicing-objects
    """
    parent = invoice.get("parent") or {}
    if parent.get("type") != "subscription_details":
        return None
    found = (parent.get("subscription_details") or {}).get("subscription")
    if isinstance(found, dict):  # expanded
        found = found.get("id")
    return str(found) if found else None


def line_price(line: Mapping[str, Any]) -> str | None:
    """The price a line item bills (``pricing.price_details.price`` since 2025-03-31.basil)."""
    price = ((line.get("pricing") or {}).get("price_details") or {}).get("price")
    if isinstance(price, dict):  # expanded
        price = price.get("id")
    return str(price) if price else None


def draft_periods(invoice: Mapping[str, Any], prices: set[str]) -> list[tuple[str, int, int]]:
    """(subscription, service period start, end) of each of the invoice's lines on ``prices``
    billed for the invoice's subscription: the periods whose usage the invoice carries."""
    subscription = invoice_subscription(invoice)
    if subscription is None:
        return []
    out = []
    for line in (invoice.get("lines") or {}).get("data") or []:
        if line_price(line) not in prices:
            continue
        details = (line.get("parent") or {}).get("subscription_item_details") or {}
        if details.get("subscription") not in (None, subscription):
            continue
        period = line.get("period") or {}
        if period.get("start") is not None and period.get("end") is not None:
            out.append((subscription, int(period["start"]), int(period["end"])))
    return out


class StoredPeriods(Mapping[tuple[str, str], CustomerPeriods]):
    """Customers' periods from stored boundaries, built only for the customers asked about.

    A nightly run of 100,000 customers needs every customer's boundaries (to split the days that
    hold one) but the periods of only the few whose usage it plans against them.

    The boundaries of a subscription are worked out around its current period (Stripe's own
    ``current_period_start`` and ``current_period_end``, :func:`customer_periods`): none lies
    inside it. So for a customer with one subscription and no end or cancellation set, an
    instant or a day inside its current period is answered from that period alone, without
    reading its boundaries (most of a night's 100,000 customer-days).
    """

    def __init__(self, locks: DraftLocks | None) -> None:
        #: When each period that ended locks (``None``: no draft known, every ended period is final).
        self.locks = locks
        #: Per customer, its subscriptions' rows (:data:`StoredRow`), their boundaries parsed
        #: when the customer is first asked about an instant outside its current period.
        self.raw: dict[tuple[str, str], list[StoredRow]] = {}
        self._built: dict[tuple[str, str], CustomerPeriods] = {}

    def entries(self, key: tuple[str, str]) -> list[ParsedRow] | None:
        """The customer's rows, their boundaries parsed."""
        found = self.raw.get(key)
        if found is not None:
            for i, row in enumerate(found):
                found[i] = _parse(row)
        return found  # type: ignore[return-value]

    def forget(self, key: tuple[str, str], subscription: str) -> None:
        """Drop the customer's entry for ``subscription`` (it changed, or left the meter)."""
        entries = [row for row in self.raw.get(key, ()) if row[SUBSCRIPTION] != subscription]
        if entries:
            self.raw[key] = entries
        else:
            self.raw.pop(key, None)
        self._built.pop(key, None)

    def __getitem__(self, key: tuple[str, str]) -> CustomerPeriods:
        built = self._built.get(key)
        if built is None:
            periods: list[Period] = []
            entries = self.entries(key)
            if entries is None:
                raise KeyError(key)
            # The customer's subscriptions ended when the last of them did (none while one runs).
            ends = [ended_at for _, _, _, _, ended_at, *_ in entries]
            ended = None if None in ends else max(e for e in ends if e is not None)
            for subscription, price, bounds, start_date, ended_at, *_ in entries:
                for lo, hi in pairwise(bounds):
                    if lo < start_date or (ended_at is not None and lo >= ended_at):
                        continue
                    hi = min(hi, ended_at) if ended_at is not None else hi
                    periods.append(self._period(lo, hi, subscription, price))
            built = self._built[key] = CustomerPeriods(periods, ended)
        return built

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def period_at(self, key: tuple[str, str], instant: int) -> PeriodAt:
        """The period holding ``instant`` and when the subscription ended, without building the
        customer's other periods (a run asks once per customer-day)."""
        entries = self.entries(key)
        if entries is None:
            return PeriodAt(None, None)
        if len(entries) > 1:
            found = self[key]
            return PeriodAt(found.at(instant), found.ended_at)
        subscription, price, bounds, start_date, ended_at, *_ = entries[0]
        i = bisect.bisect_right(bounds, instant)
        if i == 0 or i == len(bounds) or instant < start_date:
            return PeriodAt(None, ended_at)
        lo, hi = bounds[i - 1], bounds[i]
        if ended_at is not None:
            if lo >= ended_at:
                return PeriodAt(None, ended_at)
            hi = min(hi, ended_at)
        if instant >= hi:
            return PeriodAt(None, ended_at)
        return PeriodAt(self._period(lo, hi, subscription, price), ended_at)

    def _period(self, lo: int, hi: int, subscription: str, price: str) -> Period:
        """The period ``[lo, hi)``; when it locks is read from its draft only when a run asks
        where usage in it lands (:meth:`PeriodBook.state`): most periods it builds are never asked."""
        return Period(lo, hi, subscription, None, price)

    def split(self) -> Mapping[tuple[str, str], tuple[int, ...]]:
        """Per customer, every boundary of its subscriptions, ascending (a view: nothing built)."""
        return _Boundaries(self.raw)


#: One subscription of a customer on a meter, as the subscriptions table gives it: (subscription,
#: price, boundaries, start, end or cancellation, current period start, current period end,
#: customer), the boundaries still as stored ("b1,b2,...") or parsed. A run keeps 100,000 of them
#: as the driver returns them: a named record built per row took 60% longer to read the table
#: into the book, and reading fields by name a third longer than unpacking them.
StoredRow = tuple[str, str, "tuple[int, ...] | str", int, "int | None", int, int, str]
#: The same, its boundaries parsed.
ParsedRow = tuple[str, str, tuple[int, ...], int, "int | None", int, int, str]
#: Where a row holds its subscription and its boundaries.
SUBSCRIPTION: Final = 0
BOUNDS: Final = 2


def _parse(row: StoredRow) -> ParsedRow:
    subscription, price, bounds, *rest = row
    if not isinstance(bounds, str):
        return row  # type: ignore[return-value]
    return (subscription, price, tuple(map(int, bounds.split(","))) if bounds else (), *rest)  # type: ignore[return-value]


class _Boundaries(Mapping[tuple[str, str], tuple[int, ...]]):
    """Every boundary of each customer's subscriptions, read from the entries when asked."""

    def __init__(self, raw: dict[tuple[str, str], list[StoredRow]]):
        self.raw = raw

    def __getitem__(self, key: tuple[str, str]) -> tuple[int, ...]:
        entries = self.raw[key]
        for i, entry in enumerate(entries):
            entries[i] = _parse(entry)
        return _merged(entries)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def split_on(self, start: int, end: int) -> set[str]:
        """The customers with a boundary strictly between ``start`` and ``end`` (a day, or what
        a run can see of it). A customer whose current period holds the whole span has none
        there, and is passed over without its boundaries (see :class:`StoredPeriods`)."""
        found: set[str] = set()
        if start >= end:
            return found
        for key, entries in self.raw.items():
            if len(entries) == 1:
                _, _, _, _, ended_at, current_start, current_end, _ = entries[0]
                if ended_at is None and current_start <= start and end <= current_end:
                    continue
            bounds = self[key]
            i = bisect.bisect_right(bounds, start)
            if i < len(bounds) and bounds[i] < end:
                _, customer = key
                found.add(customer)
        return found

    def items(self) -> Iterator[tuple[tuple[str, str], tuple[int, ...]]]:  # type: ignore[override]
        for key, entries in self.raw.items():
            if len(entries) == 1:
                row = entries[0] = _parse(entries[0])
                yield key, row[BOUNDS]
            else:
                yield key, self[key]


def _merged(rows: list[ParsedRow]) -> tuple[int, ...]:
    return rows[0][BOUNDS] if len(rows) == 1 else tuple(sorted({b for row in rows for b in row[BOUNDS]}))


def add_months(anchor: int, months: int) -> int:
    """``anchor`` plus ``months`` calendar months; a day the month lacks becomes its last day."""
    moment = datetime.fromtimestamp(anchor, tz=timezone.utc)
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    _, days_in_month = calendar.monthrange(year, month)
    day = min(moment.day, days_in_month)
    return int(moment.replace(year=year, month=month, day=day).timestamp())


def _boundary(anchor: int, interval: str, count: int, n: int) -> int:
    if interval == "month":
        return add_months(anchor, n * count)
    if interval == "year":
        return add_months(anchor, 12 * n * count)
    return anchor + n * count * {"day": 86400, "week": 7 * 86400}[interval]


def _index_at(anchor: int, interval: str, count: int, moment: int) -> int:
    """The last ``n`` whose boundary is at or before ``moment`` (0 if none is), found from an
    estimate rather than by counting every interval since the anchor."""
    per = {"day": 86400, "week": 7 * 86400, "month": 28 * 86400, "year": 365 * 86400}[interval] * count
    n = max(0, (moment - anchor) // per)
    while n > 0 and _boundary(anchor, interval, count, n) > moment:
        n -= 1
    while _boundary(anchor, interval, count, n + 1) <= moment:
        n += 1
    return n


def customer_periods(
    subscription: Mapping[str, Any],
    item: Mapping[str, Any],
    since: int,
    drafts: Mapping[tuple[str, int], int],
    *,
    grace: int | None = None,
    until: int | None = None,
) -> CustomerPeriods:
    """A subscription item's periods from ``since`` to its current one, or up to ``until``.

    Stripe gives only the current period; earlier ones follow from the anchor and the price's
    interval (months counted from the anchor, clamped to each month's last day), back to the
    subscription's start. ``drafts`` maps (subscription, period end) to when its draft invoice
    finalizes; otherwise a period finalizes ``grace`` seconds after its end (``None``: unknown,
    so a period that ended counts as final). Periods that began after the item's current one,
    up to ``until``, follow from the anchor too (a subscription read before it renewed), but
    never past ``cancel_at``.
    """
    sub_id = str(subscription["id"])
    anchor = int(subscription.get("billing_cycle_anchor") or item["current_period_start"])
    start_date = int(subscription.get("start_date") or anchor)
    ended_at = subscription.get("ended_at")
    cancel_at = subscription.get("cancel_at")
    if ended_at is None and cancel_at is not None and until is not None and int(cancel_at) <= until:
        ended_at = cancel_at  # it ended since it was read
    recurring = (item.get("price") or {}).get("recurring") or {}
    interval, count = str(recurring.get("interval") or "month"), int(recurring.get("interval_count") or 1)
    current_start, current_end = int(item["current_period_start"]), int(item["current_period_end"])
    bounds = [current_end, current_start]
    # Earlier boundaries, from the anchor's n-th interval back, until before ``since``.
    n = _index_at(anchor, interval, count, current_start)
    while bounds[-1] > max(since, start_date) and n >= 0:
        b = _boundary(anchor, interval, count, n)
        if b < bounds[-1]:
            bounds.append(b)
        n -= 1
    if bounds[-1] > start_date and bounds[-1] > since:
        bounds.append(start_date)  # the prorated first period, before the anchor
    if until is not None and ended_at is None:
        k = _index_at(anchor, interval, count, current_end)
        if _boundary(anchor, interval, count, k) < current_end:
            k += 1
        last = current_end
        while last <= until:  # the period starting at ``last`` has begun: add its end
            k += 1
            nxt = _boundary(anchor, interval, count, k)
            if cancel_at is not None:
                nxt = min(nxt, int(cancel_at))
            if nxt <= last:
                break
            bounds.append(nxt)
            last = nxt
    bounds = sorted(set(bounds))
    periods = []
    for lo, hi in pairwise(bounds):
        if lo < start_date:
            continue
        if ended_at is not None:
            if lo >= int(ended_at):
                continue
            hi = min(hi, int(ended_at))
        finalizes = drafts.get((sub_id, hi), hi + grace if grace is not None else None)
        periods.append(Period(lo, hi, sub_id, finalizes, str((item.get("price") or {}).get("id") or "")))
    return CustomerPeriods(periods, int(ended_at) if ended_at is not None else None)
