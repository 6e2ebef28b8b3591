"""One ledger row, its states, and what a customer-day's rows add up to.

A row is one meter event: the customer-day of the source it bills (``day``), the value and the
timestamp it carried (``stamp``, which decides the day and the billing period Stripe counts it
in), and its ``state``:

* ``pending``: written before the event left; a run that was killed leaves it so, and the next
  run settles it (sent again under the same identifier while Stripe still refuses a repeat of
  it, read from Stripe's summaries after that).
* ``accepted``: Stripe answered 200, or refused a repeat of the identifier (it holds it).
* ``unverified``: accepted, but the meter was deactivated around the time, or a read-back
  differed: the next run settles it from Stripe's summaries.
* ``dropped``: accepted, then dropped by Stripe (inactive meter, unknown customer): billed
  nowhere, so the next run sends its usage again under a new identifier.
* ``rejected``: Stripe refused it (4xx): never billed.
* ``cancelling`` / ``cancelled``: a ``count`` event cancelled because the source shrank.

.. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import NamedTuple

PENDING = "pending"
ACCEPTED = "accepted"
UNVERIFIED = "unverified"
DROPPED = "dropped"
REJECTED = "rejected"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
STATES = (PENDING, ACCEPTED, UNVERIFIED, DROPPED, REJECTED, CANCELLING, CANCELLED)
#: States whose event Stripe holds, or may hold: they count in the day's figure. A ``cancelling``
#: event counts until Stripe confirmed the cancel.
LIVE = (PENDING, ACCEPTED, UNVERIFIED, CANCELLING)
#: States a run must settle before it plans the customer-day again.
OPEN = (PENDING, UNVERIFIED, CANCELLING)


class Change(NamedTuple):
    """A row's new state, as a run learns it: written by :meth:`~.store.SqlLedger.resolve`."""

    identifier: str
    state: str
    #: When Stripe answered (``None``: never).
    answered_at: float | None
    #: Why; an empty note keeps the row's own (why it was written, such as usage carried).
    note: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One meter event, as the ledger keeps it."""

    account: str
    meter_id: str
    event_name: str
    customer_id: str
    #: The source's UTC day this event bills (for usage billed late, the original day).
    day: date
    #: Per (account, meter, customer, day): 1, 2, ... in the order the events were planned.
    seq: int
    identifier: str
    value: int
    #: The timestamp the event carried (unix seconds).
    stamp: int
    #: The latest source row the plan saw: a view of the day older than this is stale.
    source_at: int
    state: str
    #: Who wrote it: the Airflow run, and the try of the task (unique per execution).
    run_id: str
    attempt: str
    #: When the row was written (unix seconds), and when Stripe's answer resolved it.
    sent_at: float
    answered_at: float | None = None
    note: str = ""
    #: The slice of the day it bills, by its start (unix seconds), when the day is split at a
    #: billing period boundary; 0 for the whole day. Usage carried into a later period keeps
    #: the part it came from.
    part: int = 0
    #: The end of the billing period the event was stamped in (``None``: none was read).
    period_end: int | None = None

    @property
    def key(self) -> tuple[str, str, date]:
        """(event name, customer, day): the source's customer-day this event bills."""
        return (self.event_name, self.customer_id, self.day)


@dataclass(slots=True)
class DayFigure:
    """What the ledger holds for one (meter, customer, day): the live events, folded.

    ``total`` and ``events`` are the sum and the number of live events; ``newest`` is the value
    of the event a ``last`` meter bills (the latest timestamp; the later planned on a tie), and
    ``newest_sent`` the value of the event a pre-aggregated meter keeps (the last one sent).
    """

    total: int = 0
    events: int = 0
    newest: int | None = None
    newest_stamp: int = -1
    newest_seq: int = -1
    newest_sent: int | None = None
    last_sent_seq: int = -1
    #: The highest sequence number of any row, live or not: the next event takes the one after.
    max_seq: int = 0
    #: The latest source row any event of the day was planned from.
    source_at: int = -1
    #: Rows still to be settled (pending, unverified, cancelling).
    open: int = 0

    def add(self, seq: int, value: int, stamp: int, source_at: int, state: str) -> None:
        """Fold one row in."""
        self.max_seq = max(self.max_seq, seq)
        if state in OPEN:
            self.open += 1
        if state not in LIVE:
            return
        self.total += value
        self.events += 1
        self.source_at = max(self.source_at, source_at)
        if (stamp, seq) > (self.newest_stamp, self.newest_seq):
            self.newest, self.newest_stamp, self.newest_seq = value, stamp, seq
        if seq > self.last_sent_seq:
            self.newest_sent, self.last_sent_seq = value, seq

    @property
    def empty(self) -> bool:
        """No live event: Stripe holds nothing of ours for the day."""
        return self.events == 0
