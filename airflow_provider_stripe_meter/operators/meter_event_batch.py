"""Operator that bills daily usage from SQL rows in Stripe, so Stripe's daily figures equal the source's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.billing.coverage import NOTHING, Coverage
from airflow_provider_stripe_meter.billing.settings import (
    APIS,
    BILLING_PERIODS,
    CONFIRMS,
    STRIPE_IDENTIFIER_WINDOW,
    TOO_OLDS,
    Api,
    BillingPeriods,
    Confirm,
    Delivery,
    RunSettings,
    Timing,
    TooOld,
    run_settings,
)
from airflow_provider_stripe_meter.exceptions import StripeParameterError
from airflow_provider_stripe_meter.ledger.schema import DEFAULT_TABLE, check_table_name
from airflow_provider_stripe_meter.metrics import MeterMetrics
from airflow_provider_stripe_meter.operators.base import (
    StripeBaseOperator,
    StripeUsageSourceOperator,
    meter_outlets,
    update_meter_assets,
)
from airflow_provider_stripe_meter.sources import DEFAULT_COLUMNS
from airflow_provider_stripe_meter.state.periods import read_billing_periods
from airflow_provider_stripe_meter.utils.aggregation import (
    DEFAULT_SAFETY_MARGIN,
    DEFAULT_SAMPLE_LIMIT,
    paused_gc,
)
from airflow_provider_stripe_meter.utils.clock import SYSTEM
from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY
from airflow_provider_stripe_meter.utils.rules import (
    NAIVE_TIMEZONE,
    MeterEventInputError,
    check_fixed_event_name,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_stripe_meter.billing.periods import PeriodBook
    from airflow_provider_stripe_meter.billing.result import BatchResult, SourceFigures
    from airflow_provider_stripe_meter.billing.run import BillingRun, Usage
    from airflow_provider_stripe_meter.ledger.store import SqlLedger
    from airflow_provider_stripe_meter.pushdown.ledger_diff import LedgerSide
    from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate, UsageAggregator
    from airflow_provider_stripe_meter.utils.unchanged import Unchanged

#: ``covers``'s default: the run's ``billing_window()``, each day only if the source has rows of it.
DEFAULT_COVERS = "billing_window"


class StripeMeterEventBatchOperator(StripeUsageSourceOperator):
    """
    Bill usage rows so that Stripe's figure for every (meter, customer, UTC day) equals the source's.

    The rows come from an upstream task (``rows``) or from a query the operator reads in chunks
    (``sql``). For each customer-day it sends the source's figure, by the meter's formula, less what
    its ledger (a table in ``ledger_conn_id``'s database) says Stripe holds, so re-runs, retries and
    backfills bill each day once; where the meter has a metered price, usage is billed into each
    customer's billing periods. It returns counts, totals and samples (each key also an XCom); a run
    that cannot bill everything bills what it can and returns ``success=False``.

    How it works and what it returns: docs/batch.md. What it guarantees, and at what cost:
    docs/guarantees.md. The ledger's tables, grants and recovery: docs/ledger.md. Billing periods
    and held usage: docs/invoices.md. Words such as *customer-day*, *held* and *settled*:
    docs/glossary.md.

    .. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api

    :param rows: Rows from an upstream task, e.g. ``SQLExecuteQueryOperator(...).output``; give
        this or ``sql``. (templated)
    :param sql: A query (or ``.sql`` file) returning the rows, run on ``sql_conn_id`` and read in
        chunks of ``chunk_size``; give this or ``rows``. (templated)
    :param sql_conn_id: Connection of the usage database (any common-sql ``DbApiHook``); required
        with ``sql``.
    :param parameters: Query parameters for ``sql``. (templated)
    :param columns: Names of the row fields, in order: customer id, value, timestamp, and the event
        name when no fixed ``event_name`` is given; tuple rows are read by position, mappings by name.
    :param event_name: The meter's event name for every row; ``None`` reads it from each row.
        (templated)
    :param naive_timezone: The zone a timestamp without one is read in (a ``tzinfo`` or a zone
        name; UTC by default); ``None`` counts such rows as ``invalid``.
    :param safety_margin: How much younger than Stripe's 35 days a row must be to be billed (a
        ``timedelta``), so no event expires between the check and the send.
    :param chunk_size: Rows fetched and aggregated at a time.
    :param sample_limit: Examples kept in the result per kind of problem (counts are exact).
    :param stripe_conn_id: Airflow connection of type ``stripe`` (default ``stripe_default``).
    :param stripe_account: Connected account (``acct_...``) to bill for, overriding the
        connection's. (templated)
    :param ledger_conn_id: Connection of the ledger's database (any common-sql ``DbApiHook``);
        default ``sql_conn_id``, required with ``rows``. One ledger per account and meter.
    :param ledger_table: The ledger's table, optionally schema-qualified (default
        ``stripe_meter_ledger``); created on first use.
    :param api: ``"v1"`` (one synchronous request per event) or ``"v2_stream"`` (100 events a
        request through meter event sessions, as exact as v1).
    :param max_rps: Requests per second. Default: what Stripe's limits allow the key's mode and
        account, less headroom (the figures are in docs/guarantees.md).
    :param concurrency: Requests in flight at most (default from ``max_rps``).
    :param max_attempts: Tries per request for 429, 5xx and network errors outside an outage.
    :param outage_timeout: How long an outage (every request failing) is ridden out before what
        is left fails the task for its retry (a ``timedelta``).
    :param identifier_window: How long Stripe is assumed to refuse a repeated identifier: ``pending`` events
        younger, less an hour, are sent again; older ones (all if ``None``) are settled from the summaries.
    :param settle_timeout: How long a run waits for Stripe's summaries before it settles events
        from them (a ``timedelta``); longer, and the events stay open for a later run.
    :param summary_lag: How long Stripe's summaries may trail the events it accepted: events are
        settled, and read back, only once it has passed (default: the connection's extra).
    :param confirm: What a run checks before it reports ``success``: ``"meter"`` (default, one
        request per meter) or ``"summaries"``, which also reads back every customer it sent to.
    :param too_old: Rows older than Stripe's 35 days (less ``safety_margin``): ``"skip"`` counts
        them; ``"bill_at_oldest"`` bills them (``sum`` meters) at the oldest instant Stripe accepts.
    :param adopt: Before planning, write into the ledger what Stripe's summaries hold beyond it,
        for a lost ledger or a meter billed before it; run once so, then leave it off.
    :param dry_run: Read, check and compare as a real run would, send nothing, and return the
        ``plan``: per customer-day the action a real run would take.
    :param plan_limit: Lines of the dry-run ``plan`` kept in the result (totals count them all;
        every line goes to ``report_path``).
    :param report_path: An Airflow object storage URL to write the run's full table to, a JSON line
        per customer-day; the result names it in ``report_uri``. (templated)
    :param fail_on_error: Fail the task (no retry) whenever the run is not a success, instead of
        returning ``success=False``.
    :param billing_periods: ``"hold"`` (default) bills usage into its billing periods, holding what no
        open invoice carries; ``"carry"`` bills a final period's on the open one; ``"off"`` bills by UTC day.
    :param covers: Where the source is the truth, fewer rows there a correction: ``"billing_window"``, a
        pair ``(start, end)`` or ``None`` (docs/batch.md, "What the query covers"). (templated)

    The source parameters are shared with the reconcile sensor through
    :class:`~airflow_provider_stripe_meter.operators.base.StripeUsageSourceOperator`; every other
    keyword goes to Airflow's ``BaseOperator`` but ``preflight``, refused: this operator always
    reads the meters. The run itself is :class:`~airflow_provider_stripe_meter.billing.run.BillingRun`.
    """

    bills_meters = True
    #: ``bill.output["success"]`` and the headline counts; every other key is in the return value
    #: (``ti.xcom_pull(task_ids="bill")["samples"]``).
    own_xcoms = (
        "success",
        "sent",
        "already_recorded",
        "events_sent",
        "invalid",
        "rejected",
        "failed",
        "report_uri",
    )
    template_fields: Sequence[str] = (
        "event_name",
        *StripeUsageSourceOperator.source_template_fields,
        "report_path",
        "covers",
        *StripeBaseOperator.template_fields,
    )

    def __init__(
        self,
        *,
        # The source: named here (not left to **kwargs) so the reference shows them; Airflow
        # checks partial()/expand() arguments against every BaseOperator class's __init__ alike.
        rows: Any = None,
        sql: str | None = None,
        sql_conn_id: str | None = None,
        parameters: Any = None,
        columns: Sequence[str] = DEFAULT_COLUMNS,
        event_name: str | None = None,
        naive_timezone: tzinfo | str | None = NAIVE_TIMEZONE,
        safety_margin: timedelta = DEFAULT_SAFETY_MARGIN,
        chunk_size: int = 10_000,
        sample_limit: int = DEFAULT_SAMPLE_LIMIT,
        aggregate_in: str = "auto",
        stripe_conn_id: str = "stripe_default",
        stripe_account: str | None = None,
        api: Api = "v1",
        max_rps: float | None = None,
        concurrency: int | None = None,
        max_attempts: int = 8,
        outage_timeout: timedelta = timedelta(minutes=10),
        ledger_conn_id: str | None = None,
        ledger_table: str = DEFAULT_TABLE,
        identifier_window: timedelta | None = STRIPE_IDENTIFIER_WINDOW,
        settle_timeout: timedelta = timedelta(minutes=10),
        summary_lag: timedelta | None = None,
        confirm: Confirm = "meter",
        too_old: TooOld = "skip",
        adopt: bool = False,
        dry_run: bool = False,
        plan_limit: int = 1_000,
        report_path: str | None = None,
        fail_on_error: bool = False,
        billing_periods: BillingPeriods = "hold",
        covers: Any = DEFAULT_COVERS,
        **kwargs: Any,
    ) -> None:
        if "preflight" in kwargs:
            raise TypeError(
                "StripeMeterEventBatchOperator always reads the meters (their formula and id decide "
                "what it sends): preflight does not apply"
            )
        if not dry_run:
            meter_outlets(kwargs, event_name, stripe_account)
        super().__init__(
            rows=rows,
            sql=sql,
            sql_conn_id=sql_conn_id,
            parameters=parameters,
            columns=columns,
            naive_timezone=naive_timezone,
            safety_margin=safety_margin,
            chunk_size=chunk_size,
            sample_limit=sample_limit,
            aggregate_in=aggregate_in,
            stripe_conn_id=stripe_conn_id,
            stripe_account=stripe_account,
            **kwargs,
        )
        for name, value, allowed in (
            ("api", api, APIS),
            ("confirm", confirm, CONFIRMS),
            ("too_old", too_old, TOO_OLDS),
            ("billing_periods", billing_periods, BILLING_PERIODS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        check_fixed_event_name(event_name)
        check_table_name(ledger_table)
        #: The ledger's database: ``ledger_conn_id``, else the one the usage is read from.
        ledger_conn = ledger_conn_id or self.sql_conn_id
        if not ledger_conn:
            raise ValueError(
                "ledger_conn_id is required with rows=: the ledger of every meter event sent is kept in a "
                "database the team owns (any common-sql connection: PostgreSQL, SQLite, Snowflake, ...); "
                "with sql= it defaults to sql_conn_id"
            )
        self.ledger_conn_id: str = ledger_conn
        self.ledger_table = ledger_table
        self.event_name = event_name
        self.api: Api = api
        #: Pace, parallelism and retries of delivery.
        self.delivery = Delivery(max_rps, concurrency, max_attempts, outage_timeout)
        #: How far Stripe's identifier window and summaries are trusted.
        self.timing = Timing(identifier_window, summary_lag, settle_timeout)
        self.confirm: Confirm = confirm
        self.too_old: TooOld = too_old
        self.adopt = adopt
        #: Plan only (``dry_run``); kept apart from BaseOperator's own ``dry_run()`` method.
        self.plan_only = dry_run
        self.plan_limit = plan_limit
        self.report_path = report_path
        self.fail_on_error = fail_on_error
        self.billing_periods: BillingPeriods = billing_periods
        self.covers = covers

    # -- the task --------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        """Read and aggregate the source, run the billing core, report, and fail where it must."""
        from airflow_provider_stripe_meter.billing.hook_port import HookStripe
        from airflow_provider_stripe_meter.billing.run import BillingRun, Usage
        from airflow_provider_stripe_meter.ledger.customers import CustomerTable
        from airflow_provider_stripe_meter.state.ledger import ledger_on, ledger_writer

        ledger = ledger_on(self.ledger_conn_id, self.ledger_table)
        periods: PeriodBook | None = None
        try:
            run = BillingRun(
                self._settings(context),
                HookStripe(self.hook),
                ledger,
                ledger_writer(self.hook.stripe_account or "platform", context),
                self.log,
                int(SYSTEM.now()),
                # Customers Stripe has shown to exist: usage of any other is held, not sent.
                customers=CustomerTable(ledger),
            )
            # The periods (100,000 customers' rows) and the aggregates are objects without cycles
            # that live through the run: passes of the cyclic collector over them while they are
            # built would cost more than building them.
            with paused_gc():
                periods = self._read_periods(ledger)
                aggregator = self.read_usage(
                    self.event_name,
                    keep_too_old=self.too_old == "bill_at_oldest",
                    split=periods.split() if periods is not None else None,
                    # A database aggregating the query looks up latest values for last meters
                    # only: the meters are read first (once: the run keeps them).
                    needs_last=run.last_meters,
                    ledger=self._ledger_side(run, ledger, context),
                )
                aggregates = aggregator.finish()
            # The run's "now" is when planning starts, as it was before the source was read.
            run.book.now = int(SYSTEM.now())
            self._log_problems(aggregator)
            if periods is not None:
                # The subscriptions table is written while the first events are on their way.
                run.meanwhile.append(periods.save)
            usage = Usage(
                aggregates,
                _source_figures(aggregator, aggregates),
                tuple(aggregator.too_old),
                aggregator.oldest,
                periods,
                covers=self._coverage(context, aggregates, run.book.now),
                event_names=frozenset({self.event_name} if self.event_name else ()),
                unchanged=aggregator.unchanged,
            )
            # Millions of per-day objects and no cycles: the cyclic collector would walk them all
            # again and again while they are built.
            with paused_gc():
                result = self._run(run, usage)
        except BaseException:
            self._close(ledger, periods, failing=True)
            raise
        self._close(ledger, periods)
        outcome = result.as_dict()
        outcome["report_uri"] = self._write_report(run)
        self._log_outcome(outcome)
        meters = set(run.book.specs) or ({self.event_name} if self.event_name else set())
        if not self.plan_only:
            # Before any failure below, so an alert sees a failed run's figures too.
            MeterMetrics.for_task(context, self.billed_account()).batch(outcome, meters)
        self._raise_for(result, outcome, context)
        if not self.plan_only:
            extra = _asset_extra(outcome, aggregates, aggregator.unchanged)
            update_meter_assets(self, context, extra, meters)
        self.push_own_xcoms(context, outcome)
        return outcome

    def _ledger_side(
        self, run: BillingRun, ledger: SqlLedger, context: Context
    ) -> Callable[[], LedgerSide | None] | None:
        """The ledger, for the database to subtract where it is the query's own database
        (``ledger_conn_id`` is ``sql_conn_id``): only the customer-days that differ come back.

        Not on a recovery run (``adopt``), which asks Stripe about every customer-day of the
        source; not on a dry run or with ``report_path``, whose plan and table list every
        customer-day; and not for the days the run's coverage may declare (there a customer-day
        billed that has no rows any more is a correction, found among every customer-day of the
        source).
        """
        from airflow_provider_stripe_meter.pushdown.ledger_diff import LedgerSide

        every_day = self.adopt or self.plan_only or self.report_path
        if self.sql is None or self.ledger_conn_id != self.sql_conn_id or every_day:
            return None

        def side() -> LedgerSide | None:
            names = {self.event_name} if self.event_name else self._active_event_names()
            meters = run.subtractable(names)
            if not meters:
                return None
            # The ledger's table exists before the database is asked to read it (a first run).
            _ = ledger.conn
            return LedgerSide(ledger.table, run.account, meters, apart=self._covered_days(context))

        return side

    def _active_event_names(self) -> set[str]:
        """The event names of the account's active meters (the hook lists them once a run)."""
        return {
            name
            for name, meters in self.hook.meters_by_event_name().items()
            if any(m.get("status") == "active" for m in meters)
        }

    def _covered_days(self, context: Context) -> tuple[int, int] | None:
        """The UTC day numbers, first and last, the run's coverage may hold (``None``: none).

        Read before the source, wider than the coverage itself (which keeps only the days the
        query returned rows of): a day inside it is planned in full, never left in the database.
        """
        from airflow_provider_stripe_meter.macros import as_of, whole_days
        from airflow_provider_stripe_meter.utils.rules import to_unix_seconds

        covers = self.covers
        if covers is None or covers == "none":
            return None
        try:
            if covers == DEFAULT_COVERS:
                if context.get("data_interval_end") is None and context.get("dag_run") is None:
                    return None
                window = whole_days(as_of(context), 1)
                start, end = to_unix_seconds(window.start), to_unix_seconds(window.end)
            else:
                start, end = (to_unix_seconds(v, naive_timezone=timezone.utc) for v in covers)
        except (MeterEventInputError, TypeError, ValueError):
            # Refused by _coverage, after the source is read, with the field named: until then
            # every day the source holds is planned in full.
            return (-(10**9), 10**9)
        return (start // SECONDS_PER_DAY, max(start, end - 1) // SECONDS_PER_DAY)

    def _coverage(self, context: Context, aggregates: list[DailyAggregate], now: int) -> Coverage:
        """Where the source is the truth, from ``covers`` (checked before anything is sent)."""
        try:
            return self._read_covers(context, aggregates, now)
        except MeterEventInputError as err:
            raise StripeParameterError(
                str(err), {"type": "validation_error", "field": "covers", "value": repr(self.covers)[:200]}
            ) from err

    def _read_covers(self, context: Context, aggregates: list[DailyAggregate], now: int) -> Coverage:
        from airflow_provider_stripe_meter.macros import as_of, whole_days
        from airflow_provider_stripe_meter.utils.rules import to_unix_seconds

        covers = self.covers
        if covers is None or covers == "none":
            return NOTHING
        if covers == DEFAULT_COVERS:
            if context.get("data_interval_end") is None and context.get("dag_run") is None:
                return NOTHING  # run outside a DAG run: no billing window to stand for
            window = whole_days(as_of(context), 1)
            start, end = (to_unix_seconds(window.start), to_unix_seconds(window.end))
            # Only days the query returned rows of: a query that reads other days than the
            # run's billing_window() corrects nothing it did not read.
            seen = {a.day for a in aggregates}
            return Coverage.between(start, end, now, days=seen, every_customer=False)
        if isinstance(covers, (list, tuple)) and len(covers) == 2:
            start, end = (
                to_unix_seconds(value, f"covers[{i}]", naive_timezone=timezone.utc)
                for i, value in enumerate(covers)
            )
            if start >= end:
                raise MeterEventInputError("covers", covers, "start must be before end")
            return Coverage.between(start, end, now)
        raise MeterEventInputError(
            "covers", covers, '"billing_window", None, or a pair (start, end) of the window the query reads'
        )

    def _close(self, ledger: SqlLedger, periods: PeriodBook | None, *, failing: bool = False) -> None:
        """Write the subscriptions table (what reading the periods learnt), if the run did not
        while sending, then close the ledger.

        When the run is failing anyway, a failed write is logged, not raised over the run's own
        error: the next run reads the same changes again.
        """
        try:
            if periods is not None:
                periods.save()
        except Exception:
            if not failing:
                raise
            self.log.warning("Could not write the subscriptions table; the next run reads its changes again")
        finally:
            ledger.close()

    def _read_periods(self, ledger: SqlLedger) -> PeriodBook | None:
        """The customers' billing periods on the meters billed (``billing_periods`` not ``"off"``).

        Read before the source, so each day is aggregated in parts at its customer's period
        boundaries. A fixed ``event_name`` reads its meter's; per-row names read every active
        meter's. The subscriptions are kept beside the ledger and brought up to date from
        Stripe's events (:mod:`~airflow_provider_stripe_meter.billing.period_sync`).
        """
        if self.billing_periods == "off":
            return None
        # The subscriptions table is written while the first events are out (see ``execute``).
        return read_billing_periods(
            self.hook,
            ledger,
            self.event_name,
            account=self.billed_account() or "platform",
            log=self.log,
            billing_periods=self.billing_periods,
            defer=True,
        )

    def _write_report(self, run: BillingRun) -> str | None:
        """Write every customer-day of the run (plan and outcome) to ``report_path``, if named."""
        if not self.report_path:
            return None
        from airflow_provider_stripe_meter.state.reports import write_lines

        book = run.book
        return write_lines(
            self.report_path, (day.line() for day in [*book.days.values(), *book.late.values()])
        )

    def _settings(self, context: Context) -> RunSettings:
        lag = self.timing.summary_lag
        return run_settings(
            self.hook,
            max_rps=self.delivery.max_rps,
            summary_lag=lag.total_seconds() if lag is not None else None,
            api=self.api,
            confirm=self.confirm,
            adopt=self.adopt,
            dry_run=self.plan_only,
            plan_limit=self.plan_limit,
            sample_limit=self.sample_limit,
            delivery=self.delivery,
            timing=self.timing,
            carry=self.billing_periods == "carry",
        )

    def _run(self, run: BillingRun, usage: Usage) -> BatchResult:
        """Run the core; a kind of failure it raises fails (or retries) the task as the kind says."""
        from airflow_provider_stripe_meter.exceptions import raised_for_airflow

        with raised_for_airflow():
            return run.execute(usage)

    def _raise_for(self, result: BatchResult, outcome: dict[str, Any], context: Context) -> None:
        """Fail the task where the run did not bill everything it should have."""
        from airflow_provider_stripe_meter.exceptions import (
            StripeDeliveryIncompleteError,
            StripeEventRejectedError,
            StripeMeterDeactivatedError,
        )

        if result.deactivated:
            context["ti"].xcom_push(key="outcome", value=outcome)
            raise StripeMeterDeactivatedError(
                f"Meter(s) {', '.join(result.deactivated)} stopped being active during the run: Stripe "
                f"drops events sent to an inactive meter, so {outcome['unconfirmed']} customer-days are not "
                "billed. Reactivate the meter (or fix the event name) and re-run: the re-run settles this "
                "run's events from Stripe's summaries and sends what Stripe dropped.",
                {"type": "meter_deactivated", "meters": result.deactivated},
            )
        if outcome["failed"] or outcome["unconfirmed"]:
            context["ti"].xcom_push(key="outcome", value=outcome)
            example = (outcome["samples"].get("failed") or outcome["samples"].get("unconfirmed") or [])[:1]
            raise StripeDeliveryIncompleteError(
                f"{outcome['failed']} customer-days could not be delivered and {outcome['unconfirmed']} not "
                f"confirmed (e.g. {example}); a retry settles them from the ledger and sends what is missing",
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
        from airflow_provider_stripe_meter.billing.result import summary_line

        # A run that is not a success leaves the task green (unless fail_on_error): its line
        # says so first, as a warning, so whoever reads the log sees it.
        line = summary_line(outcome)
        if outcome["success"]:
            self.log.info("%s", line)
        else:
            self.log.warning("%s", line)


def _source_figures(aggregator: UsageAggregator, aggregates: list[DailyAggregate]) -> SourceFigures:
    from airflow_provider_stripe_meter.billing.result import SourceFigures

    unchanged = aggregator.unchanged
    return SourceFigures(
        rows=aggregator.rows,
        # With the customer-days the database found the ledger already holds.
        aggregates=len(aggregates) + (unchanged.groups() if unchanged is not None else 0),
        problems=dict(aggregator.problems.counts),
        samples=dict(aggregator.problems.samples),
        late_rows=aggregator.too_old_rows,
        aggregated_in=aggregator.path,
        aggregated_because=aggregator.path_reason,
        database=aggregator.database,
    )


def _asset_extra(
    outcome: dict[str, Any], aggregates: list[DailyAggregate], unchanged: Unchanged | None = None
) -> dict[str, Any]:
    """The run's figures for the meter Asset's event: what a downstream DAG needs to know."""
    days = {a.day for a in aggregates}
    customers = len({a.customer_id for a in aggregates})
    if unchanged is not None:
        # The customer-days left in the database: their days, and the customers of no other day.
        days |= {day for per_day in unchanged.days.values() for day in per_day}
        customers += unchanged.all_customers
    return {
        "success": outcome["success"],
        "days": sorted(day.isoformat() for day in days),
        "customers": customers,
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
