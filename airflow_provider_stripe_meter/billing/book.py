"""The state of one billing run: per customer-day, what was planned and what became of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.billing.outcomes import Action, DayOutcome
from airflow_provider_stripe_meter.billing.plans import (
    CUSTOMER_UNKNOWN,
    INVOICE_FINAL,
    NO_INVOICE,
    SUBSCRIPTION_ENDED,
)
from airflow_provider_stripe_meter.utils.days import rfc3339

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.billing.meters import MeterSpec
    from airflow_provider_stripe_meter.billing.periods import PeriodBook
    from airflow_provider_stripe_meter.billing.plans import DayPlan, Held, Key
    from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate
    from airflow_provider_stripe_meter.utils.delivery import DeliveryReport
    from airflow_provider_stripe_meter.utils.unchanged import Unchanged


@dataclass(slots=True)
class CustomerDay:
    """One (meter, customer, UTC day) of the run."""

    aggregate: DailyAggregate
    plan: DayPlan
    #: What became of it once known; ``None``: left alone (or not sent yet).
    outcome: DayOutcome | None = None
    #: Stripe holds an event for the day whose figure its summaries do not show yet: the figure
    #: they showed when the day was planned.
    stale: int | None = None
    #: Read back equal after sending (``confirm="summaries"``).
    confirmed: bool = False
    #: Some of its usage was held: no open invoice carries it (counted apart, by reason).
    held: bool = False

    def final_outcome(self) -> DayOutcome | None:
        """What became of the day, once the run is over (``None``: left alone, never looked up)."""
        if self.outcome is not None:
            return self.outcome
        if self.held:
            return None  # not in Stripe, and not for want of sending: see the held counts
        if self.plan.action == Action.LEAVE_ALONE and self.plan.recorded is not None:
            return DayOutcome.ALREADY_RECORDED
        return None

    def line(self) -> dict[str, Any]:
        """JSON-safe line of the run's full table: the plan, and what became of it."""
        outcome = self.final_outcome()
        return {
            **self.plan.line(),
            "outcome": outcome.value if outcome is not None else None,
            "confirmed": self.confirmed,
        }


class Samples:
    """Examples per kind of problem, at most ``limit`` of each (they go to XCom)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.by_kind: dict[str, list[dict[str, Any]]] = {}

    def add(self, kind: str, detail: dict[str, Any]) -> None:
        """Keep ``detail`` as an example of ``kind`` if there is room."""
        bucket = self.by_kind.setdefault(str(kind), [])
        if len(bucket) < self.limit:
            bucket.append(detail)


@dataclass
class RunBook:
    """Everything the phases of one run learn, in one place."""

    now: int
    sample_limit: int
    #: Per event name, the meter as read when planning.
    specs: dict[str, MeterSpec] = field(default_factory=dict)
    #: Per event name, the meter's last deactivation when planning (``None``: never).
    deactivated_at: dict[str, int | None] = field(default_factory=dict)
    days: dict[Key, CustomerDay] = field(default_factory=dict)
    #: Usage older than Stripe's window (``too_old="bill_at_oldest"``), planned apart.
    late: dict[Key, CustomerDay] = field(default_factory=dict)
    reports: list[DeliveryReport] = field(default_factory=list)
    summary_requests: int = 0
    #: Requests that asked Stripe whether customers exist (0 on a night of known customers).
    customer_requests: int = 0
    #: Meters that were not active (or were deactivated) after the run sent to them.
    deactivated: set[str] = field(default_factory=set)
    #: Usage no open invoice carries, per outcome: customer-day parts and their value.
    held: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Customer-days the database found the ledger already holds: counted, never planned.
    unchanged: Unchanged | None = None
    samples: Samples = field(init=False)

    def __post_init__(self) -> None:
        self.samples = Samples(self.sample_limit)

    def hold(self, part: Held, plan: DayPlan) -> None:
        """Count (and sample) usage of a customer-day part that no open invoice will carry."""
        figures = self.held.setdefault(part.outcome, {"customer_days": 0, "value": 0})
        figures["customer_days"] += 1
        figures["value"] += part.value
        self.samples.add(part.outcome, part.describe(plan))

    def invoices(self, periods: PeriodBook | None, meters: set[str]) -> dict[str, Any]:
        """What the run knew of invoices: held usage by outcome, usage carried, meters in periods."""
        carried = [
            e for d in [*self.days.values(), *self.late.values()] for e in d.plan.events if e.carried_from
        ]
        out: dict[str, Any] = {
            "meters_in_periods": sorted(m for m in meters if periods is not None and periods.covers(m)),
            # What reading the periods took: seconds, subscriptions listed, changes read, kept.
            "read": {
                "seconds": periods.read_seconds,
                **periods.read_figures,
                "invoices": periods.invoices_read(),
            }
            if periods is not None
            else None,
            "carried": {"events": len(carried), "value": sum(e.value for e in carried)},
        }
        # Drafts that finalize only by hand (``auto_advance`` off) take usage until someone
        # finalizes them, at a time no API tells: named, so the team finalizes after the run.
        by_hand = periods.manual_drafts() if periods is not None else []
        out["drafts_by_hand"] = {
            "count": len(by_hand),
            "sample": [
                {"subscription": sub, "period_end": rfc3339(end)} for sub, end in by_hand[: self.sample_limit]
            ],
        }
        # Usage of customers Stripe does not know yet is held too, with or without periods.
        for outcome in (INVOICE_FINAL, SUBSCRIPTION_ENDED, NO_INVOICE, CUSTOMER_UNKNOWN):
            out[outcome] = dict(self.held.get(outcome, {"customer_days": 0, "value": 0}))
        return out

    def with_outcome(self, *outcomes: DayOutcome) -> list[Key]:
        """Keys of the customer-days whose outcome is one of ``outcomes``."""
        return [key for key, day in self.days.items() if day.outcome in outcomes]
