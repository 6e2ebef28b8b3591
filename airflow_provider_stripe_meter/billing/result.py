"""The result of a billing run: what became of every customer-day, in counts, totals and samples.

:class:`BatchResult` is typed; :meth:`BatchResult.as_dict` is the JSON-safe form the operator
returns (each key its own XCom). Everything in it is bounded: counts, totals per meter, at most
``sample_limit`` examples of each problem and (dry runs) at most ``plan_limit`` plan lines.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.billing.meters import ADD
from airflow_provider_stripe_meter.billing.outcomes import BATCH_OUTCOMES, IN_STRIPE, Action, DayOutcome

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.billing.book import RunBook
    from airflow_provider_stripe_meter.billing.settings import RunSettings

#: What makes a run not a success, besides a plan that reports on a dry run.
PROBLEMS = (
    "skipped_too_old",
    "skipped_future",
    "invalid",
    "rejected",
    "failed",
    "over",
    "customer_unknown",
    "unconfirmed",
    "invoice_final",
    "subscription_ended",
    "no_invoice",
)


@dataclass(frozen=True)
class SourceFigures:
    """What reading the source found: rows, customer-days, and rows left out by reason."""

    rows: int
    aggregates: int
    problems: dict[str, int]
    samples: dict[str, list[dict[str, Any]]]
    late_rows: int = 0
    #: Where the rows were aggregated: ``"database"`` (pushed into SQL) or ``"worker"``; and why.
    aggregated_in: str = "worker"
    aggregated_because: str = ""
    #: What the database did when it aggregated (statements, rows handed back, seconds).
    database: dict[str, Any] | None = None


@dataclass
class BatchResult:
    """What a billing run did, per customer-day outcome and per meter."""

    success: bool
    source: SourceFigures
    counts: dict[DayOutcome, int]
    actions: dict[Action, int]
    totals: dict[str, dict[str, Any]]
    samples: dict[str, list[dict[str, Any]]]
    by_meter: dict[str, dict[str, int]]
    settings: dict[str, Any]
    delivery: dict[str, Any]
    late: dict[str, int]
    #: Sent and answered, but never read back from Stripe's summaries (``confirm="meter"``).
    unverified: int = 0
    confirmed: int = 0
    deactivated: list[str] = field(default_factory=list)
    plan: list[dict[str, Any]] | None = None
    plan_truncated: bool = False
    #: Ledger work (runs with a ledger): rows written, open rows settled or left, events cancelled.
    ledger: dict[str, int] | None = None
    #: The days the source was declared the truth for (:mod:`.coverage`), ``None`` if none.
    covers: dict[str, str] | None = None
    #: Billing periods: usage held because no open invoice carries it, usage carried.
    invoices: dict[str, Any] | None = None

    def count(self, outcome: DayOutcome) -> int:
        """Customer-days with ``outcome`` (usage billed late included where it applies)."""
        return self.counts.get(outcome, 0)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-safe form returned by the operator (and pushed, key by key, to XCom)."""
        result: dict[str, Any] = {
            "rows": self.source.rows,
            "aggregates": self.source.aggregates,
            "aggregated_in": self.source.aggregated_in,
            "aggregated_because": self.source.aggregated_because,
            "database": self.source.database,
            **{outcome.value: self.count(outcome) for outcome in BATCH_OUTCOMES},
            **{k: self.source.problems.get(k, 0) for k in ("skipped_too_old", "skipped_future", "invalid")},
            "actions": {action.value: n for action, n in self.actions.items()},
            "totals": self.totals,
            "samples": self.samples,
            **self.settings,
            "unverified": self.unverified,
            "confirmed": self.confirmed,
            **self.delivery,
            "by_meter": self.by_meter,
            **self.late,
            "success": self.success,
        }
        if self.ledger is not None:
            result["ledger"] = self.ledger
        result["covers"] = self.covers
        invoices = self.invoices or {}
        for held in ("invoice_final", "subscription_ended", "no_invoice"):
            # Customer-day parts whose usage was not sent: no open invoice would carry it.
            result[held] = (invoices.get(held) or {}).get("customer_days", 0)
        result["invoices"] = invoices
        if self.plan is not None:
            result["plan"] = self.plan
            result["plan_truncated"] = self.plan_truncated
        return result


def summarize(book: RunBook, settings: RunSettings, source: SourceFigures) -> BatchResult:
    """The run's result from its book: per-day outcomes, actions, totals, problems, delivery figures."""
    dry = settings.dry_run
    counts: Counter[DayOutcome] = Counter()
    actions = dict.fromkeys(Action, 0)
    # What became of each customer-day, per meter: the figures metrics are tagged with.
    by_meter: defaultdict[str, Counter[str]] = defaultdict(Counter)
    totals = _totals(book)
    for day in book.days.values():
        plan = day.plan
        actions[plan.action] += 1
        outcome = day.final_outcome()
        if outcome is not None and not dry:
            counts[outcome] += 1
            by_meter[plan.event_name][outcome.value] += 1
        entry = totals[plan.event_name]
        in_stripe = outcome in IN_STRIPE or (outcome is None and plan.action == Action.LEAVE_ALONE)
        entry["recorded"] += plan.expected if in_stripe else (plan.recorded or 0)
    unchanged = book.unchanged
    for name in sorted(unchanged.event_names if unchanged is not None else ()):
        # Left in the database, where the ledger holds them exactly: already recorded.
        assert unchanged is not None
        groups = unchanged.groups(name)
        actions[Action.LEAVE_ALONE] += groups
        if not dry:
            counts[DayOutcome.ALREADY_RECORDED] += groups
            by_meter[name][DayOutcome.ALREADY_RECORDED.value] += groups
        totals[name]["recorded"] += unchanged.value.get(name, 0)
    late = _late(book, counts, by_meter, dry, source.late_rows)
    samples: dict[str, list[dict[str, Any]]] = {k: list(v) for k, v in source.samples.items()}
    for report in book.reports:
        for kind, bucket in report.samples.items():
            samples.setdefault(kind, []).extend(bucket[: settings.sample_limit - len(samples.get(kind, []))])
    samples.update(book.samples.by_kind)
    result = BatchResult(
        success=False,
        source=source,
        counts=dict(counts),
        actions=actions,
        totals=totals,
        samples=samples,
        by_meter={name: dict(figures) for name, figures in by_meter.items()},
        settings={"dry_run": dry, "api": settings.api, "confirm": settings.confirm},
        delivery={
            "summary_requests": book.summary_requests,
            "customer_requests": book.customer_requests,
            "events_sent": sum(r.sent for r in book.reports),
            "requests": sum(r.requests for r in book.reports),
            "rate_limited": sum(r.rate_limited for r in book.reports),
            "outages": sum(r.outages for r in book.reports),
            "seconds": round(sum(r.seconds for r in book.reports), 3),
        },
        late=late,
        unverified=sum(1 for d in book.days.values() if d.outcome == DayOutcome.SENT and not d.confirmed),
        confirmed=sum(1 for d in book.days.values() if d.confirmed),
        deactivated=sorted(book.deactivated),
    )
    if dry:
        lines = [day.plan.line() for day in [*book.days.values(), *book.late.values()]]
        result.plan = lines[: settings.plan_limit]
        result.plan_truncated = len(lines) > settings.plan_limit
    result.invoices = book.invoices(None, set())
    flat = result.as_dict()
    # Usage held for customers Stripe does not know is a problem on a dry run too (not counted there).
    unknown = flat["invoices"].get("customer_unknown", {}).get("customer_days", 0)
    result.success = not any(flat[k] for k in PROBLEMS) and not unknown
    return result


#: The result's figures on the summary line after its first word, in order.
_FIGURES = (
    ("rows", "rows %d"),
    ("aggregates", "-> customer-days %d:"),
    ("sent", "sent %d,"),
    ("already_recorded", "already recorded %d,"),
    ("over", "over %d,"),
    ("customer_unknown", "customer unknown %d,"),
    ("rejected", "rejected %d,"),
    ("failed", "failed %d,"),
    ("unconfirmed", "unconfirmed %d;"),
    ("skipped_too_old", "skipped too old %d,"),
    ("skipped_future", "skipped future %d,"),
    ("invalid", "invalid %d;"),
    ("ledger", "ledger %s;"),
    ("summary_requests", "%d summary requests;"),
    ("actions", "actions %s"),
)
#: Why rows were not billed, by problem (``{rows}``: "1 row", "2 rows").
_ROW_PROBLEMS = (
    ("invalid", "{n} invalid {rows}"),
    ("skipped_too_old", "{n} {rows} older than Stripe's 35 days, skipped"),
    ("skipped_future", "{n} {rows} more than 5 minutes ahead, skipped"),
)
#: Why customer-days are not (or not surely) billed, by outcome.
_DAY_PROBLEMS = (
    ("rejected", "rejected by Stripe"),
    ("failed", "not delivered (a retry sends them)"),
    ("unconfirmed", "sent but not confirmed billed"),
    ("over", "where Stripe holds more than the source (credit the customer)"),
)
#: Usage held, not sent, by reason: what the billing team reads.
_HELD = (
    ("customer_unknown", "of customers Stripe does not know"),
    ("invoice_final", "whose invoice is already final"),
    ("subscription_ended", "whose subscription ended"),
    ("no_invoice", "with no subscription to invoice them"),
)


def summary_line(outcome: Mapping[str, Any]) -> str:
    """The run in one line, for the task log: why it is not a success first, then its figures.

    A run that is a success reads ``Billed: rows ... -> customer-days ...: sent ...`` (``Dry
    run:`` for a dry run). One that is not starts with ``NOT A SUCCESS:`` and each reason, with
    its first examples, e.g. ``NOT A SUCCESS: 2 invalid rows (e.g. row 3: value 12.5 must be a
    whole number ...); held, not sent: 1 customer-day of customers Stripe does not know (...);
    Billed: ...``: the task stays green (unless ``fail_on_error``), so the log line says it.

    :param outcome: The run's result as returned by the operator (:meth:`BatchResult.as_dict`).
    """
    first = "Dry run:" if outcome.get("dry_run") else "Billed:"
    figures = " ".join([first, *(text % (outcome.get(key, 0),) for key, text in _FIGURES)])
    if outcome.get("success", True):
        return figures
    reasons = not_a_success(outcome) or ["see the samples in the result"]
    return f"NOT A SUCCESS: {'; '.join(reasons)}; {figures}"


def not_a_success(outcome: Mapping[str, Any]) -> list[str]:
    """Why a run is not a success, in the result's own order, each with its first examples.

    Empty for a run that is a success. Rows first (what the source got wrong), then
    customer-days Stripe did not take, then usage held.
    """
    samples: Mapping[str, list[dict[str, Any]]] = outcome.get("samples") or {}
    reasons: list[str] = []
    for key, what in _ROW_PROBLEMS:
        if n := outcome.get(key):
            said = what.format(n=n, rows="row" if n == 1 else "rows")
            reasons.append(f"{said}{_examples(samples.get(key), n)}")
    for key, what in _DAY_PROBLEMS:
        if outcome.get(key):
            reasons.append(
                f"{_count(outcome[key], 'customer-day')} {what}{_examples(samples.get(key), outcome[key])}"
            )
    invoices = outcome.get("invoices") or {}
    held: list[str] = []
    examples: list[dict[str, Any]] = []
    total = 0
    for key, what in _HELD:
        # A dry run counts no outcome, but names the usage it would hold.
        days = outcome.get(key) or (invoices.get(key) or {}).get("customer_days", 0)
        if days:
            held.append(f"{_count(days, 'customer-day')} {what}")
            examples += samples.get(key) or []
            total += days
    if held:
        reasons.append(f"held, not sent: {', '.join(held)}{_examples(examples, total)}")
    return reasons


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


#: Examples named per reason on the summary line (the result's samples hold more).
SUMMARY_EXAMPLES = 2


def _examples(samples: list[dict[str, Any]] | None, count: int) -> str:
    """`` (row 3: ...)``: the first examples, ``e.g.`` when there are more than shown."""
    shown = (samples or [])[:SUMMARY_EXAMPLES]
    if not shown:
        return ""
    return f" ({'e.g. ' if count > len(shown) else ''}{'; '.join(_example(s) for s in shown)})"


def _example(sample: Mapping[str, Any]) -> str:
    """One sample in words: where (the row, or the customer and day), then what is wrong."""
    if "row" in sample:
        where = f"row {sample['row']}"
    elif "customer_id" in sample:
        where = f"{sample['customer_id']}" + (f" on {sample['day']}" if sample.get("day") else "")
    else:
        where = ""
    error = sample.get("error")
    if "rule" in sample:  # a row or a day total that broke an input rule
        what = f"{sample.get('field')} {sample.get('value')} {sample['rule']}"
    elif "row" in sample:  # a row outside Stripe's window
        what = f"{sample.get('customer_id')} at {sample.get('timestamp')}"
    elif sample.get("reason"):
        what = str(sample["reason"])
    elif isinstance(error, Mapping):
        what = str(error.get("message") or error.get("code") or error.get("type") or "")
    else:
        what = ""
    return ": ".join(part for part in (where, what) if part)


def _totals(book: RunBook) -> dict[str, dict[str, Any]]:
    """Per meter: its formula, customer-days, customers, the source's value and what is to be sent."""
    totals: dict[str, dict[str, Any]] = {}
    customers: dict[str, set[str]] = defaultdict(set)

    def entry_of(name: str) -> dict[str, Any]:
        spec = book.specs[name]
        return totals.setdefault(
            name,
            {
                "formula": spec.formula,
                "event_time_window": spec.event_time_window,
                "aggregates": 0,
                "customers": 0,
                "value": 0,
                "recorded": 0,
                "to_send": 0,
            },
        )

    for day in book.days.values():
        plan = day.plan
        entry = entry_of(plan.event_name)
        entry["aggregates"] += 1
        entry["value"] += plan.expected
        adds = book.specs[plan.event_name].kind == ADD
        entry["to_send"] += sum(e.value for e in plan.events) if adds else 0
        customers[plan.event_name].add(plan.customer_id)
    unchanged = book.unchanged
    for name in sorted(unchanged.event_names if unchanged is not None else ()):
        assert unchanged is not None
        entry = entry_of(name)
        entry["aggregates"] += unchanged.groups(name)
        entry["value"] += unchanged.value.get(name, 0)
    for name, entry in totals.items():
        # The customers all of whose days stayed in the database are counted there.
        entry["customers"] = len(customers[name]) + (unchanged.customers.get(name, 0) if unchanged else 0)
    return totals


def _late(
    book: RunBook,
    counts: Counter[DayOutcome],
    by_meter: defaultdict[str, Counter[str]],
    dry: bool,
    late_rows: int,
) -> dict[str, int]:
    """The figures of usage billed late; its problems join the day counts."""
    late_counts: Counter[DayOutcome] = Counter()
    for (name, _, _), day in book.late.items():
        if day.outcome is None:
            continue
        late_counts[day.outcome] += 1
        # As the result counts them: sent is billed_late, already recorded is billed before.
        if day.outcome == DayOutcome.SENT:
            by_meter[name][DayOutcome.BILLED_LATE.value] += 1
        elif day.outcome != DayOutcome.ALREADY_RECORDED:
            by_meter[name][day.outcome.value] += 1
    for outcome in (
        DayOutcome.REJECTED,
        DayOutcome.FAILED,
        DayOutcome.UNCONFIRMED,
        DayOutcome.CUSTOMER_UNKNOWN,
    ):
        counts[outcome] += late_counts[outcome]
    return {
        "billed_late": late_counts[DayOutcome.SENT],
        "billed_late_before": sum(1 for d in book.late.values() if d.plan.action == Action.LEAVE_ALONE)
        + late_counts[DayOutcome.ALREADY_RECORDED],
        "billed_late_value": sum(
            e.value for d in book.late.values() if d.outcome == DayOutcome.SENT for e in d.plan.events
        ),
        "billed_late_rows": late_rows,
    }
