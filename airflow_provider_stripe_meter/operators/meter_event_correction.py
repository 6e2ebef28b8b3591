"""Operators that correct what Stripe recorded: top up short days, cancel events."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import date
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.billing.plans import PlannedEvent
from airflow_provider_stripe_meter.metrics import MeterMetrics
from airflow_provider_stripe_meter.operators.base import StripeBaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate
    from airflow_provider_stripe_meter.utils.delivery import DeliveryReport


class StripeMeterTopUpOperator(StripeBaseOperator):
    """
    Bring Stripe up to the source for the days a reconciliation found ``missing`` or ``short``.

    Takes the reconciliation's result (``reconcile.output``), or its ``lines``. A result that
    names its full table (the sensor's ``report_path``) is read from there, so every short day
    is corrected at any number of customers; one that kept only some lines corrects those and
    ends with ``success`` false (``partial_reconciliation``). Because those lines may
    be hours or days old by the time this task runs (or re-runs), it first reads Stripe's figures
    for those customer-days again, then sends what the batch operator would: the difference from
    what Stripe shows now, under an identifier that names that base
    (``<prefix>:<event>:<customer>:<day>:from<recorded>``; a day with nothing recorded goes out
    under the batch operator's own daily identifier). A re-run on the same data finds nothing
    left to send; two runs that read the same stale figure derive the same identifier, and
    Stripe refuses the second. ``count`` and ``last`` meters get what their formula needs (more
    numbered events; the latest value).

    ``over`` and ``customer_unknown`` lines need a person (cancel within 24 hours, credit, or fix
    the customer) and are left alone. Returns ``success``, ``sent``, ``already_recorded``,
    ``rejected``, ``failed``, ``value_sent``, ``corrections`` (what was planned, the first 1,000),
    ``corrections_total``, ``partial_reconciliation`` and ``samples``.

    :param reconciliation: The reconciliation's lines, or its whole result. (templated)
    :param event_name: The meter's event name. (templated)
    :param identifier_prefix: The batch operator's ``identifier_prefix`` (default ``usage``).
    :param max_rps: Requests per second; default fits the key's mode.

    ``stripe_conn_id`` and ``stripe_account`` (templated) are those of
    :class:`~airflow_provider_stripe_meter.operators.base.StripeBaseOperator`.
    """

    template_fields: Sequence[str] = ("reconciliation", "event_name", *StripeBaseOperator.template_fields)

    def __init__(
        self,
        *,
        reconciliation: Any,
        event_name: str,
        identifier_prefix: str = "usage",
        max_rps: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.reconciliation = reconciliation
        self.event_name = event_name
        self.identifier_prefix = identifier_prefix
        self.max_rps = max_rps

    def execute(self, context: Context) -> dict[str, Any]:
        """Read Stripe's figures again for the short days, plan the differences and send them."""
        from airflow_provider_stripe_meter.billing.meters import meter_spec
        from airflow_provider_stripe_meter.billing.plans import plan_day
        from airflow_provider_stripe_meter.exceptions import StripeDeliveryIncompleteError
        from airflow_provider_stripe_meter.utils.delivery import (
            Deliverer,
            DeliveryReport,
            default_max_rps,
            default_read_rps,
        )

        lines, partial = _reconciliation_lines(self.reconciliation)
        if partial:
            self.log.warning(
                "The reconciliation kept only some of its lines (lines_truncated) and wrote no full "
                "table: correcting those it kept; the result is not a success. Give the sensor a "
                "report_path, or re-run the batch operator, which finds every short day itself."
            )
        wanted = [
            line
            for line in (lines or [])
            if line["status"] in ("missing", "short") and line["difference"] > 0
        ]
        if not wanted:
            self.log.info("Nothing to correct: no missing or short customer-days")
            return self._outcome([], DeliveryReport(total=0), partial)
        hook = self.hook
        meter = hook.active_meter(self.event_name)
        spec = meter_spec(meter)
        days = [date.fromisoformat(line["day"]) for line in wanted]
        customers = sorted({line["customer_id"] for line in wanted})
        max_rps = self.max_rps or default_max_rps(hook.livemode, connected=bool(hook.stripe_account))
        recorded, unknown = hook.recorded_per_day(
            meter["id"],
            customers,
            min(days),
            max(days),
            max_rps=self.max_rps or default_read_rps(hook.livemode),
        )
        now = int(time.time())
        plans = [
            plan_day(
                _aggregate(self.event_name, line),
                spec,
                recorded.get((line["customer_id"], day), 0),
                prefix=self.identifier_prefix,
                now=now,
                customer_unknown=line["customer_id"] in unknown,
            )
            for line, day in zip(wanted, days, strict=True)
        ]
        events = [event for plan in plans for event in plan.events]

        def send(batch: list[PlannedEvent]) -> None:
            [event] = batch
            hook.create_meter_event(event.as_meter_event(), **spec.payload_keys)

        report = Deliverer(
            send,
            key=lambda event: event.customer_id,
            describe=PlannedEvent.describe,
            max_rps=max_rps,
            progress=lambda line: self.log.info("Corrections: %s", line),
        ).run(events)
        outcome = self._outcome(events, report, partial)
        MeterMetrics.for_task(context, self.billed_account()).delivery(report, self.event_name)
        self.log.info(
            "Corrections: %s", {k: v for k, v in outcome.items() if k not in ("corrections", "samples")}
        )
        if report.failed:
            raise StripeDeliveryIncompleteError(
                f"{report.failed} corrections could not be delivered; a retry reads Stripe again and "
                "sends what is still missing",
                {"type": "delivery_incomplete", "failed": report.failed},
            )
        return outcome

    @staticmethod
    def _outcome(events: list[PlannedEvent], report: DeliveryReport, partial: bool = False) -> dict[str, Any]:
        not_sent = {id(e) for e in [*report.unsettled, *report.already]}
        return {
            "success": not (report.rejected or report.failed or partial),
            "partial_reconciliation": partial,
            "sent": report.sent,
            "already_recorded": report.already_recorded,
            "rejected": report.rejected,
            "failed": report.failed,
            # Corrections Stripe already held came from an earlier run: not sent, not counted.
            "value_sent": sum(e.value for e in events if id(e) not in not_sent),
            # What was planned, bounded: XCom is a row in Airflow's metadata database.
            "corrections": [e.describe() for e in events[:CORRECTIONS_SHOWN]],
            "corrections_total": len(events),
            "samples": report.samples,
        }


#: Planned corrections listed in the result at most (all are counted in ``corrections_total``).
CORRECTIONS_SHOWN = 1_000


def _reconciliation_lines(reconciliation: Any) -> tuple[Iterable[dict[str, Any]], bool]:
    """The reconciliation's lines, and whether some are missing from them.

    A whole result that names its full table (``lines_uri``) is read from there; a result that
    kept only some lines (``lines_truncated``) is all there is, and says so.
    """
    if not isinstance(reconciliation, dict):
        return reconciliation or [], False
    if reconciliation.get("lines_uri"):
        from airflow_provider_stripe_meter.state.reports import read_lines

        return read_lines(reconciliation["lines_uri"]), False
    return reconciliation.get("lines") or [], bool(reconciliation.get("lines_truncated"))


def _aggregate(event_name: str, line: dict[str, Any]) -> DailyAggregate:
    """A reconciliation line as the day's aggregate: its expected figure under every formula."""
    from airflow_provider_stripe_meter.billing.plans import day_end
    from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate

    day = date.fromisoformat(line["day"])
    expected = int(line["expected"])
    timestamp = line.get("timestamp") or day_end(day) - 1
    return DailyAggregate(event_name, line["customer_id"], day, expected, timestamp, expected, expected)


class StripeMeterEventCancelOperator(StripeBaseOperator):
    """
    Cancel meter events by identifier (``POST /v1/billing/meter_event_adjustments``).

    Stripe cancels an event only within 24 hours of receiving it; past that, the answer says so
    plainly and the fix is a correcting event or a credit. Returns ``success``, ``cancelled``
    (identifiers) and ``errors`` (identifier, message, ``too_late``).

    .. seealso:: https://docs.stripe.com/api/billing/meter-event-adjustment/create

    :param event_name: The meter's event name. (templated)
    :param identifiers: One identifier or a list. (templated)
    :param fail_on_error: Fail the task (no retry) if any cancellation is refused.

    ``stripe_conn_id``, ``stripe_account`` (templated) and ``preflight`` are those of
    :class:`~airflow_provider_stripe_meter.operators.base.StripeBaseOperator`; with
    ``preflight`` the event name is checked against the active meters first.
    """

    template_fields: Sequence[str] = ("event_name", "identifiers", *StripeBaseOperator.template_fields)

    def __init__(
        self,
        *,
        event_name: str,
        identifiers: str | Sequence[str],
        fail_on_error: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.event_name = event_name
        self.identifiers = identifiers
        self.fail_on_error = fail_on_error

    def execute(self, context: Context) -> dict[str, Any]:
        """Cancel each event; report what was cancelled and what was refused, and why."""
        from airflow_provider_stripe_meter.exceptions import (
            StripeAdjustmentTooLateError,
            StripeEventRejectedError,
            StripeRequestRejectedError,
        )

        identifiers = [self.identifiers] if isinstance(self.identifiers, str) else list(self.identifiers)
        hook = self.hook
        if self.preflight:
            hook.active_meter(self.event_name)
        cancelled: list[str] = []
        errors: list[dict[str, Any]] = []
        for identifier in identifiers:
            try:
                hook.cancel_meter_event(self.event_name, identifier)
            except StripeRequestRejectedError as err:
                too_late = isinstance(err, StripeAdjustmentTooLateError)
                self.log.warning("Not cancelled: %s", err)
                # Stripe's details first: the message of a too-late error is ours, and says what to do.
                errors.append(
                    {**err.details, "identifier": identifier, "message": str(err), "too_late": too_late}
                )
                continue
            cancelled.append(identifier)
            self.log.info("Cancelled meter event %r", identifier)
        outcome = {"success": not errors, "cancelled": cancelled, "errors": errors}
        if errors and self.fail_on_error:
            raise StripeEventRejectedError(
                f"{len(errors)} of {len(identifiers)} cancellations refused: {errors}",
                {"type": "cancellations_refused", "errors": errors},
            )
        return outcome
