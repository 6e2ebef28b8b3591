"""Deliver meter events as fast as Stripe allows, never two at once for one customer and meter.

Plain Python: the caller passes the functions that talk to Stripe (through the hook), so pacing,
scheduling and retry rules are tested on their own.

* A client-side limiter spaces requests evenly at ``max_rps``, so the account's rate limit is
  approached but not hit; 429s that happen anyway are backed off with full jitter.
* A keyed work queue hands a worker only items whose (customer, meter) key is not in flight:
  Stripe allows one concurrent request per customer and meter.
* 5xx and connection errors are retried with the same identifier, so a retry can never bill
  twice; what is still undelivered after ``max_attempts`` is reported as failed.
* When every request fails (``outage_after`` in a row, none answered), Stripe or the way to it is
  down: an :class:`OutageGate` lets one probe through at a time, backing off up to 15 s, and
  failures meanwhile do not use up any item's attempts. The first answer reopens the gate. Only
  an outage longer than ``outage_timeout`` fails what is left, so a retry of the task resumes.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from airflow_provider_stripe_meter.utils.errors import (
    Duplicate,
    MeterFailure,
    Refused,
    Rejected,
    Transient,
    Withheld,
)

T = TypeVar("T")

#: Stripe's documented limits (https://docs.stripe.com/rate-limits): test mode shares 25
#: operations/s with every other call of the account; live mode allows 1,000 meter events/s
#: per account, apart from the basic limit of 100 reads and 100 writes a second, which reads
#: (meter event summaries, meters) count toward, and so do a connected account's meter events.
#: Defaults leave headroom.
DEFAULT_MAX_RPS = {"test": 20.0, "live": 900.0}
#: The longest wait before a 5xx or network failure is tried again (stripe-python's own cap).
NETWORK_RETRY_CAP = 2.0
#: The most failures in a row a deliverer waits for before it treats them as an outage.
OUTAGE_AFTER_MAX = 16
DEFAULT_READ_RPS = {"test": 20.0, "live": 90.0}


def default_max_rps(livemode: bool, *, connected: bool = False) -> float:
    """The default rate of meter events for a live or a test/sandbox key, for the platform or a
    connected account (whose meter events count toward the basic limit)."""
    if connected:
        return DEFAULT_READ_RPS["live" if livemode else "test"]
    return DEFAULT_MAX_RPS["live" if livemode else "test"]


def default_read_rps(livemode: bool) -> float:
    """The default rate of reads (meter event summaries) for a live or a test/sandbox key."""
    return DEFAULT_READ_RPS["live" if livemode else "test"]


def full_jitter(
    attempt: int, base: float = 0.5, cap: float = 30.0, rng: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): uniform in [0, min(cap, base * 2**attempt))."""
    return rng() * min(cap, base * 2 ** min(attempt, 30))


class RateLimiter:
    """Space calls evenly at ``rate`` per second across threads (``None``: no spacing).

    :meth:`pause` holds every caller back for a while whatever the rate, since a 429 means the
    whole account is over its limit.
    """

    def __init__(
        self,
        rate: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"max_rps must be positive or None, got {rate!r}")
        self.interval = 0.0 if rate is None else 1.0 / rate
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Block until this caller's turn."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            self._sleep(slot - now)

    @property
    def next_slot(self) -> float:
        """The clock reading before which no caller gets a turn."""
        with self._lock:
            return self._next

    def pause(self, seconds: float) -> None:
        """Push every later turn back (after a 429: the whole account is over its limit)."""
        with self._lock:
            self._next = max(self._next, self._clock() + seconds)


class OutageGate:
    """Turn a run of failures of every request into one probe at a time.

    :param after: Transient failures in a row (5xx, network; not 429) that mean an outage.
    :param timeout: Seconds an outage may last before :meth:`enter` gives up.
    :param probe_cap: Longest wait between two probes.
    """

    def __init__(
        self,
        *,
        after: int = 5,
        timeout: float = 600.0,
        probe_cap: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.after = after
        self.timeout = timeout
        self.probe_cap = probe_cap
        self._clock = clock
        self._rng = rng
        self._cond = threading.Condition()
        self._in_a_row = 0
        self._since: float | None = None
        self._prober: int | None = None
        #: Outages seen, probes sent during them, and the longest outage in seconds.
        self.outages = 0
        self.probes = 0
        self.longest = 0.0

    @property
    def is_open(self) -> bool:
        """Whether an outage is going on."""
        with self._cond:
            return self._since is not None

    def enter(self) -> bool:
        """Wait until this caller may send; ``False`` once an outage has outlasted ``timeout``."""
        with self._cond:
            while True:
                if self._since is None:
                    return True
                if self._clock() - self._since > self.timeout:
                    return False
                if self._prober is None:
                    self._prober = threading.get_ident()
                    self.probes += 1
                    return True
                self._cond.wait(0.25)

    def leave(self) -> None:
        """The caller is done with its request (and any wait after it)."""
        with self._cond:
            if self._prober == threading.get_ident():
                self._prober = None
                self._cond.notify_all()

    def answered(self) -> None:
        """Stripe answered (success, rejection or 429): whatever was down is up."""
        with self._cond:
            self._in_a_row = 0
            if self._since is not None:
                self.longest = max(self.longest, self._clock() - self._since)
                self._since = None
                self._cond.notify_all()

    def failed(self) -> bool:
        """Count a transient failure; ``True`` when it belongs to an outage (it uses no attempt)."""
        with self._cond:
            self._in_a_row += 1
            if self._since is None and self._in_a_row >= self.after:
                self._since = self._clock()
                self.outages += 1
            return self._since is not None

    def probe_wait(self) -> float:
        """Seconds before the next probe: doubling from 1 s up to ``probe_cap``, with jitter."""
        with self._cond:
            probes = self.probes
        return min(self.probe_cap, 2.0 ** min(probes, 10)) * (0.5 + 0.5 * self._rng())


class KeyedWorkQueue(Generic[T]):
    """Items in order, handed out so that no two items with the same key are out at once."""

    def __init__(self, items: Sequence[T], key: Callable[[T], Hashable]) -> None:
        self._key = key
        self._pending: deque[T] = deque(items)
        self._busy: set[Hashable] = set()
        self._lock = threading.Condition()
        #: Callers blocked in :meth:`take` right now (every pending key is busy).
        self.waiting = 0

    def take(self, limit: int = 1) -> list[T]:
        """Up to ``limit`` items with distinct keys not out already; waits while all are blocked.

        Returns an empty list when nothing is left.
        """
        with self._lock:
            while True:
                if not self._pending:
                    return []
                picked: list[T] = []
                skipped: list[T] = []
                keys: set[Hashable] = set()
                while self._pending and len(picked) < limit:
                    item = self._pending.popleft()
                    key = self._key(item)
                    if key in self._busy or key in keys:
                        skipped.append(item)
                    else:
                        picked.append(item)
                        keys.add(key)
                self._pending.extendleft(reversed(skipped))
                if picked:
                    self._busy |= keys
                    return picked
                self.waiting += 1
                try:
                    self._lock.wait()
                finally:
                    self.waiting -= 1

    def done(self, items: Sequence[T], retry: Sequence[T] = ()) -> None:
        """Release ``items``' keys; ``retry`` go back to the front of the queue."""
        with self._lock:
            for item in items:
                self._busy.discard(self._key(item))
            self._pending.extendleft(reversed(list(retry)))
            self._lock.notify_all()


@dataclass
class DeliveryReport:
    """What happened to each item, counted, with bounded samples of what went wrong."""

    total: int
    sent: int = 0
    already_recorded: int = 0
    rejected: int = 0
    failed: int = 0
    requests: int = 0
    rate_limited: int = 0
    retried: int = 0
    #: Outages ridden out (every request failing), probes sent during them, the longest in seconds.
    outages: int = 0
    probes: int = 0
    outage_seconds: float = 0.0
    seconds: float = 0.0
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sample_limit: int = 20
    #: Items Stripe rejected, and items that could not be delivered: all of them (the samples
    #: are bounded, these are not).
    rejected_items: list[Any] = field(default_factory=list)
    failed_items: list[Any] = field(default_factory=list)
    #: Items Stripe already held (duplicate identifier).
    already: list[Any] = field(default_factory=list)
    #: Items the sender withheld at the instant of sending (:class:`~.errors.Withheld`): not sent.
    withheld: list[Any] = field(default_factory=list)

    def sample(self, kind: str, detail: dict[str, Any]) -> None:
        """Keep ``detail`` as an example of ``kind`` if there is room."""
        bucket = self.samples.setdefault(kind, [])
        if len(bucket) < self.sample_limit:
            bucket.append(detail)

    @property
    def unsettled(self) -> list[Any]:
        """Items rejected or failed."""
        return [*self.rejected_items, *self.failed_items]

    @property
    def done(self) -> int:
        """Items whose fate is settled."""
        return self.sent + self.already_recorded + self.rejected + self.failed + len(self.withheld)


class Deliverer(Generic[T]):
    """Send items through ``send`` in batches of ``batch_size`` with pacing, keys and retries.

    :param send: Sends a batch. Returns normally when Stripe accepted all of it; raises
        :class:`~.errors.Duplicate` (batch of one: already recorded),
        :class:`~.errors.Rejected` (permanent), :class:`~.errors.Transient` (retry).
    :param key: The (customer, meter) key of an item.
    :param describe: JSON-safe description of an item, for the report's samples.
    :param max_rps: Requests per second; ``None`` for no limit.
    :param concurrency: Worker threads; enough to keep ``max_rps`` busy at the server's latency.
    :param max_attempts: Tries per batch before its items count as failed (an outage uses none).
    :param outage_after: Transient failures in a row that mean Stripe is down (see :class:`OutageGate`);
        default twice the requests in flight, from 5 to 16: with many in flight, a flaky network
        fails several in a row by chance (30% lost: 5 in a row is common, 16 is not), while an
        outage fails every one.
    :param outage_timeout: Seconds an outage may last before what is left counts as failed.
    :param progress: Called with a progress line at most every ``progress_every`` seconds.
    """

    def __init__(
        self,
        send: Callable[[list[T]], None],
        *,
        key: Callable[[T], Hashable],
        describe: Callable[[T], dict[str, Any]],
        batch_size: int = 1,
        max_rps: float | None = 20.0,
        concurrency: int | None = None,
        max_attempts: int = 8,
        backoff: Callable[[int], float] = full_jitter,
        sleep: Callable[[float], None] = time.sleep,
        progress: Callable[[str], None] | None = None,
        progress_every: float = 10.0,
        sample_limit: int = 20,
        outage_after: int | None = None,
        outage_timeout: float = 600.0,
    ) -> None:
        self.send = send
        self.key = key
        self.describe = describe
        self.batch_size = batch_size
        self.limiter = RateLimiter(max_rps, sleep=sleep)
        self.concurrency = concurrency or _default_concurrency(max_rps)
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.sleep = sleep
        self.progress = progress
        self.progress_every = progress_every
        self.sample_limit = sample_limit
        #: ``None``: twice the requests a run has in flight, from 5 to 16 (set in :meth:`run`).
        self.outage_after = outage_after
        self.outage_timeout = outage_timeout
        self.gate = OutageGate(after=outage_after or 5, timeout=outage_timeout)
        self._lock = threading.Lock()

    def run(self, items: Sequence[T], meanwhile: Callable[[], None] | None = None) -> DeliveryReport:
        """Deliver every item and return what happened.

        Rejections, duplicates and transient failures are counted in the report, never raised. A
        refused key (:class:`~.errors.Refused`) or an unexpected error stops every
        worker and is re-raised: no other item could get through either.

        ``meanwhile`` runs on the calling thread once the workers are sending (work that would
        otherwise wait its turn while the requests wait on the rate limit); it must not raise.
        """
        report = DeliveryReport(total=len(items), sample_limit=self.sample_limit)
        queue: KeyedWorkQueue[T] = KeyedWorkQueue(items, self.key)
        attempts: dict[int, int] = {}
        started = time.monotonic()
        last_progress = [started]
        workers = max(1, min(self.concurrency, math.ceil(len(items) / self.batch_size)))
        abort: list[BaseException] = []
        self.gate.after = self.outage_threshold(workers)

        gate = self.gate

        def worker() -> None:
            while not abort:
                batch = queue.take(self.batch_size)
                if not batch:
                    return
                if not gate.enter():
                    self._give_up(batch, report)
                    queue.done(batch)
                    continue
                try:
                    wait = self._attempt(batch, attempts, report)
                    if wait is not None:
                        # Back off outside the queue lock, keeping the keys busy meanwhile.
                        self.sleep(wait)
                except BaseException as err:  # a bug or a refused key: stop everyone, surface it
                    abort.append(err)
                    queue.done(batch)
                    return
                finally:
                    gate.leave()
                queue.done(batch, retry=batch if wait is not None else ())
                self._maybe_progress(report, started, last_progress)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stripe-meter") as pool:
            futures = [pool.submit(worker) for _ in range(workers)]
            if meanwhile is not None:
                meanwhile()
            for future in futures:
                future.result()
        report.seconds = time.monotonic() - started
        report.outages, report.probes, report.outage_seconds = gate.outages, gate.probes, gate.longest
        if abort:
            raise abort[0]
        self._maybe_progress(report, started, last_progress, force=True)
        return report

    def outage_threshold(self, in_flight: int) -> int:
        """Failures in a row that mean an outage, with ``in_flight`` requests at a time."""
        return self.outage_after or min(OUTAGE_AFTER_MAX, max(5, 2 * in_flight))

    def _attempt(self, batch: list[T], attempts: dict[int, int], report: DeliveryReport) -> float | None:
        """Send one batch; return seconds to wait before trying it again, or None when settled."""
        with self._lock:
            attempt = max(attempts.get(id(item), 0) for item in batch) + 1
            for item in batch:
                attempts[id(item)] = attempt
        self.limiter.acquire()
        try:
            self.send(batch)
        except Transient as err:
            return self._transient(err, batch, attempt, attempts, report)
        except Withheld:
            with self._lock:
                report.withheld.extend(batch)
            return None
        except Duplicate:
            self.gate.answered()
            with self._lock:
                report.requests += 1
                report.already_recorded += len(batch)
                report.already.extend(batch)
            return None
        except Refused:
            raise
        except Rejected as err:
            self.gate.answered()
            with self._lock:
                report.requests += 1
                report.rejected += len(batch)
                report.rejected_items.extend(batch)
                for item in batch:
                    report.sample("rejected", {**self.describe(item), "error": err.details})
            return None
        except MeterFailure as err:
            with self._lock:
                report.requests += 1
                self._fail(batch, report, err.details)
            return None
        self.gate.answered()
        with self._lock:
            report.requests += 1
            report.sent += len(batch)
        return None

    def _transient(
        self,
        err: Transient,
        batch: list[T],
        attempt: int,
        attempts: dict[int, int],
        report: DeliveryReport,
    ) -> float | None:
        """Count a 429, 5xx or network failure; return the wait before the batch goes again."""
        rate_limited = err.details.get("http_status") == 429
        if rate_limited:
            self.gate.answered()  # Stripe is up, only busy
        outage = not rate_limited and self.gate.failed()
        with self._lock:
            report.requests += 1
            report.rate_limited += rate_limited
            if outage:
                for item in batch:  # an outage uses up nobody's attempts
                    attempts[id(item)] = attempt - 1
                report.retried += 1
            elif attempt < self.max_attempts:
                report.retried += 1
            else:
                self._fail(batch, report, err.details, attempts=attempt)
                return None
        if outage:
            return self.gate.probe_wait()
        wait = self.backoff(attempt)
        if rate_limited:
            self.limiter.pause(wait)
            return wait
        # A lost answer or a 5xx is tried again soon, as the SDK would (its waits stop at 2 s);
        # the long backoff is for the account's rate limit, and an outage is the gate's.
        return min(wait, NETWORK_RETRY_CAP)

    def _give_up(self, batch: list[T], report: DeliveryReport) -> None:
        """The outage outlasted ``outage_timeout``: what is left fails, for the task's retry."""
        message = f"every request failed for over {self.outage_timeout:.0f} s"
        with self._lock:
            self._fail(batch, report, {"type": "outage", "message": message})

    def _fail(self, batch: list[T], report: DeliveryReport, error: dict[str, Any], **detail: Any) -> None:
        """Count ``batch`` as failed, keeping samples (call with the lock held)."""
        report.failed += len(batch)
        report.failed_items.extend(batch)
        for item in batch:
            report.sample("failed", {**self.describe(item), "error": error, **detail})

    def _maybe_progress(
        self, report: DeliveryReport, started: float, last: list[float], *, force: bool = False
    ) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - last[0] < self.progress_every:
                return
            last[0] = now
            done, total = report.done, report.total
        elapsed = max(now - started, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate else float("inf")
        self.progress(
            f"{done}/{total} events settled ({100 * done / max(total, 1):.1f}%), "
            f"{rate:.1f}/s, elapsed {elapsed:.0f}s, ETA {eta:.0f}s; "
            f"sent={report.sent} already_recorded={report.already_recorded} "
            f"rejected={report.rejected} failed={report.failed} 429s={report.rate_limited}"
        )


def _default_concurrency(max_rps: float | None) -> int:
    # Enough requests in flight to keep max_rps busy at up to ~250 ms per request.
    if max_rps is None:
        return 16
    return max(4, min(64, math.ceil(max_rps / 4)))
