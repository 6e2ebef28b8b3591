"""Operator that bills daily usage from SQL rows in Stripe, so Stripe's daily figures equal the source's."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.operators.base import (
    StripeBaseOperator,
    UsageSourceMixin,
    meter_outlets,
    update_meter_assets,
)
from airflow_provider_stripe_meter.utils.aggregation import paused_gc
from airflow_provider_stripe_meter.utils.billing import (
    ACTIONS,
    ADD,
    COUNT,
    LEAVE_ALONE,
    REPORT,
    DayPlan,
    MeterSpec,
    PlannedEvent,
    is_fresh,
    plan_day,
)
from airflow_provider_stripe_meter.utils.metrics import MeterMetrics
from airflow_provider_stripe_meter.utils.rules import check_fixed_event_name

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate, UsageAggregator
    from airflow_provider_stripe_meter.utils.delivery import DeliveryReport

APIS = ("v1", "v2_stream")
TOO_OLD = ("skip", "bill_at_oldest")
STREAM_BATCH = 100  # Stripe's maximum events per stream request
PROGRESS_SECONDS = 10.0  # progress lines at least this often on long runs
#: Stripe refuses a repeated identifier for at least this long (its documented minimum).
STRIPE_IDENTIFIER_WINDOW = timedelta(hours=24)
#: A day counts as fresh only if it ended this much inside the identifier window.
FRESH_MARGIN = timedelta(hours=1)
#: Events a run may plan for count meters (one event per row) before it refuses to start.
MAX_COUNT_EVENTS = 1_000_000
DAY_OUTCOMES = ("sent", "already_recorded", "rejected", "failed", "over", "customer_unknown", "unconfirmed")

Key = tuple[str, str, date]


class StripeMeterEventBatchOperator(UsageSourceMixin, StripeBaseOperator):
    """
    Bill usage rows so that Stripe's figure for every (meter, customer, UTC day) equals the source's.

    Rows come either from an upstream SQL task (``rows=usage.output``) or from a query this
    operator runs itself (``sql`` with ``sql_conn_id``, any common-sql hook; rows are streamed in
    chunks, so the table never sits in memory). Each row is ``(customer_id, value, timestamp)``,
    with ``event_name`` fourth when no fixed ``event_name`` is given, or a mapping with the names
    given in ``columns``.

    Exactly once, whatever the history of runs: the source's figure for each customer-day is
    computed with the meter's own formula (the sum for ``sum``, the number of rows for
    ``count``, the latest row's value for ``last``; see :mod:`~airflow_provider_stripe_meter.utils.billing`).
    A day that ended less than ``identifier_window`` ago and was never sent for is sent
    straight away, protected by Stripe's identifier rule; every other day is first looked up in
    Stripe's meter event summaries (one request per customer), and only the difference is sent,
    under an identifier that names what it builds on. Late rows are billed once; a source that
    shrank is reported (``over``), and corrected only with ``correct_over=True``; an unknown
    customer is reported, never sent. A meter the operator cannot bill exactly is refused before
    anything is sent.

    Rows older than 35 days (less ``safety_margin``) or more than 5 minutes ahead are skipped;
    rows that break a rule are ``invalid``. Each is counted and sampled in the result, none
    blocks the good rows. When every request fails (an outage), delivery slows to one probe at a
    time and uses up no attempts; an outage longer than ``outage_timeout`` fails the task, and
    its retry (on any worker) looks Stripe up and sends only what is missing.

    Returns (and pushes each key as an XCom): ``success``, ``rows``, ``aggregates``, ``sent``,
    ``already_recorded``, ``over``, ``customer_unknown``, ``unconfirmed``, ``skipped_too_old``,
    ``skipped_future``, ``invalid``, ``rejected``, ``failed``, ``actions``, ``totals`` (per
    event name), ``samples``, ``looked_up`` and delivery figures; with ``dry_run`` also ``plan``.

    .. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api

    :param event_name: The meter's event name for every row; ``None`` reads it from each row.
        (templated)
    :param api: ``"v1"`` (one synchronous request per event) or ``"v2_stream"`` (100 events a
        request through meter event sessions, for days sent for the first time; Stripe drops
        stream duplicates without a word, so every correction goes through v1, which answers).
    :param max_rps: Requests per second, summaries included; default fits the key's mode (20
        test, 900 live).
    :param concurrency: Requests in flight at most (default from ``max_rps``).
    :param max_attempts: Tries per request for 429, 5xx and network errors outside an outage.
    :param outage_timeout: Seconds an outage (every request failing) is ridden out before what
        is left fails the task for its retry.
    :param identifier_prefix: First part of every identifier (default ``usage``). It names the
        events, not the meter's figure: Stripe's summaries count every sender's events, so two
        pipelines must not bill the same meter for the same customers. (templated)
    :param identifier_window: How long Stripe is assumed to refuse a repeated identifier
        (Stripe promises at least 24 hours). Days that ended within it, less an hour, and were
        never sent for are billed without a look at Stripe.
    :param settle_timeout: How long to wait for Stripe's summaries to show an event Stripe
        already holds (a duplicate answer whose figure is not visible yet) before failing the
        task for a retry; a ``timedelta`` or seconds.
    :param correct_over: Bring days where Stripe holds more than the source down to it (a
        negative event on ``sum`` meters, a new figure on ``last`` and pre-aggregated meters).
        Off by default: such days are reported as ``over``.
    :param too_old: What to do with rows older than Stripe's 35 days (less ``safety_margin``):
        ``"skip"`` (default) counts and samples them as ``skipped_too_old``; ``"bill_at_oldest"``
        bills them (``sum`` meters only) at the oldest instant Stripe still accepts, with the
        original day kept in the identifier, counted apart as ``billed_late``. What was billed
        late is remembered in Airflow Variables, so it is billed once, and later look-ups of the
        day it landed on subtract it.
    :param dry_run: Read, check and compare as a real run would, send nothing, and return the
        ``plan``: per customer-day what a real run would do (``send``, ``top_up``,
        ``leave_alone``, ``correct``, ``report``).
    :param plan_limit: Lines of the dry-run ``plan`` kept in the result (totals count them all).
    :param fail_on_error: Fail the task (no retry) when rows are invalid or Stripe rejects an
        aggregate, instead of returning ``success=False``.
    :param customer_payload_key: The meter's ``customer_mapping.event_payload_key``; default the
        meter's.
    :param value_payload_key: The meter's ``value_settings.event_payload_key``; default the
        meter's.

    The source parameters (``rows``, ``sql``, ``sql_conn_id``, ``parameters``, ``columns``,
    ``naive_timezone``, ``safety_margin``, ``chunk_size``, ``sample_limit``) are those of
    :class:`~airflow_provider_stripe_meter.operators.base.UsageSourceMixin`; ``stripe_conn_id``
    and ``stripe_account`` (templated) those of
    :class:`~airflow_provider_stripe_meter.operators.base.StripeBaseOperator`. This operator
    always reads the meters (their formula and id decide what it sends), whatever ``preflight``.
    """

    template_fields: Sequence[str] = (
        "event_name",
        *UsageSourceMixin.source_template_fields,
        "identifier_prefix",
        *StripeBaseOperator.template_fields,
    )

    def __init__(
        self,
        *,
        event_name: str | None = None,
        api: str = "v1",
        max_rps: float | None = None,
        concurrency: int | None = None,
        max_attempts: int = 8,
        outage_timeout: float = 600.0,
        identifier_prefix: str = "usage",
        identifier_window: timedelta = STRIPE_IDENTIFIER_WINDOW,
        settle_timeout: timedelta | float = timedelta(minutes=10),
        correct_over: bool = False,
        too_old: str = "skip",
        dry_run: bool = False,
        plan_limit: int = 10_000,
        fail_on_error: bool = False,
        customer_payload_key: str | None = None,
        value_payload_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not dry_run:
            meter_outlets(kwargs, event_name, kwargs.get("stripe_account"))
        super().__init__(**kwargs)
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        if max_rps is not None and max_rps <= 0:
            raise ValueError(f"max_rps must be positive, got {max_rps!r}")
        if identifier_window <= FRESH_MARGIN:
            raise ValueError(f"identifier_window must be longer than {FRESH_MARGIN}, got {identifier_window}")
        if too_old not in TOO_OLD:
            raise ValueError(f"too_old must be one of {TOO_OLD}, got {too_old!r}")
        check_fixed_event_name(event_name)
        self.event_name = event_name
        self.too_old = too_old
        self.api = api
        self.max_rps = max_rps
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.outage_timeout = outage_timeout
        self.identifier_prefix = identifier_prefix
        self.identifier_window = identifier_window
        self.settle_timeout = (
            settle_timeout.total_seconds() if isinstance(settle_timeout, timedelta) else float(settle_timeout)
        )
        self.correct_over = correct_over
        self.dry_run = dry_run
        self.plan_limit = plan_limit
        self.fail_on_error = fail_on_error
        self.customer_payload_key = customer_payload_key
        self.value_payload_key = value_payload_key

    # -- the task --------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        """Read, aggregate, look up what Stripe holds where needed, plan, send, confirm, report."""
        from airflow_provider_stripe_meter.exceptions import (
            StripeDeliveryIncompleteError,
            StripeEventRejectedError,
        )

        aggregator = self.read_usage(self.event_name, keep_too_old=self.too_old == "bill_at_oldest")
        with paused_gc():
            aggregates = aggregator.finish()
        self._log_problems(aggregator)
        now = int(time.time())
        run = _Run(self, context, now)
        if aggregates or aggregator.too_old:
            run.plan(aggregates, late=aggregator.too_old, oldest=aggregator.oldest)
            if not self.dry_run:
                run.deliver()
                run.confirm()
        outcome = run.outcome(aggregator, aggregates)
        self._log_outcome(outcome)
        if not self.dry_run:
            # Before any failure below, so an alert sees a failed run's figures too.
            meters = set(run.specs) or ({self.event_name} if self.event_name else set())
            MeterMetrics.for_task(context).batch(outcome, meters)
        if outcome["failed"] or outcome["unconfirmed"]:
            context["ti"].xcom_push(key="outcome", value=outcome)
            example = (outcome["samples"].get("failed") or outcome["samples"].get("unconfirmed") or [])[:1]
            raise StripeDeliveryIncompleteError(
                f"{outcome['failed']} customer-days could not be delivered and {outcome['unconfirmed']} not "
                f"confirmed (e.g. {example}); a retry looks Stripe up and sends only what is missing",
                {
                    "type": "delivery_incomplete",
                    "failed": outcome["failed"],
                    "unconfirmed": outcome["unconfirmed"],
                },
            )
        if not outcome["success"] and self.fail_on_error:
            context["ti"].xcom_push(key="outcome", value=outcome)
            raise StripeEventRejectedError(
                f"Usage not fully billed: {outcome['samples']}", {"type": "usage_not_billed"}
            )
        if not self.dry_run:
            update_meter_assets(self, context, _asset_extra(outcome, aggregates))
        return outcome

    def _log_problems(self, aggregator: UsageAggregator) -> None:
        problems = aggregator.problems
        for kind in ("invalid", "skipped_too_old", "skipped_future"):
            if problems.counts[kind]:
                self.log.warning(
                    "%d rows %s, e.g. %s",
                    problems.counts[kind],
                    kind.replace("_", " "),
                    problems.samples[kind][:3],
                )

    def _log_outcome(self, outcome: dict[str, Any]) -> None:
        self.log.info(
            "%s rows %d -> customer-days %d: sent %d, already recorded %d, over %d, customer unknown %d, "
            "rejected %d, failed %d, unconfirmed %d; skipped too old %d, skipped future %d, invalid %d; "
            "looked up %d customer-days in %d summary requests; actions %s",
            "Dry run:" if outcome["dry_run"] else "Billed:",
            *(
                outcome[k]
                for k in (
                    "rows",
                    "aggregates",
                    "sent",
                    "already_recorded",
                    "over",
                    "customer_unknown",
                    "rejected",
                    "failed",
                    "unconfirmed",
                    "skipped_too_old",
                    "skipped_future",
                    "invalid",
                    "looked_up",
                    "summary_requests",
                    "actions",
                )
            ),
        )


class _Run:
    """One execution of the batch operator: the state between planning, sending and confirming."""

    def __init__(self, op: StripeMeterEventBatchOperator, context: Context, now: int) -> None:
        self.op = op
        self.context = context
        self.now = now
        self.hook = op.hook
        self.specs: dict[str, MeterSpec] = {}
        self.plans: dict[Key, DayPlan] = {}
        self.aggregates: dict[Key, DailyAggregate] = {}
        #: Customer-days looked up in Stripe's summaries (each once, however often read).
        self.looked_up: set[Key] = set()
        self.summary_requests = 0
        #: Day outcome per key once known (DAY_OUTCOMES); keys without one were left alone.
        self.status: dict[Key, str] = {}
        #: Keys whose event Stripe already holds but whose figure the summaries do not show yet,
        #: with the figure they showed when the event was planned.
        self.stale: dict[Key, int] = {}
        self.reports: list[DeliveryReport] = []
        self.samples: dict[str, list[dict[str, Any]]] = {}
        #: Usage older than the window (too_old="bill_at_oldest"), planned apart.
        self.late_plans: dict[Key, DayPlan] = {}
        self.late_status: dict[Key, str] = {}
        self.oldest = now

    # -- planning --------------------------------------------------------------------------

    def plan(self, aggregates: list[DailyAggregate], late: list[DailyAggregate], oldest: int) -> None:
        """Read the meters, look up the days that need it, and plan every customer-day."""
        from airflow_provider_stripe_meter.exceptions import StripeMeterUnsupportedError
        from airflow_provider_stripe_meter.utils.billing import MeterUnsupportedError, meter_spec

        op = self.op
        for name in sorted({a.event_name for a in [*aggregates, *late]}):
            meter = self.hook.active_meter(name)  # unknown or inactive: fails before anything is sent
            try:
                self.specs[name] = meter_spec(
                    meter, customer_key=op.customer_payload_key, value_key=op.value_payload_key
                )
            except MeterUnsupportedError as err:
                raise StripeMeterUnsupportedError(
                    str(err), {"type": "meter_unsupported", "meter": meter}
                ) from err
        count_events = sum(a.rows for a in aggregates if self.specs[a.event_name].kind == COUNT)
        if count_events > MAX_COUNT_EVENTS:
            raise StripeMeterUnsupportedError(
                f"{count_events} rows on count meters would be {count_events} events (one per row), over "
                f"the {MAX_COUNT_EVENTS} a run sends; count rows in SQL and bill them on a sum meter",
                {"type": "meter_unsupported", "count_events": count_events},
            )
        self.aggregates = {(a.event_name, a.customer_id, a.day): a for a in aggregates}
        if late:
            self._plan_late(late, oldest)
        to_look_up = self._days_to_look_up()
        recorded, unknown = self._look_up(to_look_up)
        for key, aggregate in self.aggregates.items():
            looked = key in to_look_up
            self.plans[key] = plan_day(
                aggregate,
                self.specs[key[0]],
                recorded.get(key, 0) if looked else None,
                prefix=op.identifier_prefix,
                now=self.now,
                correct_over=op.correct_over,
                customer_unknown=looked and (key[0], key[1]) in unknown,
            )

    def _plan_late(self, late: list[DailyAggregate], oldest: int) -> None:
        """Plan usage older than the window: billed once, at the oldest instant Stripe accepts."""
        from airflow_provider_stripe_meter.exceptions import StripeMeterUnsupportedError
        from airflow_provider_stripe_meter.utils.billing import plan_late

        # A minute inside the window, so the event cannot expire between planning and sending.
        self.oldest = oldest + 60
        for name in {a.event_name for a in late}:
            spec = self.specs[name]
            if spec.kind != ADD:
                raise StripeMeterUnsupportedError(
                    f"too_old='bill_at_oldest' needs a raw sum meter; meter {spec.meter_id} ({name!r}) "
                    f"aggregates by {spec.formula!r} (event_time_window={spec.event_time_window!r}), where "
                    "a late event would change another day's figure. Use too_old='skip'.",
                    {"type": "meter_unsupported", "meter_id": spec.meter_id},
                )
        billed: dict[Key, int] = {}
        for name in {a.event_name for a in late}:
            days = {a.day for a in late if a.event_name == name}
            for original, by_customer in self._landings(self.specs[name]).billed(days).items():
                billed.update({(name, customer, original): value for customer, value in by_customer.items()})
        for aggregate in late:
            key = (aggregate.event_name, aggregate.customer_id, aggregate.day)
            self.late_plans[key] = plan_late(
                aggregate, billed.get(key, 0), prefix=self.op.identifier_prefix, at=self.oldest
            )

    def _landings(self, spec: MeterSpec) -> Any:
        from airflow_provider_stripe_meter.utils.sent_days import LateLandings

        return LateLandings(self.hook.stripe_account, spec.meter_id, self.op.identifier_prefix)

    def _days_to_look_up(self) -> set[Key]:
        """Customer-days whose Stripe figure must be read before sending: old, or marked as sent."""
        fresh_window = self.op.identifier_window - FRESH_MARGIN
        fresh_days = {key[2] for key in self.aggregates if is_fresh(key[2], self.now, fresh_window)}
        marked: dict[str, set[date]] = {}
        for name, spec in self.specs.items():
            marked[name] = self._marks(spec).marked(fresh_days) if fresh_days else set()
        return {key for key in self.aggregates if key[2] not in fresh_days or key[2] in marked[key[0]]}

    def _look_up(self, keys: set[Key]) -> tuple[dict[Key, int], set[tuple[str, str]]]:
        """Stripe's figures for ``keys``: one summaries request per (meter, customer)."""
        recorded: dict[Key, int] = {}
        unknown: set[tuple[str, str]] = set()
        by_meter: dict[str, dict[str, list[date]]] = {}
        for name, customer, day in keys:
            by_meter.setdefault(name, {}).setdefault(customer, []).append(day)
        for name, customers in by_meter.items():
            days = [day for listed in customers.values() for day in listed]
            found, missing = self.hook.recorded_per_day(
                self.specs[name].meter_id, sorted(customers), min(days), max(days), max_rps=self._max_rps()
            )
            self.summary_requests += len(customers)
            recorded.update({(name, c, d): v for (c, d), v in found.items()})
            # Late usage billed onto these days (too_old="bill_at_oldest") is not theirs.
            landings = self._landings(self.specs[name])
            landed = landings.read(days) if landings.used() else {}
            for landing_day, by_customer in landed.items():
                for customer, amounts in by_customer.items():
                    key = (name, customer, landing_day)
                    if key in recorded:
                        recorded[key] -= sum(amounts.values())
            unknown.update((name, c) for c in missing)
        self.looked_up |= keys
        return recorded, unknown

    def _marks(self, spec: MeterSpec) -> Any:
        from airflow_provider_stripe_meter.utils.sent_days import SentDays

        return SentDays(self.hook.stripe_account, spec.meter_id, self.op.identifier_prefix)

    def _max_rps(self) -> float:
        from airflow_provider_stripe_meter.utils.delivery import default_max_rps

        return self.op.max_rps or default_max_rps(self.hook.livemode)

    # -- sending ---------------------------------------------------------------------------

    def deliver(self) -> None:
        """Mark the fresh days about to be sent, then send every planned event."""
        ti = self.context["ti"]
        blind_days: dict[str, set[date]] = {}
        for plan in self.plans.values():
            if plan.events and plan.recorded is None:
                blind_days.setdefault(plan.event_name, set()).add(plan.day)
        for name, days in blind_days.items():
            # Before the first event leaves: a retry, re-run or overlapping run then looks first.
            self._marks(self.specs[name]).mark(
                days, {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id, "marked_at": self.now}
            )
        fresh_window = self.op.identifier_window - FRESH_MARGIN
        oldest_fresh = min(
            (d for d in {k[2] for k in self.aggregates} if is_fresh(d, self.now, fresh_window)), default=None
        )
        if oldest_fresh is not None:
            for spec in self.specs.values():
                self._marks(spec).forget_before(oldest_fresh)
        self._send([e for plan in self.plans.values() for e in plan.events])
        self._send_late()

    def _send_late(self) -> None:
        """Record where late usage lands (before sending, undone for what fails), then send it."""
        events = [e for plan in self.late_plans.values() for e in plan.events]
        if not events:
            return
        landing_day = _day_of(self.oldest)
        by_meter: dict[str, dict[str, dict[str, int]]] = {}
        for event in events:
            amounts = by_meter.setdefault(event.event_name, {}).setdefault(event.customer_id, {})
            amounts[event.day.isoformat()] = amounts.get(event.day.isoformat(), 0) + event.value
        for name, amounts in by_meter.items():
            self._landings(self.specs[name]).add(landing_day, amounts)
        report = self._deliverer("v1").run(events)
        self.reports.append(report)
        undo: dict[str, dict[str, dict[str, int]]] = {}
        for event in [*report.failed_items, *report.rejected_items]:
            amounts = undo.setdefault(event.event_name, {}).setdefault(event.customer_id, {})
            amounts[event.day.isoformat()] = amounts.get(event.day.isoformat(), 0) - event.value
        for name, amounts in undo.items():
            self._landings(self.specs[name]).add(landing_day, amounts)
        failed = {id(e) for e in report.failed_items}
        rejected = {id(e) for e in report.rejected_items}
        already = {id(e) for e in report.already}
        for event in events:
            status = (
                "failed"
                if id(event) in failed
                else "rejected"
                if id(event) in rejected
                else "already_recorded"
                if id(event) in already
                else "sent"
            )
            self.late_status[event.key] = status

    def _send(self, events: list[PlannedEvent]) -> None:
        """Send ``events`` (stream where allowed) and settle each customer-day's status."""
        if not events:
            return
        stream = [e for e in events if self.op.api == "v2_stream" and e.blind]
        single = [e for e in events if not (self.op.api == "v2_stream" and e.blind)]
        for batch, api in ((stream, "v2_stream"), (single, "v1")):
            if batch:
                report = self._deliverer(api).run(batch)
                self.reports.append(report)
                self._settle(batch, report)

    def _deliverer(self, api: str) -> Any:
        from airflow_provider_stripe_meter.utils.delivery import Deliverer
        from airflow_provider_stripe_meter.utils.rules import rfc3339

        hook, specs, op = self.hook, self.specs, self.op
        if api == "v1":

            def send(batch: list[PlannedEvent]) -> None:
                [event] = batch
                hook.create_meter_event(event.as_meter_event(), **specs[event.event_name].payload_keys)

            batch_size = 1
        else:
            session = hook.meter_event_stream()

            def send(batch: list[PlannedEvent]) -> None:
                session.send(
                    [
                        {
                            "event_name": e.event_name,
                            "identifier": e.identifier,
                            "timestamp": rfc3339(e.timestamp),
                            "payload": {
                                specs[e.event_name].customer_key: e.customer_id,
                                specs[e.event_name].value_key: str(e.value),
                            },
                        }
                        for e in batch
                    ]
                )

            batch_size = STREAM_BATCH
        return Deliverer(
            send,
            key=lambda e: (e.event_name, e.customer_id),
            describe=PlannedEvent.describe,
            batch_size=batch_size,
            max_rps=self._max_rps(),
            concurrency=op.concurrency,
            max_attempts=op.max_attempts,
            outage_timeout=op.outage_timeout,
            progress=lambda line: op.log.info("Delivery (%s): %s", api, line),
            progress_every=PROGRESS_SECONDS,
            sample_limit=op.sample_limit,
        )

    def _settle(self, events: list[PlannedEvent], report: DeliveryReport) -> None:
        """Each customer-day's status from what happened to its events."""
        failed = {id(e) for e in report.failed_items}
        rejected_keys = {e.key for e in report.rejected_items}
        already = {id(e) for e in report.already}
        by_key: dict[Key, list[PlannedEvent]] = {}
        for event in events:
            by_key.setdefault(event.key, []).append(event)
        for key, group in by_key.items():
            plan = self.plans[key]
            if key in rejected_keys:
                self.status[key] = "rejected"
            elif any(id(e) in failed for e in group):
                self.status[key] = "failed"
            elif any(id(e) in already for e in group) and self.specs[key[0]].kind != COUNT:
                # Stripe holds an event with this identifier, built on the figure this plan saw;
                # its own value is not known until the summaries show it.
                self.stale[key] = plan.recorded or 0
                self.status[key] = "unconfirmed"
            elif all(id(e) in already for e in group):
                self.status[key] = "already_recorded"
            else:
                self.status[key] = "sent"

    # -- confirming ------------------------------------------------------------------------

    def confirm(self) -> None:
        """Wait for the summaries to show what duplicate answers hid, then send what is still missing."""
        deadline = time.monotonic() + self.op.settle_timeout
        first = True
        while self.stale:
            if not first:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(5.0, remaining))
            first = False
            recorded, unknown = self._look_up(set(self.stale))
            again: list[PlannedEvent] = []
            for key, seen_before in list(self.stale.items()):
                figure = recorded.get(key, 0)
                plan = self.plans[key]
                if figure == plan.expected:
                    del self.stale[key]
                    self.status[key] = "already_recorded"
                elif figure != seen_before:
                    # The summaries moved: plan again from what they show now.
                    del self.stale[key]
                    replanned = plan_day(
                        self.aggregates[key],
                        self.specs[key[0]],
                        figure,
                        prefix=self.op.identifier_prefix,
                        now=self.now,
                        correct_over=self.op.correct_over,
                        customer_unknown=(key[0], key[1]) in unknown,
                    )
                    self.plans[key] = replanned
                    if replanned.action == REPORT:
                        self.status[key] = (
                            "customer_unknown" if replanned.reason == "customer_unknown" else "over"
                        )
                    elif replanned.action == LEAVE_ALONE:
                        self.status[key] = "already_recorded"
                    again.extend(replanned.events)
            self._send(again)
        for key in self.stale:
            self._sample(
                "unconfirmed",
                {
                    "event_name": key[0],
                    "customer_id": key[1],
                    "day": key[2].isoformat(),
                    "expected": self.plans[key].expected,
                    "reason": "Stripe holds an event for this day that its summaries do not show yet",
                },
            )

    # -- reporting -------------------------------------------------------------------------

    def _sample(self, kind: str, detail: dict[str, Any]) -> None:
        bucket = self.samples.setdefault(kind, [])
        if len(bucket) < self.op.sample_limit:
            bucket.append(detail)

    def outcome(self, aggregator: UsageAggregator, aggregates: list[DailyAggregate]) -> dict[str, Any]:
        """The task's result: per-day outcomes, actions, totals, problems and delivery figures."""
        counts = dict.fromkeys(DAY_OUTCOMES, 0)
        actions = dict.fromkeys(ACTIONS, 0)
        totals: dict[str, dict[str, Any]] = {}
        customers: dict[str, set[str]] = {}
        # What became of each customer-day, per meter: the figures metrics are tagged with.
        by_meter: defaultdict[str, Counter[str]] = defaultdict(Counter)
        for key, plan in self.plans.items():
            actions[plan.action] += 1
            status = self.status.get(key)
            if status is None and plan.action == REPORT:
                status = _reported(plan)
                self._sample(status, plan.line())
            elif status is None and plan.action == LEAVE_ALONE and plan.recorded is not None:
                status = "already_recorded"
            if status is not None and not self.op.dry_run:
                counts[status] += 1
                by_meter[plan.event_name][status] += 1
            entry = totals.setdefault(
                plan.event_name,
                {
                    "formula": self.specs[plan.event_name].formula,
                    "event_time_window": self.specs[plan.event_name].event_time_window,
                    "aggregates": 0,
                    "customers": 0,
                    "value": 0,
                    "recorded": 0,
                    "to_send": 0,
                },
            )
            entry["aggregates"] += 1
            entry["value"] += plan.expected
            entry["to_send"] += (
                sum(e.value for e in plan.events) if self.specs[plan.event_name].kind == ADD else 0
            )
            in_stripe = status in ("sent", "already_recorded") or (
                status is None and plan.action == LEAVE_ALONE
            )
            entry["recorded"] += plan.expected if in_stripe else (plan.recorded or 0)
            customers.setdefault(plan.event_name, set()).add(plan.customer_id)
        for name, entry in totals.items():
            entry["customers"] = len(customers[name])
        problem_counts = aggregator.problems.counts
        samples: dict[str, list[dict[str, Any]]] = dict(aggregator.problems.samples)
        for report in self.reports:
            for kind, bucket in report.samples.items():
                samples.setdefault(kind, []).extend(
                    bucket[: self.op.sample_limit - len(samples.get(kind, []))]
                )
        samples.update(self.samples)
        outcome: dict[str, Any] = {
            "rows": aggregator.rows,
            "aggregates": len(aggregates),
            **counts,
            "skipped_too_old": problem_counts["skipped_too_old"],
            "skipped_future": problem_counts["skipped_future"],
            "invalid": problem_counts["invalid"],
            "actions": actions,
            "totals": totals,
            "samples": samples,
            "dry_run": self.op.dry_run,
            "api": self.op.api,
            "looked_up": len(self.looked_up),
            "summary_requests": self.summary_requests,
            "events_sent": sum(r.sent for r in self.reports),
            "requests": sum(r.requests for r in self.reports),
            "rate_limited": sum(r.rate_limited for r in self.reports),
            "outages": sum(r.outages for r in self.reports),
            "seconds": round(sum(r.seconds for r in self.reports), 3),
        }
        late_counts = dict.fromkeys(("sent", "already_recorded", "rejected", "failed"), 0)
        for key, status in self.late_status.items():
            late_counts[status] += 1
            # As the outcome counts them: sent is billed_late, already recorded is billed before.
            if status != "already_recorded":
                by_meter[key[0]]["billed_late" if status == "sent" else status] += 1
        late_over = [plan for plan in self.late_plans.values() if plan.action == REPORT]
        for plan in late_over:
            self._sample("over", plan.line())
            if not self.op.dry_run:
                by_meter[plan.event_name]["over"] += 1
        outcome["by_meter"] = {name: dict(figures) for name, figures in by_meter.items()}
        outcome["billed_late"] = late_counts["sent"]
        outcome["billed_late_before"] = (
            sum(1 for plan in self.late_plans.values() if plan.action == LEAVE_ALONE)
            + late_counts["already_recorded"]
        )
        outcome["billed_late_value"] = sum(
            e.value
            for key, plan in self.late_plans.items()
            for e in plan.events
            if self.late_status.get(key) == "sent"
        )
        outcome["billed_late_rows"] = aggregator.too_old_rows
        outcome["rejected"] += late_counts["rejected"]
        outcome["failed"] += late_counts["failed"]
        outcome["over"] += 0 if self.op.dry_run else len(late_over)
        if self.op.dry_run:
            lines = [plan.line() for plan in [*self.plans.values(), *self.late_plans.values()]]
            outcome["plan"] = lines[: self.op.plan_limit]
            outcome["plan_truncated"] = len(lines) > self.op.plan_limit
        problems = ("skipped_too_old", "skipped_future", "invalid", "rejected", "failed", "over")
        problems += ("customer_unknown", "unconfirmed")
        reported = actions[REPORT] + len(late_over)
        outcome["success"] = not any(outcome[k] for k in problems) and (not self.op.dry_run or not reported)
        return outcome


def _reported(plan: DayPlan) -> str:
    """The outcome of a day planned as ``report``."""
    return "customer_unknown" if plan.reason == "customer_unknown" else "over"


def _day_of(seconds: int) -> date:
    """The UTC day of unix ``seconds``."""
    return datetime.fromtimestamp(seconds, timezone.utc).date()


def _asset_extra(outcome: dict[str, Any], aggregates: list[DailyAggregate]) -> dict[str, Any]:
    """The run's figures for the meter Asset's event: what a downstream DAG needs to know."""
    return {
        "success": outcome["success"],
        "days": sorted({a.day.isoformat() for a in aggregates}),
        "customers": len({a.customer_id for a in aggregates}),
        "aggregates": outcome["aggregates"],
        "sent": outcome["sent"],
        "already_recorded": outcome["already_recorded"],
        "totals": {
            name: {k: v for k, v in t.items() if k in ("value", "recorded")}
            for name, t in outcome["totals"].items()
        },
        "problems": {
            k: outcome[k]
            for k in ("skipped_too_old", "invalid", "rejected", "over", "customer_unknown")
            if outcome[k]
        },
    }
