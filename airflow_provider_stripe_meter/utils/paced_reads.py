"""Reads of one Stripe request a customer, paced and retried like sends.

Plain Python: each read is one hook call (:class:`SummaryReads`, :class:`CustomerReads`); the
:class:`~.delivery.Deliverer` around it paces at ``max_rps``, backs off on 429 and rides out
outages, the one retry layer (the hook's reads here go without the SDK's retries). The
asynchronous reads (a trigger's, on its event loop) keep the same pacing with ``asyncio``.

.. seealso:: https://docs.stripe.com/api/billing/meter-event-summary/list
.. seealso:: https://docs.stripe.com/rate-limits
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from datetime import date
from typing import Any, Protocol

from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY, day_of, day_start
from airflow_provider_stripe_meter.utils.delivery import Deliverer
from airflow_provider_stripe_meter.utils.errors import MeterFailure, Rejected, Transient

#: Summaries per (customer, UTC day), and the customers Stripe does not know.
PerDay = tuple[dict[tuple[str, date], int], set[str]]


class SummaryReads(Protocol):
    """The hook's reads of a meter's summaries for one customer (one request each, paging)."""

    def summaries_or_unknown(
        self,
        meter_id: str,
        customer_id: str,
        start_time: int,
        end_time: int,
        window: str | None,
        retry: bool = True,
    ) -> list[dict[str, Any]] | None: ...


class AsyncSummaryReads(Protocol):
    """:class:`SummaryReads` on an event loop (the SDK's asynchronous client)."""

    async def asummaries_or_unknown(
        self, meter_id: str, customer_id: str, start_time: int, end_time: int
    ) -> list[dict[str, Any]] | None: ...


class CustomerReads(Protocol):
    """The hook's read of one customer."""

    def customer_exists(self, customer_id: str, *, retry: bool = True) -> bool: ...


def read_each(
    customers: Sequence[str],
    read: Callable[[str], None],
    what: str,
    kind_of_failure: str,
    *,
    max_rps: float | None,
    concurrency: int | None = None,
) -> None:
    """``read`` each customer (one request each): paced at ``max_rps``, backed off on 429 and
    ridden through outages exactly like sends.

    :raises MeterFailure: some could not be read; of the kind of the first failure met (a
        rejection when Stripe refused some, else what outlasted the retries), with the count.
    """
    lock = threading.Lock()
    first: dict[bool, MeterFailure] = {}

    def one(batch: list[str]) -> None:
        [customer] = batch
        try:
            read(customer)  # the deliverer around this retries and backs off: one retry layer
        except MeterFailure as err:
            with lock:
                first.setdefault(isinstance(err, Rejected), err)
            raise

    report = Deliverer(
        one,
        key=lambda customer: customer,
        describe=lambda customer: {"customer_id": customer},
        max_rps=max_rps,
        concurrency=concurrency,
    ).run(list(customers))
    if report.rejected or report.failed:
        kind = "rejected" if report.rejected else "failed"
        example = report.samples.get(kind, [{}])[0]
        met = first.get(bool(report.rejected))
        error: type[MeterFailure] = type(met) if met is not None else Transient
        raise error(
            f"Could not {what} {report.rejected + report.failed} of {len(customers)} customers "
            f"(e.g. {example})",
            example.get("error") or {"type": kind_of_failure},
        )


def recorded_per_day(
    stripe: SummaryReads,
    meter_id: str,
    customers: Sequence[str],
    first: date,
    last: date,
    *,
    max_rps: float | None = 20.0,
    concurrency: int | None = None,
) -> PerDay:
    """What Stripe recorded per (customer, UTC day) from ``first`` to ``last``, one request a customer.

    Reads ``event_summaries`` with ``value_grouping_window=day`` (the meter's own formula
    applied per day), paced at ``max_rps``. Days with nothing recorded are absent. Returns
    the figures and the customers Stripe does not know (404 with ``param=customer``).
    """
    start, end = day_span(first, last)
    found: dict[str, list[dict[str, Any]] | None] = {}

    def read(customer: str) -> None:
        found[customer] = stripe.summaries_or_unknown(meter_id, customer, start, end, "day", retry=False)

    read_each(
        customers,
        read,
        "read Stripe's meter summaries for",
        "summaries_unavailable",
        max_rps=max_rps,
        concurrency=concurrency,
    )
    return per_day(found)


async def arecorded_per_day(
    stripe: AsyncSummaryReads,
    meter_id: str,
    customers: Sequence[str],
    first: date,
    last: date,
    *,
    max_rps: float | None = 20.0,
    concurrency: int = 8,
) -> PerDay:
    """:func:`recorded_per_day` on an event loop (a trigger's): same requests, same answer.

    Requests start at most ``max_rps`` a second, ``concurrency`` at a time. A 429, 5xx or
    network failure that outlasts the SDK's own retries raises (a
    :class:`~.errors.Transient`); the caller polls again later.
    """
    start, end = day_span(first, last)
    found: dict[str, list[dict[str, Any]] | None] = {}
    slots = asyncio.Semaphore(max(1, concurrency))
    spacing = 1.0 / max_rps if max_rps else 0.0
    loop = asyncio.get_running_loop()
    next_start = loop.time()

    async def read(customer: str) -> None:
        nonlocal next_start
        async with slots:
            # Space request starts evenly: the same pacing the threaded reads keep.
            now = loop.time()
            turn = max(next_start, now)
            next_start = turn + spacing
            await asyncio.sleep(turn - now)
            found[customer] = await stripe.asummaries_or_unknown(meter_id, customer, start, end)

    await asyncio.gather(*(read(customer) for customer in customers))
    return per_day(found)


def customers_known(
    stripe: CustomerReads, customers: Sequence[str], *, max_rps: float | None = 20.0
) -> set[str]:
    """Which of ``customers`` Stripe knows, one ``GET /v1/customers/{id}`` each, paced at
    ``max_rps`` and backed off on 429 like every read.

    .. seealso:: https://docs.stripe.com/api/customers/retrieve
    """
    known: set[str] = set()

    def read(customer: str) -> None:
        if stripe.customer_exists(customer, retry=False):
            known.add(customer)

    read_each(customers, read, "ask Stripe about", "customers_unavailable", max_rps=max_rps)
    return known


def day_span(first: date, last: date) -> tuple[int, int]:
    """Unix seconds from the start of UTC day ``first`` to the end of UTC day ``last``."""
    start = day_start(first)
    return start, start + ((last - first).days + 1) * SECONDS_PER_DAY


def per_day(found: dict[str, list[dict[str, Any]] | None]) -> PerDay:
    """Daily summaries per customer (``None``: unknown customer) as figures per (customer, day)."""
    recorded: dict[tuple[str, date], int] = {}
    unknown: set[str] = set()
    for customer, summaries in found.items():
        if summaries is None:
            unknown.add(customer)
            continue
        for summary in summaries:
            value = summary["aggregated_value"]
            if value:
                day = day_of(summary["start_time"])
                # Summaries are numbers (floats in JSON); meter values are whole numbers.
                recorded[(customer, day)] = recorded.get((customer, day), 0) + round(value)
    return recorded, unknown
