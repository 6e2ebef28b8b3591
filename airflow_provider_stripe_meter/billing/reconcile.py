"""Compare what the source says was used with what Stripe's meter summaries say was recorded.

Plain Python. One line per (customer, UTC day): expected, recorded, difference and a status,
``ok``, ``missing``, ``short``, ``over`` or ``customer_unknown`` (docs/reconcile.md says what
each means). The top-up operator corrects ``missing`` and ``short`` days through the billing
core and its ledger; ``over`` (cancel within 24 hours, or credit the customer) and
``customer_unknown`` are never corrected automatically.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

from airflow_provider_stripe_meter.billing.outcomes import RECONCILE_OUTCOMES, DayOutcome

#: Lines a report keeps by default (differences first): about 150 KB of XCom at most.
DEFAULT_LINE_LIMIT = 1_000

#: The statuses of a reconciliation line: the comparison outcomes of :class:`DayOutcome`.
STATUSES = tuple(outcome.value for outcome in RECONCILE_OUTCOMES)


def clock() -> float:
    """Unix time, read in one place by the sensor and its trigger (tests move it instead of sleeping)."""
    return time.time()


@dataclass(frozen=True)
class ReconcileLine:
    """One customer's usage of one meter on one UTC day, as the source and Stripe see it."""

    customer_id: str
    day: str
    expected: int
    recorded: int | None
    difference: int
    status: str
    timestamp: int | None = None
    #: What the batch operator's ledger says Stripe holds for the day (``None``: no ledger read).
    ledger: int | None = None
    #: Why Stripe's figure differs from the source's (see :func:`explain`).
    cause: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for XCom."""
        return asdict(self)


@dataclass(frozen=True)
class Expectation:
    """What the source says Stripe should hold for one meter, per customer-day of the compared days.

    ``expected`` maps (customer, day) to (the source's figure by the meter's formula, the latest
    row's timestamp); ``customers`` are every customer of the source (also those with usage only
    outside the compared days, whose summaries are read all the same).
    """

    meter_id: str
    expected: dict[tuple[str, date], tuple[int, int | None]]
    first: date
    last: date
    customers: list[str]
    skipped_rows: dict[str, int]
    #: Units of usage older than Stripe's window that the batch operator billed onto the compared
    #: days (``too_old="bill_at_oldest"``); already part of ``expected``.
    billed_late: int = 0

    def compare(self, recorded: dict[tuple[str, date], int], unknown: set[str]) -> list[ReconcileLine]:
        """One line per compared customer-day: expected against what Stripe recorded."""
        within = {
            (customer, day): v for (customer, day), v in recorded.items() if self.first <= day <= self.last
        }
        return compare(self.expected, within, unknown)  # type: ignore[arg-type]

    def report(
        self,
        event_name: str,
        lines: list[ReconcileLine],
        waited_seconds: float,
        *,
        line_limit: int = DEFAULT_LINE_LIMIT,
        lines_uri: str | None = None,
    ) -> dict[str, Any]:
        """The sensor's result (reschedule, poke or deferred alike): counts, totals and some lines.

        ``lines`` keeps at most ``line_limit`` lines, those that differ first (what a correction
        or an alert needs), so the result stays small at any number of customers;
        ``lines_truncated`` says whether any was left out, and ``lines_uri`` names the full
        table when the caller wrote one.
        """
        counts = summarize(lines)
        shown = sorted(lines, key=lambda line: line.status == DayOutcome.OK.value)[:line_limit]
        return {
            "success": counts["ok"] == len(lines),
            "event_name": event_name,
            "meter_id": self.meter_id,
            "counts": counts,
            "expected": sum(line.expected for line in lines),
            "recorded": sum(line.recorded or 0 for line in lines),
            "difference": sum(line.difference for line in lines),
            "lines": [line.to_dict() for line in shown],
            "lines_total": len(lines),
            "lines_truncated": len(shown) < len(lines),
            "lines_uri": lines_uri,
            "skipped_rows": self.skipped_rows,
            "billed_late": self.billed_late,
            "waited_seconds": round(waited_seconds, 1),
        }

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form (a trigger's keyword argument)."""
        return {
            "meter_id": self.meter_id,
            "expected": [[c, d.isoformat(), v, ts] for (c, d), (v, ts) in sorted(self.expected.items())],
            "first": self.first.isoformat(),
            "last": self.last.isoformat(),
            "customers": self.customers,
            "skipped_rows": self.skipped_rows,
            "billed_late": self.billed_late,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Expectation:
        """Back from :meth:`to_json`."""
        return cls(
            meter_id=data["meter_id"],
            expected={(c, date.fromisoformat(d)): (v, ts) for c, d, v, ts in data["expected"]},
            first=date.fromisoformat(data["first"]),
            last=date.fromisoformat(data["last"]),
            customers=list(data["customers"]),
            skipped_rows=dict(data["skipped_rows"]),
            billed_late=int(data.get("billed_late") or 0),
        )


def compare(
    expected: dict[tuple[str, date], tuple[int, int]],
    recorded: dict[tuple[str, date], int],
    unknown_customers: set[str] = frozenset(),  # type: ignore[assignment]
) -> list[ReconcileLine]:
    """Line up expected ``(value, latest timestamp)`` and recorded values per (customer, day)."""
    lines = []
    for key in sorted(set(expected) | set(recorded)):
        customer, day = key
        value, timestamp = expected.get(key, (0, None))
        if customer in unknown_customers:
            lines.append(
                ReconcileLine(
                    customer,
                    day.isoformat(),
                    value,
                    None,
                    value,
                    DayOutcome.CUSTOMER_UNKNOWN.value,
                    timestamp,
                )
            )
            continue
        got = recorded.get(key, 0)
        difference = value - got
        if difference == 0:
            status = DayOutcome.OK
        elif difference < 0:
            status = DayOutcome.OVER
        elif got == 0:
            status = DayOutcome.MISSING
        else:
            status = DayOutcome.SHORT
        lines.append(
            ReconcileLine(customer, day.isoformat(), value, got, difference, status.value, timestamp)
        )
    return lines


#: Why a day differs, from the source's, the ledger's and Stripe's figures.
CAUSES = {
    "another_sender": "Stripe holds more than the ledger: events this pipeline did not send",
    "not_in_stripe": (
        "the ledger says Stripe took more than its summaries show: they may still trail, or Stripe "
        "dropped events (an unknown customer, an inactive meter)"
    ),
    "not_sent": "the ledger holds less than the source: not billed yet (late rows; run the batch)",
    "source_went_down": "the ledger billed more than the source now holds (rows deleted or corrected)",
    "customer_unknown": "Stripe does not know the customer: its events were dropped",
}


def explain(line: ReconcileLine, ledger: int) -> ReconcileLine:
    """``line`` with the ledger's figure and, where Stripe's differs from the source's, the cause."""
    from dataclasses import replace

    cause = ""
    recorded = line.recorded
    if line.status == DayOutcome.CUSTOMER_UNKNOWN.value:
        cause = "customer_unknown"
    elif line.status != DayOutcome.OK.value and recorded is not None:
        if recorded > ledger:
            cause = "another_sender"
        elif recorded < ledger:
            cause = "not_in_stripe"
        elif ledger < line.expected:
            cause = "not_sent"
        else:
            cause = "source_went_down"
    return replace(line, ledger=ledger, cause=cause)


def summarize(lines: list[ReconcileLine]) -> dict[str, int]:
    """How many lines have each status."""
    counts = dict.fromkeys(STATUSES, 0)
    for line in lines:
        counts[line.status] += 1
    return counts


def is_settled(counts: dict[str, int]) -> bool:
    """Whether nothing is left to wait for: every line matches, or names a customer Stripe lacks."""
    settled = counts[DayOutcome.OK.value] + counts[DayOutcome.CUSTOMER_UNKNOWN.value]
    return settled == sum(counts.values())
