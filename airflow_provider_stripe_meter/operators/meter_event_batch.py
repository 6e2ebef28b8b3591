"""Operator that bills daily usage from SQL rows in Stripe, once per customer, meter and day."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.operators.base import StripeBaseOperator, UsageSourceMixin
from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate, UsageAggregator, paused_gc
from airflow_provider_stripe_meter.utils.identifiers import daily_identifier
from airflow_provider_stripe_meter.utils.rules import check_fixed_event_name

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_stripe_meter.utils.delivery import DeliveryReport

APIS = ("v1", "v2_stream")
STREAM_BATCH = 100  # Stripe's maximum events per stream request
PROGRESS_SECONDS = 10.0  # progress lines at least this often on long runs


class StripeMeterEventBatchOperator(UsageSourceMixin, StripeBaseOperator):
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
    :param api: ``"v1"`` (one synchronous request per aggregate; Stripe answers duplicates) or
        ``"v2_stream"`` (100 events a request through meter event sessions; validated
        asynchronously, so duplicates are dropped by Stripe and counted as sent here).
    :param max_rps: Requests per second; default fits the key's mode (20 test, 900 live).
    :param concurrency: Requests in flight at most (default from ``max_rps``).
    :param max_attempts: Tries per request for 429, 5xx and network errors.
    :param identifier_prefix: First part of every identifier; set one per source when two
        pipelines bill the same meter. (templated)
    :param fail_on_error: Fail the task (no retry) when rows are invalid or Stripe rejects an
        aggregate, instead of returning ``success=False``.
    :param customer_payload_key: The meter's ``customer_mapping.event_payload_key``; default the
        meter's (with ``preflight``) or ``stripe_customer_id``.
    :param value_payload_key: The meter's ``value_settings.event_payload_key``; default the
        meter's (with ``preflight``) or ``value``.

    The source parameters (``rows``, ``sql``, ``sql_conn_id``, ``parameters``, ``columns``,
    ``naive_timezone``, ``safety_margin``, ``chunk_size``, ``sample_limit``) are those of
    :class:`~airflow_provider_stripe_meter.operators.base.UsageSourceMixin`; ``stripe_conn_id``,
    ``stripe_account`` (templated) and ``preflight`` those of
    :class:`~airflow_provider_stripe_meter.operators.base.StripeBaseOperator`.
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
        identifier_prefix: str = "usage",
        fail_on_error: bool = False,
        customer_payload_key: str | None = None,
        value_payload_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        if max_rps is not None and max_rps <= 0:
            raise ValueError(f"max_rps must be positive, got {max_rps!r}")
        check_fixed_event_name(event_name)
        self.event_name = event_name
        self.api = api
        self.max_rps = max_rps
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.identifier_prefix = identifier_prefix
        self.fail_on_error = fail_on_error
        self.customer_payload_key = customer_payload_key
        self.value_payload_key = value_payload_key

    # -- sending ---------------------------------------------------------------------------

    def _identifier(self, aggregate: DailyAggregate) -> str:
        return daily_identifier(
            aggregate.event_name, aggregate.customer_id, aggregate.day, self.identifier_prefix
        )

    def _deliver(self, aggregates: list[DailyAggregate]) -> DeliveryReport:
        from airflow_provider_stripe_meter.utils.delivery import Deliverer, default_max_rps
        from airflow_provider_stripe_meter.utils.rules import MeterEvent

        hook = self.hook
        max_rps = self.max_rps or default_max_rps(hook.livemode)
        # Preflight: every event name checked (and its payload keys learnt) before anything is sent.
        keys = {
            name: self.payload_keys(name, self.customer_payload_key, self.value_payload_key)
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
            from airflow_provider_stripe_meter.utils.rules import rfc3339

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
        from airflow_provider_stripe_meter.exceptions import (
            StripeDeliveryIncompleteError,
            StripeEventRejectedError,
        )

        aggregator = self.read_usage(self.event_name)
        with paused_gc():
            aggregates = aggregator.finish()
        problems = aggregator.problems
        for kind in ("invalid", "skipped_too_old", "skipped_future"):
            if problems.counts[kind]:
                self.log.warning(
                    "%d rows %s, e.g. %s",
                    problems.counts[kind],
                    kind.replace("_", " "),
                    problems.samples[kind][:3],
                )
        report = self._deliver(aggregates) if aggregates else None
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
            raise StripeDeliveryIncompleteError(
                f"{outcome['failed']} of {outcome['aggregates']} aggregates could not be delivered after "
                f"{self.max_attempts} attempts (e.g. {outcome['samples'].get('failed', [])[:1]}); "
                "a retry sends them again with the same identifiers",
                {"type": "delivery_incomplete", "failed": outcome["failed"]},
            )
        if not outcome["success"] and self.fail_on_error:
            context["ti"].xcom_push(key="outcome", value=outcome)
            raise StripeEventRejectedError(
                f"Usage not fully billed: {outcome['samples']}", {"type": "usage_not_billed"}
            )
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
