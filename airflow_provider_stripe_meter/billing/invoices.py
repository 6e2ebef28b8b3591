"""Pre-invoice parity: the source's usage per billing period against what each invoice will bill.

Plain Python. The source, aggregated in parts at the customers' period boundaries, is folded per
(customer, period) by the meter's formula; each draft invoice's metered line (and the upcoming
invoice's, from a preview) is compared with it before the invoice finalizes, so a difference is
found while it can still be fixed, with the deadline that matters.

.. seealso:: https://docs.stripe.com/api/invoices/create_preview
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow_provider_stripe_meter.billing.meters import MeterSpec, source_figure
from airflow_provider_stripe_meter.billing.periods import invoice_subscription, line_price
from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate, DayPart

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.billing.periods import PeriodBook

#: (customer, period start, period end)
PeriodKey = tuple[str, int, int]


class _Latest(NamedTuple):
    """The latest row seen of a customer's period (what a ``last`` meter bills)."""

    timestamp: int
    value: int


@dataclass(frozen=True)
class InvoiceLine:
    """One customer's period: what the source says, what the invoice bills, and the deadline."""

    customer_id: str
    period_start: int
    period_end: int
    #: ``draft`` (the period ended; finalizes at ``deadline``) or ``upcoming`` (the open period).
    status: str
    source: int
    invoice: int | None
    difference: int
    #: When the invoice locks: the draft's ``automatically_finalizes_at``, or the open period's
    #: end (its draft then has the grace period more); ``None``: a draft that finalizes only by
    #: hand (``auto_advance`` false), at a time Stripe cannot tell.
    deadline: int | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for XCom."""
        return asdict(self)


def source_per_period(
    aggregates: Iterable[DailyAggregate], spec: MeterSpec, periods: PeriodBook
) -> dict[PeriodKey, int]:
    """The source's figure per (customer, period), by the meter's formula (``sum``, ``count``,
    ``last``), from days aggregated in parts at the period boundaries."""
    sums: dict[PeriodKey, int] = {}
    latest: dict[PeriodKey, _Latest] = {}
    for agg in aggregates:
        if agg.event_name != spec.event_name:
            continue
        found = periods.customers.get((agg.event_name, agg.customer_id))
        if found is None:
            continue
        parts = agg.parts or (
            DayPart(agg.timestamp, agg.timestamp + 1, agg.value, agg.timestamp, agg.rows, agg.last_value),
        )
        for part in parts:
            period = found.at(part.timestamp)
            if period is None:
                continue
            key = (agg.customer_id, period.start, period.end)
            if spec.formula == "last":
                if key not in latest or part.timestamp >= latest[key].timestamp:
                    latest[key] = _Latest(part.timestamp, part.last_value)
                continue
            piece = DailyAggregate(
                agg.event_name,
                agg.customer_id,
                agg.day,
                part.value,
                part.timestamp,
                part.rows,
                part.last_value,
            )
            sums[key] = sums.get(key, 0) + source_figure(piece, spec)
    return {**sums, **{key: seen.value for key, seen in latest.items()}}


def metered_quantity(invoice: dict[str, Any], price_ids: set[str]) -> int | None:
    """The quantity of the invoice's lines on ``price_ids`` (``None``: no such line among the
    lines it holds)."""
    found = [
        int(line.get("quantity") or 0)
        for line in (invoice.get("lines") or {}).get("data") or []
        if line_price(line) in price_ids
    ]
    return sum(found) if found else None


def draft_lines(invoice: dict[str, Any], price_ids: set[str]) -> dict[tuple[str, int, int], int]:
    """Per (customer, service period start, end), the quantity a draft bills on ``price_ids``:
    matched by the metered lines' own ``period`` (a cycle invoice's ``period_start``/``period_end``
    bound when items could attach, not the usage billed)."""
    customer = invoice.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    out: dict[tuple[str, int, int], int] = {}
    if invoice_subscription(invoice) is None:
        return out  # a manual or one-off invoice: no subscription's usage on it
    for line in (invoice.get("lines") or {}).get("data") or []:
        if line_price(line) not in price_ids:
            continue
        period = line.get("period") or {}
        key = (str(customer), int(period["start"]), int(period["end"]))
        out[key] = out.get(key, 0) + int(line.get("quantity") or 0)
    return out


def compare(
    source: dict[PeriodKey, int],
    invoices: dict[PeriodKey, tuple[str, int | None, int | None]],
) -> list[InvoiceLine]:
    """One line per invoice still open to change: (status, quantity, deadline) against the source."""
    lines = []
    for key, (status, quantity, deadline) in sorted(invoices.items()):
        expected = source.get(key, 0)
        lines.append(InvoiceLine(*key, status, expected, quantity, expected - (quantity or 0), deadline))
    return lines
