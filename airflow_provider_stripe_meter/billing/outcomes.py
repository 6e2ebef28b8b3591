"""One vocabulary for what a run does with a customer-day, and what became of it.

:class:`Action` is what the planner decides from the source's figure and Stripe's;
:class:`DayOutcome` is what became of the day: the batch result counts them, metrics are named
after them (``stripe_meter.<outcome>``), and the reconcile report uses the comparison members.
"""

from __future__ import annotations

from enum import Enum


class Action(str, Enum):
    """What a real run does with one customer-day."""

    SEND = "send"  # nothing recorded yet: send the day
    TOP_UP = "top_up"  # the ledger holds less than the source: send the difference (or the new figure)
    LEAVE_ALONE = "leave_alone"  # the ledger holds the source's figure already
    CORRECT = "correct"  # the source went down: a negative event, cancelled events, a new figure
    # Not planned since the ledger (what Stripe shows is no longer read to plan); kept so the
    # result's ``actions`` keep their keys.
    REPORT = "report"

    def __str__(self) -> str:
        return self.value


class DayOutcome(str, Enum):
    """What became of one customer-day (one meter, one customer, one UTC day)."""

    #: Events sent and accepted.
    SENT = "sent"
    #: Stripe already held the source's figure (looked up, or answered "duplicate").
    ALREADY_RECORDED = "already_recorded"
    #: Stripe refused an event for the day (a 4xx other than 429).
    REJECTED = "rejected"
    #: An event could not be delivered in this try (its retry looks Stripe up).
    FAILED = "failed"
    #: Stripe holds more than the source.
    OVER = "over"
    #: Stripe does not know the customer, so none of its usage is billed.
    CUSTOMER_UNKNOWN = "customer_unknown"
    #: Accepted, but not shown to be billed (meter deactivated, or summaries differ).
    UNCONFIRMED = "unconfirmed"
    #: Usage older than Stripe's window, billed at the oldest instant Stripe accepts.
    BILLED_LATE = "billed_late"
    #: Reconcile: Stripe's figure equals the source's.
    OK = "ok"
    #: Reconcile: Stripe has nothing for a day the source has usage for.
    MISSING = "missing"
    #: Reconcile: Stripe has less than the source.
    SHORT = "short"

    def __str__(self) -> str:
        return self.value


#: What a batch run counts per customer-day (the result's keys of the same names).
BATCH_OUTCOMES = (
    DayOutcome.SENT,
    DayOutcome.ALREADY_RECORDED,
    DayOutcome.REJECTED,
    DayOutcome.FAILED,
    DayOutcome.OVER,
    DayOutcome.CUSTOMER_UNKNOWN,
    DayOutcome.UNCONFIRMED,
)
#: The outcomes counted as metrics per meter: the batch's, and usage billed late.
METRIC_OUTCOMES = (*BATCH_OUTCOMES, DayOutcome.BILLED_LATE)
#: What a reconciliation finds per customer-day.
RECONCILE_OUTCOMES = (
    DayOutcome.OK,
    DayOutcome.MISSING,
    DayOutcome.SHORT,
    DayOutcome.OVER,
    DayOutcome.CUSTOMER_UNKNOWN,
)
#: Outcomes after which Stripe holds the source's figure for the day.
IN_STRIPE = frozenset({DayOutcome.SENT, DayOutcome.ALREADY_RECORDED})
