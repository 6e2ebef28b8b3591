"""Operator that bills daily usage from SQL rows in Stripe, once per customer, meter and day."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta, timezone
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator

from airflow_provider_stripe_meter.aggregation import (
    DEFAULT_SAFETY_MARGIN,
    DailyAggregate,
    UsageAggregator,
    paused_gc,
)
from airflow_provider_stripe_meter.identifiers import daily_identifier
from airflow_provider_stripe_meter.operators.meter_event import payload_keys
from airflow_provider_stripe_meter.rules import check_fixed_event_name
from airflow_provider_stripe_meter.sources import aggregate_usage, check_source

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_stripe_meter.delivery import DeliveryReport
    from airflow_provider_stripe_meter.hooks.stripe import StripeHook

APIS = ("v1", "v2_stream")
STREAM_BATCH = 100  # Stripe's maximum events per stream request
PROGRESS_SECONDS = 10.0  # progress lines at least this often on long runs


class StripeMeterEventBatchOperator(BaseOperator):
    """
    Aggregate usage rows per (event name, customer, UTC day) and record each aggregate in Stripe.

    Rows come either from an upstream SQL task (``rows=usage.output``) or from a query this
    operator runs itself (``sql`` with ``sql_conn_id``, any common-sql hook; rows are streamed in
    chunks, so the table never sits in memory). Each row is ``(customer_id, value, timestamp)``,
    with ``event_name`` fourth when no fixed ``event_name`` is given, or a mapping with the names
    given in ``columns``.

    Exactly once: each aggregate's identifier is derived from (event name, customer, day), so a
    retried task, a cleared run or an overlapping backfill sends the same identifier again and
    Stripe refuses the copy (reported as ``already_recorded``). Values are summed exactly.

    Rows older than 35 days (less ``safety_margin``) or more than 5 minutes ahead are skipped;
    rows that break a rule are ``invalid``. Each is counted and sampled in the result, none
    blocks the good rows. The task fails only if an aggregate could not be delivered after
    retries; its retry resends everything with the same identifiers, so only what is missing is
    billed.

    Returns (and pushes each key as an XCom): ``success``, ``rows``, ``aggregates``, ``sent``,
    ``already_recorded``, ``skipped_too_old``, ``skipped_future``, ``invalid``, ``rejected``,
    ``failed``, ``totals`` (per event name), ``samples`` and delivery figures.

    .. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api

    :param event_name: The meter's event name for every row; ``None`` reads it from each row.
        (templated)
    :param rows: Rows from an upstream task, e.g. ``SQLExecuteQueryOperator(...).output``. (templated)
    :param sql: A query (or ``.sql`` file) returning the rows, run on ``sql_conn_id``. (templated)
    :param sql_conn_id: Connection of any common-sql ``DbApiHook`` (Postgres, SQLite, ...).
    :param parameters: Query parameters for ``sql``. (templated)
    :param columns: Names of the row fields: customer id, value, timestamp, event name.
    :param api: ``"v1"`` (one synchronous request per aggregate; Stripe answers duplicates) or
        ``"v2_stream"`` (100 events a request through meter event sessions; validated
        asynchronously, so duplicates are dropped by Stripe and counted as sent here).
    :param max_rps: Requests per second; default fits the key's mode (20 test, 900 live).
    :param concurrency: Requests in flight at most (default from ``max_rps``).
    :param max_attempts: Tries per request for 429, 5xx and network errors.
    :param identifier_prefix: First part of every identifier; set one per source when two
        pipelines bill the same meter. (templated)
    :param naive_timezone: Zone of timestamps without one (default UTC); ``None`` rejects them.
    :param safety_margin: How much younger than 35 days a row must be to be sent.
    :param chunk_size: Rows fetched and aggregated at a time.
    :param sample_limit: Examples kept per kind of problem.
    :param fail_on_error: Fail the task when rows are invalid or Stripe rejects an aggregate,
        instead of returning ``success=False``.
    :param stripe_conn_id: Airflow connection of type ``stripe``.
    :param stripe_account: Connected account (``acct_...``), overriding the connection. (templated)
    :param preflight: Before sending anything, check that every event name belongs to an
        active meter (one meters list per task); fail listing the meters that exist if not. Also
        takes each meter's payload keys.
    :param customer_payload_key: The meter's ``customer_mapping.event_payload_key``; default the
        meter's (with ``preflight``) or ``stripe_customer_id``.
    :param value_payload_key: The meter's ``value_settings.event_payload_key``; default the
        meter's (with ``preflight``) or ``value``.
    """

    template_fields: Sequence[str] = (
        "event_name",
        "rows",
        "sql",
        "parameters",
        "identifier_prefix",
        "stripe_account",
    )
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers: ClassVar[dict[str, str]] = {"sql": "sql", "parameters": "json"}
    ui_color = "#635bff"

    def __init__(
        self,
        *,
        event_name: str | None = None,
        rows: Any = None,
        sql: str | None = None,
        sql_conn_id: str | None = None,
        parameters: Any = None,
        columns: Sequence[str] = ("customer_id", "value", "timestamp", "event_name"),
        api: str = "v1",
        max_rps: float | None = None,
        concurrency: int | None = None,
        max_attempts: int = 8,
        identifier_prefix: str = "usage",
        naive_timezone: Any = timezone.utc,
        safety_margin: timedelta = DEFAULT_SAFETY_MARGIN,
        chunk_size: int = 10_000,
        sample_limit: int = 20,
        fail_on_error: bool = False,
        stripe_conn_id: str = "stripe_default",
        stripe_account: str | None = None,
        preflight: bool = True,
        customer_payload_key: str | None = None,
        value_payload_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)
        check_source(rows, sql, sql_conn_id)
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        if max_rps is not None and max_rps <= 0:
            raise ValueError(f"max_rps must be positive, got {max_rps!r}")
        check_fixed_event_name(event_name)
        self.event_name = event_name
        self.rows = rows
        self.sql = sql
        self.sql_conn_id = sql_conn_id
        self.parameters = parameters
        self.columns = tuple(columns)
        self.api = api
        self.max_rps = max_rps
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.identifier_prefix = identifier_prefix
        self.naive_timezone = naive_timezone
        self.safety_margin = safety_margin
        self.chunk_size = chunk_size
        self.sample_limit = sample_limit
        self.fail_on_error = fail_on_error
        self.stripe_conn_id = stripe_conn_id
        self.stripe_account = stripe_account
        self.preflight = preflight
        self.customer_payload_key = customer_payload_key
        self.value_payload_key = value_payload_key

    # -- reading ---------------------------------------------------------------------------

    def _aggregate(self) -> UsageAggregator:
        return aggregate_usage(
            rows=self.rows,
            sql=self.sql,
            sql_conn_id=self.sql_conn_id,
            parameters=self.parameters,
            chunk_size=self.chunk_size,
            event_name=self.event_name,
            columns=self.columns,
            naive_timezone=self.naive_timezone,
            safety_margin=self.safety_margin,
            sample_limit=self.sample_limit,
            log=self.log,
        )

    # -- sending ---------------------------------------------------------------------------

    def _identifier(self, aggregate: DailyAggregate) -> str:
        return daily_identifier(
            aggregate.event_name, aggregate.customer_id, aggregate.day, self.identifier_prefix
        )

    def _deliver(self, hook: StripeHook, aggregates: list[DailyAggregate]) -> DeliveryReport:
        from airflow_provider_stripe_meter.delivery import Deliverer, default_max_rps
        from airflow_provider_stripe_meter.rules import MeterEvent

        max_rps = self.max_rps or default_max_rps(hook.livemode)
        # Preflight: every event name checked (and its payload keys learnt) before anything is sent.
        keys = {
            name: payload_keys(hook, name, self.preflight, self.customer_payload_key, self.value_payload_key)
            for name in sorted({a.event_name for a in aggregates})
        }

        def describe(aggregate: DailyAggregate) -> dict[str, Any]:
            return {
                "event_name": aggregate.event_name,
                "customer_id": aggregate.customer_id,
                "day": aggregate.day.isoformat(),
                "value": aggregate.value,
                "identifier": self._identifier(aggregate),
            }

        if self.api == "v1":

            def send(batch: list[DailyAggregate]) -> None:
                [aggregate] = batch
                customer_key, value_key = keys[aggregate.event_name]
                hook.create_meter_event(
                    MeterEvent(
                        event_name=aggregate.event_name,
                        customer_id=aggregate.customer_id,
                        value=aggregate.value,
                        identifier=self._identifier(aggregate),
                        timestamp=aggregate.timestamp,
                    ),
                    customer_payload_key=customer_key,
                    value_payload_key=value_key,
                )

            batch_size = 1
        else:
            from airflow_provider_stripe_meter.rules import rfc3339

            stream = hook.meter_event_stream()

            def send(batch: list[DailyAggregate]) -> None:
                stream.send(
                    [
                        {
                            "event_name": aggregate.event_name,
                            "identifier": self._identifier(aggregate),
                            "timestamp": rfc3339(aggregate.timestamp),
                            "payload": {
                                keys[aggregate.event_name][0]: aggregate.customer_id,
                                keys[aggregate.event_name][1]: str(aggregate.value),
                            },
                        }
                        for aggregate in batch
                    ]
                )

            batch_size = STREAM_BATCH

        deliverer = Deliverer(
            send,
            key=lambda a: (a.event_name, a.customer_id),
            describe=describe,
            batch_size=batch_size,
            max_rps=max_rps,
            concurrency=self.concurrency,
            max_attempts=self.max_attempts,
            progress=lambda line: self.log.info("Delivery: %s", line),
            progress_every=PROGRESS_SECONDS,
            sample_limit=self.sample_limit,
        )
        self.log.info(
            "Sending %d aggregates through %s at up to %.0f requests/s", len(aggregates), self.api, max_rps
        )
        return deliverer.run(aggregates)

    # -- the task --------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        """Read, aggregate, deliver, report."""
        from airflow_provider_stripe_meter.hooks.stripe import StripeHook

        aggregator = self._aggregate()
        with paused_gc():
            aggregates = aggregator.aggregates()
        problems = aggregator.problems
        for kind in ("invalid", "skipped_too_old", "skipped_future"):
            if problems.counts[kind]:
                self.log.warning(
                    "%d rows %s, e.g. %s",
                    problems.counts[kind],
                    kind.replace("_", " "),
                    problems.samples[kind][:3],
                )
        hook = StripeHook(self.stripe_conn_id, stripe_account=self.stripe_account or None)
        report = self._deliver(hook, aggregates) if aggregates else None
        outcome = self._outcome(aggregator, aggregates, report)
        self.log.info(
            "Rows %(rows)d -> aggregates %(aggregates)d: sent %(sent)d, "
            "already recorded %(already_recorded)d, rejected %(rejected)d, failed %(failed)d; "
            "skipped too old %(skipped_too_old)d, "
            "skipped future %(skipped_future)d, invalid %(invalid)d",
            outcome,
        )
        if outcome["failed"]:
            context["ti"].xcom_push(key="outcome", value=outcome)
            raise RuntimeError(
                f"{outcome['failed']} of {outcome['aggregates']} aggregates could not be delivered after "
                f"{self.max_attempts} attempts (e.g. {outcome['samples'].get('failed', [])[:1]}); "
                "a retry sends them again with the same identifiers"
            )
        if not outcome["success"] and self.fail_on_error:
            context["ti"].xcom_push(key="outcome", value=outcome)
            raise RuntimeError(f"Usage not fully billed: {outcome['samples']}")
        return outcome

    def _outcome(
        self, aggregator: UsageAggregator, aggregates: list[DailyAggregate], report: DeliveryReport | None
    ) -> dict[str, Any]:
        counts = aggregator.problems.counts
        samples: dict[str, list[dict[str, Any]]] = dict(aggregator.problems.samples)
        if report is not None:
            samples.update(report.samples)
        unsettled = {id(a) for a in report.unsettled} if report else set()
        totals: dict[str, dict[str, int]] = {}
        customers: dict[str, set[str]] = {}
        for aggregate in aggregates:
            entry = totals.setdefault(
                aggregate.event_name, {"aggregates": 0, "customers": 0, "value": 0, "recorded": 0}
            )
            entry["aggregates"] += 1
            entry["value"] += aggregate.value
            if id(aggregate) not in unsettled:
                entry["recorded"] += aggregate.value
            customers.setdefault(aggregate.event_name, set()).add(aggregate.customer_id)
        for event_name, entry in totals.items():
            entry["customers"] = len(customers[event_name])
        outcome: dict[str, Any] = {
            "rows": aggregator.rows,
            "aggregates": len(aggregates),
            "sent": report.sent if report else 0,
            "already_recorded": report.already_recorded if report else 0,
            "skipped_too_old": counts["skipped_too_old"],
            "skipped_future": counts["skipped_future"],
            "invalid": counts["invalid"],
            "rejected": report.rejected if report else 0,
            "failed": report.failed if report else 0,
            "totals": totals,
            "samples": samples,
            "api": self.api,
            "requests": report.requests if report else 0,
            "rate_limited": report.rate_limited if report else 0,
            "seconds": round(report.seconds, 3) if report else 0.0,
        }
        outcome["success"] = not any(
            outcome[k] for k in ("skipped_too_old", "skipped_future", "invalid", "rejected", "failed")
        )
        return outcome
