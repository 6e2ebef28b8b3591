"""Operator that bills daily usage from SQL rows in Stripe, so Stripe's daily figures equal the source's."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from itertools import combinations
from typing import TYPE_CHECKING, Any, Literal

from airflow_provider_stripe_meter.billing.plans import (
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
from airflow_provider_stripe_meter.metrics import MeterMetrics
from airflow_provider_stripe_meter.operators.base import (
    StripeBaseOperator,
    UsageSourceMixin,
    meter_outlets,
    update_meter_assets,
)
from airflow_provider_stripe_meter.utils import clock
from airflow_provider_stripe_meter.utils.aggregation import paused_gc
from airflow_provider_stripe_meter.utils.rules import SECONDS_PER_DAY, check_fixed_event_name

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_stripe_meter.state.day_journal import DayMark
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
CONFIRM = ("meter", "summaries")
#: Days a mark is kept past Stripe's 35-day window (no event can reach an older day).
MARK_DAYS = 36
#: Re-reads of summaries when another run sent to the same days while this one read them.
MAX_REREADS = 3
#: Pending late events of one customer and minute settled by trying every subset, at most.
MAX_PENDING_GROUP = 12

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
    ``count``, the latest row's value for ``last``; see :mod:`~airflow_provider_stripe_meter.billing.plans`).
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
        never sent for are billed without a look at Stripe. ``None`` looks every day up (after
        the metadata database, and so the marks, were lost).
    :param settle_timeout: How long to wait for Stripe's summaries to show an event Stripe
        already holds (a duplicate answer whose figure is not visible yet) before failing the
        task for a retry; a ``timedelta`` or seconds.
    :param summary_lag: How long Stripe's meter summaries may trail the events it accepted (they
        are eventually consistent). A day any run sent to less than this ago is read only once
        this has passed since that send, so a summary that has not caught up is never taken as
        what Stripe holds; a ``timedelta`` or seconds.
    :param confirm: What a run checks before it reports ``success``. ``"meter"`` (default, one
        request per meter): every event was answered and the meter was still active, and never
        deactivated, after the last one. ``"summaries"`` also reads back, once ``summary_lag``
        has passed, every customer-day it sent to (one request per customer), so a customer
        Stripe does not know or an event Stripe dropped ends the run as not confirmed.
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
        identifier_window: timedelta | None = STRIPE_IDENTIFIER_WINDOW,
        settle_timeout: timedelta | float = timedelta(minutes=10),
        summary_lag: timedelta | float | None = None,
        confirm: Literal["meter", "summaries"] = "meter",
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
        if identifier_window is not None and identifier_window <= FRESH_MARGIN:
            raise ValueError(f"identifier_window must be longer than {FRESH_MARGIN}, got {identifier_window}")
        if confirm not in CONFIRM:
            raise ValueError(f"confirm must be one of {CONFIRM}, got {confirm!r}")
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
        self.summary_lag = summary_lag.total_seconds() if isinstance(summary_lag, timedelta) else summary_lag
        self.confirm = confirm
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
        now = int(clock.now())
        run = _Run(self, context, now)
        if aggregates or aggregator.too_old:
            run.plan(aggregates, late=aggregator.too_old, oldest=aggregator.oldest)
            if not self.dry_run:
                run.deliver()
                run.confirm()
                run.check_meters()
                if self.confirm == "summaries":
                    run.read_back()
        outcome = run.outcome(aggregator, aggregates)
        self._log_outcome(outcome)
        if not self.dry_run:
            # Before any failure below, so an alert sees a failed run's figures too.
            meters = set(run.specs) or ({self.event_name} if self.event_name else set())
            MeterMetrics.for_task(context).batch(outcome, meters)
        if run.deactivated:
            from airflow_provider_stripe_meter.exceptions import StripeMeterDeactivatedError

            context["ti"].xcom_push(key="outcome", value=outcome)
            raise StripeMeterDeactivatedError(
                f"Meter(s) {', '.join(sorted(run.deactivated))} stopped being active during the run: Stripe "
                f"drops events sent to an inactive meter, so {outcome['unconfirmed']} customer-days are not "
                "billed. Reactivate the meter (or fix the event name) and re-run: the re-run reads what "
                "Stripe holds and sends what is missing.",
                {"type": "meter_deactivated", "meters": sorted(run.deactivated)},
            )
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
        self.summary_lag = float(op.summary_lag if op.summary_lag is not None else op.hook.summary_lag)
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
        #: Per meter, the journal's marks of the days this run bills (read at planning).
        self.journal: dict[str, dict[date, DayMark]] = {}
        #: Meters that were not active (or were deactivated) after this run sent to them.
        self.deactivated: set[str] = set()
        #: Each meter's last deactivation as the run found it when planning (``None``: never).
        self.deactivated_at: dict[str, int | None] = {}
        #: Customer-days sent to whose figure was read back equal (confirm="summaries").
        self.confirmed: set[Key] = set()
        #: Pending late events of earlier, cut-off runs that this run found landed in Stripe.
        self.late_settled = 0

    # -- planning --------------------------------------------------------------------------

    def plan(self, aggregates: list[DailyAggregate], late: list[DailyAggregate], oldest: int) -> None:
        """Read the meters, look up the days that need it, and plan every customer-day."""
        from airflow_provider_stripe_meter.billing.plans import MeterUnsupportedError, meter_spec
        from airflow_provider_stripe_meter.exceptions import StripeMeterUnsupportedError

        op = self.op
        for name in sorted({a.event_name for a in [*aggregates, *late]}):
            meter = self.hook.active_meter(name)  # unknown or inactive: fails before anything is sent
            self.deactivated_at[name] = (meter.get("status_transitions") or {}).get("deactivated_at")
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
        for name, spec in self.specs.items():
            self.journal[name] = self._marks(spec).read(k[2] for k in self.aggregates if k[0] == name)
            if self._landings(spec).used():
                # Late events whose fate a killed or cut-off run never learnt: settled from
                # Stripe before anything reads the days they landed on.
                self._settle_pending_late(spec)
        if late:
            self._plan_late(late, oldest)
        to_look_up = self._days_to_look_up()
        recorded, unknown = self._read_settled(to_look_up)
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
                version=self._version(key),
            )

    def _version(self, key: Key) -> int:
        mark = self.journal.get(key[0], {}).get(key[2])
        return mark.version if mark else 0

    def _read_settled(self, keys: set[Key]) -> tuple[dict[Key, int], set[tuple[str, str]]]:
        """Stripe's figures for ``keys``, read only once its summaries can be trusted.

        A summary read less than ``summary_lag`` after a send to its day may not show that send
        yet, so the read waits for it. A run that starts sending to one of the days while this
        one reads is caught by reading the journal again afterwards; those days are read again
        once settled.
        """
        by_meter = _days_of(keys)
        self._await_settled(by_meter, self.journal)
        recorded, unknown = self._look_up(keys)
        for _ in range(MAX_REREADS):
            moved: dict[str, dict[date, DayMark]] = {}
            for name, days in by_meter.items():
                now_marks = self._marks(self.specs[name]).read(days)
                changed = {d: m for d, m in now_marks.items() if m != self.journal[name].get(d)}
                if changed:
                    moved[name] = changed
                    self.journal[name].update(changed)
            if not moved:
                break
            again = {k for k in keys if k[2] in moved.get(k[0], {})}
            self.op.log.info(
                "Another run sent to %d of these customer-days while they were read; reading them again",
                len(again),
            )
            self._await_settled({n: set(marks) for n, marks in moved.items()}, self.journal)
            fresh_figures, fresh_unknown = self._look_up(again)
            for key in again:
                recorded.pop(key, None)
            recorded.update(fresh_figures)
            unknown |= fresh_unknown
        return recorded, unknown

    def _await_settled(self, days: dict[str, set[date]], marks: dict[str, dict[date, DayMark]]) -> None:
        """Sleep until ``summary_lag`` has passed since the last send (by any run) to ``days``."""
        last = max(
            (marks[name][d].last_send for name, ds in days.items() for d in ds if d in marks.get(name, {})),
            default=0.0,
        )
        self._sleep_until(last + self.summary_lag, "the last send to these days")

    def _sleep_until(self, moment: float, why: str) -> None:
        wait = moment - clock.now()
        if wait > 0:
            self.op.log.info("Waiting %.1f s for Stripe's summaries to settle after %s", wait, why)
            time.sleep(wait)

    def _plan_late(self, late: list[DailyAggregate], oldest: int) -> None:
        """Plan usage older than the window: billed once, at the oldest instant Stripe accepts."""
        from airflow_provider_stripe_meter.billing.plans import plan_late
        from airflow_provider_stripe_meter.exceptions import StripeMeterUnsupportedError

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
        from airflow_provider_stripe_meter.state.late_billing import LateLandings

        return LateLandings(self.hook.stripe_account, spec.meter_id, self.op.identifier_prefix)

    def _days_to_look_up(self) -> set[Key]:
        """Customer-days whose Stripe figure must be read before sending: old, or marked as sent."""
        if self.op.identifier_window is None:
            return set(self.aggregates)  # nothing sent blind: every day is looked up
        fresh_window = self.op.identifier_window - FRESH_MARGIN
        fresh_days = {key[2] for key in self.aggregates if is_fresh(key[2], self.now, fresh_window)}
        return {key for key in self.aggregates if key[2] not in fresh_days or key[2] in self.journal[key[0]]}

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
        from airflow_provider_stripe_meter.state.day_journal import SentDays

        return SentDays(self.hook.stripe_account, spec.meter_id, self.op.identifier_prefix)

    def _max_rps(self) -> float:
        from airflow_provider_stripe_meter.utils.delivery import default_max_rps

        return self.op.max_rps or default_max_rps(self.hook.livemode)

    # -- sending ---------------------------------------------------------------------------

    def deliver(self) -> None:
        """Mark the days about to be sent to, send every planned event, then record a new version."""
        days = _days_of(plan.key for plan in self.plans.values() if plan.events)
        # Marks of days past Stripe's window only: no event can reach those, so no run needs them.
        oldest_kept = _day_of(self.now - MARK_DAYS * SECONDS_PER_DAY)
        for spec in self.specs.values():
            self._marks(spec).forget_older_than(oldest_kept)
        with self._sending(days):
            self._send([e for plan in self.plans.values() for e in plan.events])
        self._send_late()

    @contextmanager
    def _sending(self, days: dict[str, set[date]]) -> Iterator[None]:
        """Journal ``days`` before the first event leaves and again once every answer is in.

        Before: a retry, re-run, hourly run or overlapping run then looks Stripe up first, and
        waits ``summary_lag`` before it trusts what it reads. After: a new version, so the next
        figure of the day gets identifiers of its own. A process killed in between leaves the
        version as it was: its retry derives the same identifiers, and Stripe refuses copies.
        """
        from airflow_provider_stripe_meter.state.day_journal import DayMark

        ti = self.context["ti"]
        detail = {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id}
        for name, ds in days.items():
            self._marks(self.specs[name]).sending(ds, detail, clock.now())
        try:
            yield
        finally:
            for name, ds in days.items():
                used = {d: self._version((name, "", d)) for d in ds}
                self._marks(self.specs[name]).sent(used, detail, clock.now())
                for day in ds:
                    mark = self.journal[name].get(day)
                    # The version this run's later sends (confirming) build on.
                    self.journal[name][day] = DayMark((mark.version if mark else 0) + 1, clock.now())

    def _send_late(self) -> None:
        """Send usage older than the window: written as pending first, counted once Stripe answers."""
        events = [e for plan in self.late_plans.values() for e in plan.events]
        if not events:
            return
        at = self._landing_instant(events)
        events = [replace(e, timestamp=at) for e in events]
        for event in events:
            self.late_plans[event.key].events = [event]
        minute = at - at % 60
        entries: dict[str, dict[str, Any]] = {}
        for name in sorted({e.event_name for e in events}):
            spec = self.specs[name]
            customers = sorted({e.customer_id for e in events if e.event_name == name})
            # What the landing minute holds before: the settled figure the next run compares
            # with, should this run never learn what became of its events.
            baselines = {c: self.hook.usage_between(spec.meter_id, c, minute, minute + 60) for c in customers}
            mine = [
                {
                    "event_name": name,
                    "customer": e.customer_id,
                    "day": e.day.isoformat(),
                    "value": e.value,
                    "identifier": e.identifier,
                    "at": at,
                    "landing_day": _day_of(at).isoformat(),
                    "baseline": baselines[e.customer_id] or 0,
                    "written_at": clock.now(),
                }
                for e in events
                if e.event_name == name
            ]
            self._landings(spec).add_pending(mine)
            entries.update({entry["identifier"]: entry for entry in mine})
        landing = {name: {_day_of(at)} for name in {e.event_name for e in events}}
        with self._sending(landing):
            report = self._deliverer("v1").run(events)
        self.reports.append(report)
        failed = {id(e) for e in report.failed_items}
        rejected = {id(e) for e in report.rejected_items}
        already = {id(e) for e in report.already}
        for name in sorted({e.event_name for e in events}):
            landings = self._landings(self.specs[name])
            mine = [e for e in events if e.event_name == name]
            # Answered: Stripe holds it. Rejected: it never landed. Failed: unknown, so it stays
            # pending and the next run settles it from the landing minute's summary.
            landings.confirm(entries[e.identifier] for e in mine if id(e) not in failed | rejected)
            landings.drop_pending(e.identifier for e in mine if id(e) in rejected)
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

    def _landing_instant(self, events: list[PlannedEvent]) -> int:
        """The oldest instant Stripe takes, moved to a minute none of this run's other events use.

        The landing minute is how a later run tells whether a pending late event landed, so no
        event of the same customers planned by this run may share it.
        """
        customers = {(e.event_name, e.customer_id) for e in events}
        taken = {
            e.timestamp // 60
            for plan in self.plans.values()
            for e in plan.events
            if (e.event_name, e.customer_id) in customers
        }
        at = self.oldest
        while at // 60 in taken:
            at += 60
        return at

    def _settle_pending_late(self, spec: MeterSpec) -> None:
        """Decide, from Stripe's summary of each landing minute, which pending late events landed.

        The minute's figure less what it held before the send is what of the pending events
        landed: the combination of them whose values add up to it is counted as billed late,
        the rest is forgotten (and billed again). A figure no combination explains fails the
        run before anything is sent.
        """
        from airflow_provider_stripe_meter.exceptions import StripeDeliveryIncompleteError

        landings = self._landings(spec)
        pending = landings.pending()
        if not pending:
            return
        self._sleep_until(max(e["written_at"] for e in pending) + self.summary_lag, "a cut-off late send")
        groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
        for entry in pending:
            groups[(entry["customer"], int(entry["at"]))].append(entry)
        landed: list[dict[str, Any]] = []
        lost: list[dict[str, Any]] = []
        for (customer, at), group in sorted(groups.items()):
            minute = at - at % 60
            figure = self.hook.usage_between(spec.meter_id, customer, minute, minute + 60)
            arrived = (figure or 0) - group[0]["baseline"]
            chosen = _combination(group, arrived)
            if chosen is None:
                raise StripeDeliveryIncompleteError(
                    f"Cannot tell which late events of {customer} landed: Stripe's figure for the minute "
                    f"{datetime.fromtimestamp(minute, timezone.utc).isoformat()} grew by {arrived}, which no "
                    f"combination of the pending values {[e['value'] for e in group]} explains",
                    {"type": "late_unsettled", "customer_id": customer, "arrived": arrived},
                )
            landed += chosen
            lost += [e for e in group if e not in chosen]
        self.op.log.info(
            "Late events left pending by an earlier run: %d landed in Stripe, %d did not (sent again)",
            len(landed),
            len(lost),
        )
        self.late_settled += len(landed)
        landings.confirm(landed)
        landings.drop_pending(e["identifier"] for e in lost)

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
        if self.stale:
            # Our own sends (and the copy Stripe refused) must have had time to show.
            self._await_settled(_days_of(self.stale), self.journal)
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
                        version=self._version(key),
                    )
                    self.plans[key] = replanned
                    if replanned.action == REPORT:
                        self.status[key] = (
                            "customer_unknown" if replanned.reason == "customer_unknown" else "over"
                        )
                    elif replanned.action == LEAVE_ALONE:
                        self.status[key] = "already_recorded"
                    again.extend(replanned.events)
            if again:
                with self._sending(_days_of(e.key for e in again)):
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

    def check_meters(self) -> None:
        """Read each meter sent to once more: Stripe drops events of a meter deactivated meanwhile.

        One request per meter. A meter that is inactive now, or whose last deactivation is not the
        one the run saw when it planned (deactivated and reactivated meanwhile), leaves every
        customer-day sent to it unconfirmed.
        """
        sent_to = {k[0] for k, status in self.status.items() if status in ("sent", "already_recorded")}
        sent_to |= {k[0] for k, status in self.late_status.items() if status == "sent"}
        for name in sorted(sent_to):
            meter = self.hook.retrieve_meter(self.specs[name].meter_id)
            deactivated_at = (meter.get("status_transitions") or {}).get("deactivated_at")
            if meter.get("status") == "active" and deactivated_at == self.deactivated_at.get(name):
                continue
            self.deactivated.add(name)
            for key, status in self.status.items():
                if key[0] == name and status == "sent":
                    self.status[key] = "unconfirmed"
                    self._sample(
                        "unconfirmed",
                        {
                            "event_name": name,
                            "customer_id": key[1],
                            "day": key[2].isoformat(),
                            "expected": self.plans[key].expected,
                            "reason": f"meter {self.specs[name].meter_id} was deactivated during the run",
                        },
                    )

    def read_back(self) -> None:
        """Read back every customer-day sent to, once settled (``confirm="summaries"``)."""
        keys = {k for k, status in self.status.items() if status == "sent"}
        if not keys:
            return
        self._await_settled(_days_of(keys), self.journal)
        recorded, unknown = self._look_up(keys)
        for key in keys:
            plan = self.plans[key]
            if (key[0], key[1]) in unknown:
                self.status[key] = "customer_unknown"
                self._sample("customer_unknown", {**plan.line(), "reason": "Stripe does not know it"})
            elif recorded.get(key, 0) == plan.expected:
                self.confirmed.add(key)
            else:
                self.status[key] = "unconfirmed"
                self._sample(
                    "unconfirmed",
                    {
                        **plan.line(),
                        "recorded_after": recorded.get(key, 0),
                        "reason": "Stripe accepted the events but its settled summary differs",
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
            "confirm": self.op.confirm,
            # Sent and answered, but never read back from Stripe's summaries (confirm="meter").
            "unverified": sum(1 for k, st in self.status.items() if st == "sent" and k not in self.confirmed),
            "confirmed": len(self.confirmed),
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
        outcome["billed_late_settled"] = self.late_settled
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


def _days_of(keys: Iterable[Key]) -> dict[str, set[date]]:
    """The days of ``keys`` (event name, customer, day), per event name."""
    days: dict[str, set[date]] = defaultdict(set)
    for name, _, day in keys:
        days[name].add(day)
    return dict(days)


def _combination(entries: list[dict[str, Any]], total: int) -> list[dict[str, Any]] | None:
    """The smallest combination of ``entries`` whose values add up to ``total`` (first found), or ``None``."""
    if total == 0:
        return []
    if len(entries) > MAX_PENDING_GROUP:
        return entries if sum(e["value"] for e in entries) == total else None
    for size in range(1, len(entries) + 1):
        for chosen in combinations(entries, size):
            if sum(e["value"] for e in chosen) == total:
                return list(chosen)
    return None


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
