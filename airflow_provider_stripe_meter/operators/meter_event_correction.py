"""Operators that correct what Stripe recorded: top up short days, cancel events."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.billing.outcomes import DayOutcome
from airflow_provider_stripe_meter.ledger.schema import DEFAULT_TABLE, check_table_name
from airflow_provider_stripe_meter.metrics import MeterMetrics
from airflow_provider_stripe_meter.operators.base import StripeBaseOperator
from airflow_provider_stripe_meter.utils.aggregation import DEFAULT_SAFETY_MARGIN
from airflow_provider_stripe_meter.utils.clock import SYSTEM
from airflow_provider_stripe_meter.utils.rules import PAST_WINDOW

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_stripe_meter.billing.run import BillingRun
    from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate


class StripeMeterTopUpOperator(StripeBaseOperator):
    """
    Bring Stripe up to the source for the days a reconciliation found ``missing`` or ``short``.

    Takes the reconciliation's result (``reconcile.output``), or its ``lines``. A result that
    names its full table (the sensor's ``report_path``) is read from there, so every short day
    is corrected at any number of customers; one that kept only some lines corrects those and
    ends with ``success`` false (``partial_reconciliation``). It goes through the batch
    operator's billing core and ledger: for each short day it sends the source's figure minus
    what the ledger holds (late rows the batch has not billed yet), written to the ledger before
    it leaves, so neither a re-run of the top-up nor the next batch run sends it again. A day the
    ledger holds in full is not sent again (``in_ledger``): Stripe's summaries may still trail,
    and a shortfall alone does not say what Stripe dropped; events of customers Stripe does not
    know are marked dropped by the sensor, and the batch operator sends them once the customer
    exists.

    ``over`` and ``customer_unknown`` lines need a person (credit, or fix the customer) and are
    left alone. Returns ``success``, ``sent``, ``already_recorded``, ``rejected``, ``failed``,
    ``value_sent``, ``corrections`` (what was planned, the first 1,000), ``corrections_total``,
    ``in_ledger``, ``settled``, ``partial_reconciliation`` and ``samples``.

    :param reconciliation: The reconciliation's lines, or its whole result. (templated)
    :param event_name: The meter's event name. (templated)
    :param ledger_conn_id: The batch operator's ledger (required): the corrections are written
        there as the batch operator's events are, so no run sends them again.
    :param ledger_table: The ledger's table (default ``stripe_meter_ledger``).
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
        ledger_conn_id: str,
        ledger_table: str = DEFAULT_TABLE,
        max_rps: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.reconciliation = reconciliation
        self.event_name = event_name
        self.ledger_conn_id = ledger_conn_id
        self.ledger_table = check_table_name(ledger_table)
        self.max_rps = max_rps

    def execute(self, context: Context) -> dict[str, Any]:
        """Settle the short days' events from Stripe's summaries, then send what the ledger lacks."""
        from airflow_provider_stripe_meter.billing.hook_port import HookStripe
        from airflow_provider_stripe_meter.billing.result import SourceFigures
        from airflow_provider_stripe_meter.billing.run import BillingRun, Usage
        from airflow_provider_stripe_meter.billing.settings import run_settings
        from airflow_provider_stripe_meter.exceptions import StripeDeliveryIncompleteError, raised_for_airflow
        from airflow_provider_stripe_meter.state.ledger import ledger_on, ledger_writer

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
            return self._outcome(None, partial)
        hook = self.hook
        aggregates = [_aggregate(self.event_name, line) for line in wanted]
        now = int(SYSTEM.now())
        settings = run_settings(hook, max_rps=self.max_rps, api="v1")
        ledger = ledger_on(self.ledger_conn_id, self.ledger_table)
        try:
            run = BillingRun(
                settings,
                HookStripe(hook),
                ledger,
                ledger_writer(hook.stripe_account or "platform", context),
                self.log,
                now,
            )
            # Only what the ledger lacks is sent. A day Stripe shows short that the ledger holds
            # in full is not sent again: a shortfall alone does not say Stripe dropped anything
            # (its summaries may trail longer than summary_lag), and guessing would bill twice.
            source = SourceFigures(rows=0, aggregates=len(aggregates), problems={}, samples={})
            oldest = now - int((PAST_WINDOW - DEFAULT_SAFETY_MARGIN).total_seconds())
            with raised_for_airflow():
                result = run.execute(Usage(aggregates, source, (), oldest))
        finally:
            ledger.close()
        outcome = self._outcome(result.as_dict(), partial, run)
        if outcome["in_ledger"]:
            self.log.warning(
                "%d customer-days the reconciliation found short are in the ledger in full: not sent "
                "again. Stripe's summaries may still trail (give the sensor a longer settle_timeout); "
                "events of customers Stripe does not know are marked dropped by the sensor and sent "
                "again by the next batch run once the customer exists.",
                outcome["in_ledger"],
            )
        self.log.info(
            "Corrections: %s", {k: v for k, v in outcome.items() if k not in ("corrections", "samples")}
        )
        for report in run.book.reports:
            MeterMetrics.for_task(context, self.billed_account()).delivery(report, self.event_name)
        if outcome["failed"]:
            raise StripeDeliveryIncompleteError(
                f"{outcome['failed']} corrections could not be delivered; a retry settles them from the "
                "ledger and sends what is still missing",
                {"type": "delivery_incomplete", "failed": outcome["failed"]},
            )
        return outcome

    @staticmethod
    def _outcome(
        result: dict[str, Any] | None, partial: bool, run: BillingRun | None = None
    ) -> dict[str, Any]:
        days = list(run.book.days.values()) if run else []
        corrected = [d for d in days if d.plan.events]
        return {
            "success": (result["success"] if result else True) and not partial,
            "partial_reconciliation": partial,
            **{k: (result or {}).get(k, 0) for k in ("sent", "already_recorded", "rejected", "failed")},
            "value_sent": sum(
                e.value for d in corrected if d.outcome == DayOutcome.SENT for e in d.plan.events
            ),
            # What was planned, bounded: XCom is a row in Airflow's metadata database.
            "corrections": [d.plan.line() for d in corrected[:CORRECTIONS_SHOWN]],
            "corrections_total": len(corrected),
            "settled": ((result or {}).get("ledger") or {}).get("settled", 0),
            # Short in Stripe, but in the ledger in full: not sent again (see execute).
            "in_ledger": sum(1 for d in days if not d.plan.events and d.plan.action == "leave_alone"),
            "samples": (result or {}).get("samples", {}),
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
    from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate
    from airflow_provider_stripe_meter.utils.days import day_end

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
    :param ledger_conn_id: The batch operator's ledger, if the events are in it: each event
        cancelled is marked ``cancelled`` there, so the batch operator knows Stripe no longer
        holds it (and sends the usage again if the source still has it).
    :param ledger_table: The ledger's table (default ``stripe_meter_ledger``).

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
        ledger_conn_id: str | None = None,
        ledger_table: str = DEFAULT_TABLE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.event_name = event_name
        self.identifiers = identifiers
        self.fail_on_error = fail_on_error
        self.ledger_conn_id = ledger_conn_id
        self.ledger_table = check_table_name(ledger_table)

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
        if cancelled and self.ledger_conn_id:
            from airflow_provider_stripe_meter.ledger.entries import CANCELLED, Change
            from airflow_provider_stripe_meter.state.ledger import ledger_on

            ledger = ledger_on(self.ledger_conn_id, self.ledger_table)
            try:
                ledger.resolve(
                    hook.stripe_account or "platform",
                    [
                        Change(i, CANCELLED, SYSTEM.now(), f"cancelled by task {self.task_id}")
                        for i in cancelled
                    ],
                )
            finally:
                ledger.close()
        outcome = {"success": not errors, "cancelled": cancelled, "errors": errors}
        if errors and self.fail_on_error:
            raise StripeEventRejectedError(
                f"{len(errors)} of {len(identifiers)} cancellations refused: {errors}",
                {"type": "cancellations_refused", "errors": errors},
            )
        return outcome
