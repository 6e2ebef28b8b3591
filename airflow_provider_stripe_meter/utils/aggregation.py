"""Daily usage aggregation: raw usage rows in, one meter event per (event name, customer, UTC day) out.

Plain Python (no Airflow, no stripe). Values are summed exactly as integers (never through
float). Every row ends up in exactly one place: an aggregate, or a counted problem
(``invalid``, ``skipped_too_old``, ``skipped_future``) with a bounded sample for the report.
A sample names its row by position in the source counting from 1 (``"row": 3`` is the third
row), as a person counts rows in a query's result.

Each aggregate carries the timestamp of its **latest row** (to the second). That instant lies
inside the UTC day the aggregate sums, so the event lands in the billing period holding that day's
usage, and it is never earlier than any usage it covers; being a real row's time it also passed
the 35-day check that every row passed.

Rows are processed chunk by chunk. A chunk in the common shape of a daily query (tuples, integer
values, naive or datetime timestamps all on one UTC day, inside the window) takes a fast path
that checks the whole chunk with C-level built-ins and then does one dictionary update per row;
any other chunk goes row by row through the general path. Both give the same result.
"""

from __future__ import annotations

import gc
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone, tzinfo
from itertools import compress, repeat
from operator import attrgetter, eq, itemgetter
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.utils.days import EPOCH_ORDINAL, SECONDS_PER_DAY, day_numbered, iso_utc
from airflow_provider_stripe_meter.utils.rules import (
    FUTURE_TOLERANCE,
    MAX_VALUE,
    MAX_VALUE_DIGITS,
    NAIVE_TIMEZONE,
    PAST_WINDOW,
    MeterEventInputError,
    to_unix_seconds,
    validate_customer_id,
    validate_event_name,
    validate_value,
)

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.utils.unchanged import Unchanged

#: Rows must be this much younger than Stripe's 35 days, so none expires between check and send.
DEFAULT_SAFETY_MARGIN = timedelta(hours=1)
DEFAULT_SAMPLE_LIMIT = 20
_EPOCH = datetime(1970, 1, 1)
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=timezone.utc)
_SECOND = timedelta(seconds=1)
_GET_TZINFO = attrgetter("tzinfo")
_GET_MICROSECOND = attrgetter("microsecond")
_TO_ORDINAL = datetime.toordinal
#: A chunk spanning more UTC days than this goes row by row.
_FAST_MAX_DAYS = 7
_fromisoformat = datetime.fromisoformat


@dataclass(slots=True)
class DailyAggregate:
    """One customer's usage of one meter on one UTC day, ready to send as one event."""

    event_name: str
    customer_id: str
    day: date
    #: The day's sum of the rows' values.
    value: int
    #: Unix seconds of the day's latest row.
    timestamp: int
    #: How many rows the day had (what a ``count`` meter bills).
    rows: int
    #: The value of the day's latest row (what a ``last`` meter bills), to the second (Stripe's
    #: timestamps are whole seconds); of rows in the same latest second, the greatest value wins,
    #: so the figure does not hang on the order a database returns rows in (a query without
    #: ``ORDER BY`` has none, and an aggregation pushed into SQL sees none).
    last_value: int = 0
    #: A day split at billing period boundaries: its parts, each aggregated like a day, in
    #: time order (empty: the day is one part).
    parts: tuple[DayPart, ...] = ()


@dataclass(frozen=True, slots=True)
class DayPart:
    """The rows of one slice ``[start, end)`` of a UTC day: a day split at a billing period boundary."""

    start: int
    end: int
    value: int
    #: Unix seconds of the part's latest row.
    timestamp: int
    rows: int
    last_value: int


@dataclass
class ProblemLog:
    """Counts per kind of problem, with the first few examples of each."""

    limit: int = DEFAULT_SAMPLE_LIMIT
    counts: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, kind: str, detail: dict[str, Any], count: int = 1) -> None:
        """Count ``count`` problems of ``kind``; keep ``detail`` if the sample is not full."""
        self.counts[kind] += count
        bucket = self.samples.setdefault(kind, [])
        if len(bucket) < self.limit:
            bucket.append(detail)


class UsageAggregator:
    """Sum usage rows per (event name, customer, UTC day), checking every row.

    :param event_name: The event name for every row; ``None`` to read it from each row.
    :param now: Unix seconds the 35-day window and the 5-minute future limit are measured from.
    :param columns: Names of the fields in mapping rows, and their order in tuple rows:
        customer id, value, timestamp, then event name when ``event_name`` is ``None``.
    :param naive_timezone: Zone for timestamps without one (SQL ``timestamp`` columns usually
        have none; default UTC, as the single-event operator reads them); ``None`` rejects them.
    :param safety_margin: How much younger than 35 days a row must be.
    :param keep_too_old: Aggregate rows older than that into :attr:`too_old` (to be billed at
        the oldest instant Stripe accepts) instead of skipping them.
    :param sample_limit: How many examples of each problem to keep.
    :param split: Per (event name, customer), the instants where its days split (billing period
        boundaries, ascending): a day holding one is aggregated in parts, one per slice.
    """

    def __init__(
        self,
        *,
        event_name: str | None,
        now: int,
        columns: Sequence[str] = ("customer_id", "value", "timestamp", "event_name"),
        naive_timezone: tzinfo | None = NAIVE_TIMEZONE,
        safety_margin: timedelta = DEFAULT_SAFETY_MARGIN,
        sample_limit: int = DEFAULT_SAMPLE_LIMIT,
        keep_too_old: bool = False,
        split: Mapping[tuple[str, str], Sequence[int]] | None = None,
    ) -> None:
        self.event_name = validate_event_name(event_name) if event_name is not None else None
        # (event name, customer) -> boundaries (read only for the rows of a split day), and per
        # UTC day number the customers split on it: only boundaries inside a day this aggregator
        # can see, and not at midnight, split one. Worked out per day as rows of the day come,
        # for the first LAZY_DAYS days (a night's source holds one or two), then for the whole
        # window at once.
        self._split: Mapping[tuple[str, str], Sequence[int]] = split or {}
        self._split_days: dict[int, set[str]] = {}
        self._split_window = (
            (now - int(PAST_WINDOW.total_seconds())) // SECONDS_PER_DAY * SECONDS_PER_DAY,
            now + int(FUTURE_TOLERANCE.total_seconds()),
        )
        self._split_whole = not split
        self.columns = tuple(columns[:3] if event_name is not None else columns[:4])
        self.naive_timezone = naive_timezone
        self.oldest = now - int((PAST_WINDOW - safety_margin).total_seconds())
        self.newest = now + int(FUTURE_TOLERANCE.total_seconds())
        self.problems = ProblemLog(sample_limit)
        self.rows = 0
        #: Chunks that took the fast path (the rest went row by row).
        self.fast_chunks = 0
        # (event name, customer, UTC day number) -> [sum, latest unix seconds, rows, latest row's value]
        self._totals: dict[tuple[Any, ...], list[int]] = {}
        self._finished: list[DailyAggregate] | None = None
        self.keep_too_old = keep_too_old
        self._too_old_totals: dict[tuple[Any, ...], list[int]] = {}
        #: With ``keep_too_old``: rows older than the window, and their aggregates (after finish()).
        self.too_old_rows = 0
        self.too_old: list[DailyAggregate] = []
        #: Customer-days the database found the ledger already holds (``None``: not subtracted).
        self.unchanged: Unchanged | None = None
        # Fast path, fixed event name: UTC day number -> customer -> [sum, latest naive-UTC
        # datetime, rows, latest value]; folded into _totals when the aggregates are read.
        self._fast_days: dict[int, dict[str, list[Any]]] = {}
        self._good_customers: set[str] = set()
        self._good_events: set[str] = set()
        utc_naive = naive_timezone is not None and naive_timezone.utcoffset(None) == timedelta(0)
        self._fast_ok = event_name is not None and utc_naive
        self._oldest_naive = _EPOCH + timedelta(seconds=self.oldest)
        self._newest_naive = _EPOCH + timedelta(seconds=self.newest)

        #: Where the rows were aggregated: ``"worker"`` (here, row by row) or ``"database"``
        #: (pushed into SQL, :mod:`airflow_provider_stripe_meter.pushdown`), and why.
        self.path = "worker"
        self.path_reason = ""
        #: What the database did, when it aggregated (statements, rows handed back, seconds).
        self.database: dict[str, Any] | None = None

    @property
    def split_bounds(self) -> Mapping[tuple[str, str], Sequence[int]]:
        """Per (event name, customer), the instants where its days split (as given)."""
        return self._split

    def split_customers(self, day: int) -> set[str] | frozenset[str]:
        """The customers whose UTC day ``day`` (day number) the aggregator splits into parts."""
        return self._split_on(day)

    @property
    def split_window(self) -> tuple[int, int]:
        """The instants ``(lo, hi]`` whose boundaries split a day: the days this aggregator sees."""
        return self._split_window

    # -- feeding ---------------------------------------------------------------------------

    def add_rows(self, rows: Sequence[Any]) -> None:
        """Add one chunk of rows (tuples, lists or mappings)."""
        if self._finished is not None:
            raise RuntimeError("rows added after finish(): the aggregates were already read")
        if not rows:
            return
        # Rows are numbered from 1 across chunks: the first row of this chunk is ``start``.
        start = self.rows + 1
        self.rows += len(rows)
        if self._fast_ok and self._add_fast(rows):
            self.fast_chunks += 1
            return
        for number, row in enumerate(rows, start):
            self._add_one(number, row)

    def add_numbered(self, rows: Iterable[tuple[int, Any]]) -> None:
        """Check and aggregate rows given with their position in the source (from 1), one by one.

        For rows read out of a larger source (an aggregation pushed into the database hands
        back only the rows it cannot vouch for): samples name them by the given position.
        :attr:`rows` is not counted here (:meth:`add_groups` counts the source's rows).
        """
        if self._finished is not None:
            raise RuntimeError("rows added after finish(): the aggregates were already read")
        for number, row in rows:
            self._add_one(number, row)

    def add_groups(self, groups: Iterable[tuple[str, str, int, int | None, int, int, int, int]]) -> None:
        """Add rows already checked and aggregated elsewhere (in the database), group by group.

        Each group is (event name, customer, UTC day number, part start or ``None``, sum, latest
        unix second, rows, latest row's value): the same figures :meth:`add_rows` keeps per
        customer-day (or part of a split day). The event names and customers are checked here;
        a group that fails raises :class:`MeterEventInputError` (the caller vouched for its rows).
        """
        if self._finished is not None:
            raise RuntimeError("rows added after finish(): the aggregates were already read")
        for event_name, customer, day, part, total, latest, rows, last in groups:
            self._check_event_name(event_name)
            self._check_customer(customer)
            key = (event_name, customer, day) if part is None else (event_name, customer, day, part)
            self._merge(key, total, latest, rows, last)

    def add_too_old_groups(self, groups: Iterable[tuple[str, str, int, int, int, int, int]]) -> None:
        """Like :meth:`add_groups`, for rows older than the window kept apart (``keep_too_old``):
        (event name, customer, day number, sum, latest unix second, rows, latest row's value)."""
        for event_name, customer, day, total, latest, rows, last in groups:
            self._check_event_name(event_name)
            self._check_customer(customer)
            self.too_old_rows += rows
            self._merge((event_name, customer, day), total, latest, rows, last, into=self._too_old_totals)

    def _add_fast(self, rows: Sequence[Any]) -> bool:
        """Aggregate a whole chunk if it has the common shape; ``False`` leaves it untouched."""
        first = rows[0]
        if not isinstance(first, (tuple, list)) or len(first) < 3:
            return False
        try:
            customers = list(map(itemgetter(0), rows))
            values = list(map(itemgetter(1), rows))
            stamps = list(map(itemgetter(2), rows))
        except (IndexError, KeyError, TypeError):
            return False
        if set(map(type, values)) != {int}:
            return False
        stamp_types = set(map(type, stamps))
        if stamp_types == {str}:
            try:
                stamps = list(map(_fromisoformat, stamps))
            except ValueError:
                return False
        elif stamp_types != {datetime}:
            return False
        if set(map(_GET_TZINFO, stamps)) != {None}:
            return False
        if any(map(_GET_MICROSECOND, stamps)):
            # The latest row is found to the second, as the general path and SQL find it.
            stamps = [stamp.replace(microsecond=0) for stamp in stamps]
        first, last = min(stamps), max(stamps)
        if first < self._oldest_naive or last > self._newest_naive:
            return False
        first_day, last_day = first.toordinal(), last.toordinal()
        if last_day - first_day > _FAST_MAX_DAYS:
            return False
        new = set(customers) - self._good_customers
        for customer in new:
            if not _is_customer(customer):
                return False
        self._good_customers |= new

        if first_day == last_day:
            self._add_fast_day(first_day, customers, values, stamps)
            return True
        days = list(map(_TO_ORDINAL, stamps))
        for day in range(first_day, last_day + 1):
            picked = list(map(eq, days, repeat(day)))
            self._add_fast_day(
                day,
                list(compress(customers, picked)),
                list(compress(values, picked)),
                list(compress(stamps, picked)),
            )
        return True

    def _add_fast_day(
        self, ordinal: int, customers: list[str], values: list[int], stamps: list[datetime]
    ) -> None:
        day = ordinal - EPOCH_ORDINAL
        split = self._split_on(day)
        if split and not split.isdisjoint(customers):
            # Customers whose day holds a period boundary: their rows go to the day's parts.
            keep = [c not in split for c in customers]
            for customer, value, stamp, kept in zip(customers, values, stamps, keep, strict=True):
                if not kept:
                    seconds = _naive_utc_seconds(stamp)
                    self._merge(self._key(self.event_name, customer, seconds), value, seconds, 1, value)  # type: ignore[arg-type]
            customers = list(compress(customers, keep))
            values = list(compress(values, keep))
            stamps = list(compress(stamps, keep))
        totals = self._fast_days.get(day)
        if totals is None:
            totals = self._fast_days[day] = {}
        get = totals.get
        # One pass, one dictionary: [sum, latest naive-UTC datetime, rows, latest row's value].
        for customer, value, stamp in zip(customers, values, stamps, strict=True):
            entry = get(customer)
            if entry is None:
                totals[customer] = [value, stamp, 1, value]
            else:
                entry[0] += value
                entry[2] += 1
                if stamp > entry[1] or (stamp == entry[1] and value > entry[3]):
                    entry[1] = stamp
                    entry[3] = value

    def _merge(
        self,
        key: tuple[Any, ...],
        total: int,
        seconds: int,
        rows: int,
        last: int,
        into: dict[tuple[Any, ...], list[int]] | None = None,
    ) -> None:
        totals = self._totals if into is None else into
        entry = totals.get(key)
        if entry is None:
            totals[key] = [total, seconds, rows, last]
        else:
            entry[0] += total
            entry[2] += rows
            if seconds > entry[1] or (seconds == entry[1] and last > entry[3]):
                entry[1] = seconds
                entry[3] = last

    def _add_one(self, index: int, row: Any) -> None:
        """Check and aggregate one row; ``index`` is its position in the source, from 1."""
        try:
            customer, value, stamp, event_name = self._fields(row)
            event_name = self._check_event_name(event_name)
            customer = self._check_customer(customer)
            number = validate_value(value, limit=None)
            seconds = self.to_seconds(stamp)
        except MeterEventInputError as err:
            self.problems.add("invalid", {"row": index, **err.to_dict()})
            return
        if seconds < self.oldest and self.keep_too_old:
            self.too_old_rows += 1
            key = (event_name, customer, seconds // SECONDS_PER_DAY)
            self._merge(key, number, seconds, 1, number, into=self._too_old_totals)
            return
        if seconds < self.oldest:
            self.problems.add(
                "skipped_too_old", {"row": index, "customer_id": customer, "timestamp": iso_utc(seconds)}
            )
            return
        if seconds > self.newest:
            self.problems.add(
                "skipped_future", {"row": index, "customer_id": customer, "timestamp": iso_utc(seconds)}
            )
            return
        self._merge(self._key(event_name, customer, seconds), number, seconds, 1, number)

    def _split_on(self, day: int) -> set[str] | frozenset[str]:
        """The customers whose UTC day ``day`` (day number) holds a period boundary."""
        found = self._split_days.get(day)
        if found is not None or self._split_whole:
            return found or _NOBODY
        lo, hi = self._split_window
        by_day = getattr(self._split, "split_on", None)
        if by_day is None or len(self._split_days) >= LAZY_DAYS:
            self._split_days = self._whole_window(lo, hi)
            self._split_whole = True
            return self._split_days.get(day) or _NOBODY
        start = day * SECONDS_PER_DAY
        found = self._split_days[day] = by_day(max(start, lo), min(start + SECONDS_PER_DAY, hi + 1))
        return found

    def _whole_window(self, lo: int, hi: int) -> dict[int, set[str]]:
        """Per day number, the customers split on it, for every boundary in ``(lo, hi]``."""
        days: dict[int, set[str]] = {}
        for (_, customer), bounds in self._split.items():
            # Ascending: the boundaries inside the window are found by bisection (100,000
            # customers' boundaries, most of them outside it).
            for i in range(bisect_right(bounds, lo), bisect_right(bounds, hi)):
                b = bounds[i]
                if b % SECONDS_PER_DAY:
                    day_keys = days.get(b // SECONDS_PER_DAY)
                    if day_keys is None:
                        day_keys = days[b // SECONDS_PER_DAY] = set()
                    day_keys.add(customer)
        return days

    def _key(self, event_name: str, customer: str, seconds: int) -> tuple[Any, ...]:
        """The aggregate a row goes to: its customer-day, and the day's part when it is split."""
        day = seconds // SECONDS_PER_DAY
        if customer not in self._split_on(day):
            return (event_name, customer, day)
        bounds = self._split.get((event_name, customer), ())
        start = day * SECONDS_PER_DAY
        inside = [b for b in bounds if start < b < start + SECONDS_PER_DAY]
        if not inside:
            return (event_name, customer, day)
        part = max([start, *(b for b in inside if b <= seconds)])
        return (event_name, customer, day, part)

    def _fields(self, row: Any) -> tuple[Any, Any, Any, Any]:
        names = self.columns
        if isinstance(row, Mapping):
            missing = [name for name in names if name not in row]
            if missing:
                raise MeterEventInputError("row", row, f"must have the keys {list(names)}, missing {missing}")
            fields = [row[name] for name in names]
        elif isinstance(row, (tuple, list)):
            if len(row) < len(names):
                raise MeterEventInputError("row", row, f"must have {len(names)} columns: {', '.join(names)}")
            fields = list(row[: len(names)])
        else:
            raise MeterEventInputError("row", row, "must be a tuple, list or mapping")
        event_name = fields[3] if len(fields) > 3 else self.event_name
        return fields[0], fields[1], fields[2], event_name

    def _check_event_name(self, event_name: Any) -> str:
        if event_name in self._good_events:
            return event_name
        checked = validate_event_name(event_name)
        self._good_events.add(checked)
        return checked

    def _check_customer(self, customer: Any) -> str:
        if customer in self._good_customers:
            return customer
        checked = validate_customer_id(customer)
        self._good_customers.add(checked)
        return checked

    def to_seconds(self, stamp: Any) -> int:
        """Unix seconds of a row's timestamp; naive values are read in ``naive_timezone``."""
        return to_unix_seconds(stamp, naive_timezone=self.naive_timezone)

    # -- results ---------------------------------------------------------------------------

    def finish(self) -> list[DailyAggregate]:
        """Fold what was added into aggregates, once; later calls return the same list.

        Aggregates come in the order first seen; one whose day total exceeds 15 digits is
        reported as ``invalid`` instead. Rows added after this raise ``RuntimeError``.
        """
        if self._finished is not None:
            return self._finished
        event_name = self.event_name
        for day, customers in self._fast_days.items():
            for customer, (total, latest, rows, last) in customers.items():
                self._merge((event_name, customer, day), total, _naive_utc_seconds(latest), rows, last)
        self._fast_days.clear()
        self.too_old = self._fold(self._too_old_totals)
        self._finished = self._fold(self._totals)
        return self._finished

    def _fold(self, totals: dict[tuple[Any, ...], list[int]]) -> list[DailyAggregate]:
        out: list[DailyAggregate] = []
        # Days over 15 digits, reported in (day, customer) order: the order groups come in
        # depends on the path (rows first seen, or a database's GROUP BY).
        too_big: list[tuple[date, str, int, int]] = []
        days: dict[int, date] = {}
        parts: dict[tuple[str, str, int], list[DayPart]] = {}
        # Not sorted: comparing 3-tuples would cost more than the whole aggregation.
        for key, (total, seconds, rows, last) in totals.items():
            if len(key) == 4:  # a part of a split day: folded into its day below
                event_name, customer, day_number, start = key
                bounds = self._split.get((event_name, customer), ())
                end = min([b for b in bounds if b > start] + [(day_number + 1) * SECONDS_PER_DAY])
                parts.setdefault((event_name, customer, day_number), []).append(
                    DayPart(start, end, total, seconds, rows, last)
                )
                continue
            event_name, customer, day_number = key
            day = days.get(day_number) or days.setdefault(day_number, day_numbered(day_number))
            if -MAX_VALUE <= total <= MAX_VALUE:
                out.append(DailyAggregate(event_name, customer, day, total, seconds, rows, last))
                continue
            too_big.append((day, customer, total, rows))
        for (event_name, customer, day_number), found in parts.items():
            found.sort(key=lambda p: p.start)
            day = day_numbered(day_number)
            total = sum(p.value for p in found)
            if not all(-MAX_VALUE <= v <= MAX_VALUE for v in (total, *(p.value for p in found))):
                too_big.append((day, customer, total, sum(p.rows for p in found)))
                continue
            latest = max(found, key=lambda p: p.timestamp)
            out.append(
                DailyAggregate(
                    event_name,
                    customer,
                    day,
                    total,
                    latest.timestamp,
                    sum(p.rows for p in found),
                    latest.last_value,
                    tuple(found),
                )
            )
        for day, customer, total, rows in sorted(too_big):
            self._too_big(customer, day, total, rows)
        return out

    def _too_big(self, customer: str, day: date, total: int, rows: int) -> None:
        self.problems.add(
            "invalid",
            {
                "type": "validation_error",
                "field": "value",
                "value": str(total),
                "rule": f"the day's total must have at most {MAX_VALUE_DIGITS} digits",
                "customer_id": customer,
                "day": day.isoformat(),
            },
            count=rows,
        )


def _is_customer(value: Any) -> bool:
    try:
        validate_customer_id(value)
    except MeterEventInputError:
        return False
    return True


def _naive_utc_seconds(moment: datetime) -> int:
    return (
        (moment.toordinal() - EPOCH_ORDINAL) * SECONDS_PER_DAY
        + moment.hour * 3600
        + moment.minute * 60
        + moment.second
    )


#: Days a source may hold before the days split at a boundary are worked out for the whole
#: window at once (a pass over every customer) rather than day by day (a pass each).
LAZY_DAYS = 2
_NOBODY: frozenset[str] = frozenset()


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector around allocation-heavy work that creates no cycles.

    Aggregation allocates millions of short-lived tuples and strings; each pass of the cyclic
    collector then walks every live object. Reference counting still frees everything at once.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def iter_chunks(rows: Iterable[Any], size: int = 10_000) -> Iterable[list[Any]]:
    """Split an iterable of rows into lists of ``size``."""
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
