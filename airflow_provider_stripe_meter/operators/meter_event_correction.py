"""Operators that correct what Stripe recorded: top up short days, cancel events."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.operators.base import StripeBaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_stripe_meter.utils.delivery import DeliveryReport
    from airflow_provider_stripe_meter.utils.reconcile import Correction


class StripeMeterTopUpOperator(StripeBaseOperator):
    """
    Bring Stripe up to the source for the days a reconciliation found ``missing`` or ``short``.

    Takes the reconciliation's ``lines`` (``reconcile.output["lines"]``) and sends one event per
    such customer-day, for the difference only, never the whole day again:

    * a ``missing`` day goes out under the batch operator's own identifier for that day, so if
      the day's event did land and Stripe's summary only lags, Stripe refuses the copy;
    * a ``short`` day gets ``topup:<event>:<customer>:<day>:to<total>``: the identifier names the
      total it brings the day to, so running the correction again on the same data is refused by
      Stripe, and only new late rows (a new total) make a new top-up.

    ``over`` and ``customer_unknown`` lines need a person (cancel within 24 hours, credit, or fix
    the customer) and are left alone. Returns ``success``, ``sent``, ``already_recorded``,
    ``rejected``, ``failed``, ``value_sent`` and the ``corrections`` planned.

    :param reconciliation: The reconciliation's lines, or its whole result. (templated)
    :param event_name: The meter's event name. (templated)
    :param identifier_prefix: The batch operator's ``identifier_prefix`` (default ``usage``).
    :param top_up_prefix: First part of top-up identifiers.
    :param max_rps: Requests per second; default fits the key's mode.

    ``stripe_conn_id``, ``stripe_account`` (templated) and ``preflight`` are those of
    :class:`~airflow_provider_stripe_meter.operators.base.StripeBaseOperator`.
    """

    template_fields: Sequence[str] = ("reconciliation", "event_name", *StripeBaseOperator.template_fields)

    def __init__(
        self,
        *,
        reconciliation: Any,
        event_name: str,
        identifier_prefix: str = "usage",
        top_up_prefix: str = "topup",
        max_rps: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.reconciliation = reconciliation
        self.event_name = event_name
        self.identifier_prefix = identifier_prefix
        self.top_up_prefix = top_up_prefix
        self.max_rps = max_rps

    def execute(self, context: Context) -> dict[str, Any]:
        """Plan the corrections and send them."""
        from airflow_provider_stripe_meter.exceptions import StripeDeliveryIncompleteError
        from airflow_provider_stripe_meter.utils.delivery import Deliverer, DeliveryReport, default_max_rps
        from airflow_provider_stripe_meter.utils.reconcile import plan_corrections
        from airflow_provider_stripe_meter.utils.rules import MeterEvent

        lines = self.reconciliation
        if isinstance(lines, dict):
            lines = lines.get("lines", [])
        plan = plan_corrections(
            list(lines or []),
            self.event_name,
            daily_prefix=self.identifier_prefix,
            top_up_prefix=self.top_up_prefix,
        )
        if not plan:
            self.log.info("Nothing to correct: no missing or short customer-days")
            return self._outcome(plan, DeliveryReport(total=0))
        hook = self.hook
        customer_key, value_key = self.payload_keys(self.event_name)

        def send(batch: list[Correction]) -> None:
            [correction] = batch
            hook.create_meter_event(
                MeterEvent(
                    event_name=self.event_name,
                    customer_id=correction.customer_id,
                    value=correction.value,
                    identifier=correction.identifier,
                    timestamp=correction.timestamp,
                ),
                customer_payload_key=customer_key,
                value_payload_key=value_key,
            )

        report = Deliverer(
            send,
            key=lambda c: c.customer_id,
            describe=_describe,
            max_rps=self.max_rps or default_max_rps(hook.livemode),
            progress=lambda line: self.log.info("Corrections: %s", line),
        ).run(plan)
        outcome = self._outcome(plan, report)
        self.log.info(
            "Corrections: %s", {k: v for k, v in outcome.items() if k not in ("corrections", "samples")}
        )
        if report.failed:
            raise StripeDeliveryIncompleteError(
                f"{report.failed} corrections could not be delivered; a retry sends them again",
                {"type": "delivery_incomplete", "failed": report.failed},
            )
        return outcome

    @staticmethod
    def _outcome(plan: list[Correction], report: DeliveryReport) -> dict[str, Any]:
        not_sent = {id(c) for c in [*report.unsettled, *report.already]}
        return {
            "success": not (report.rejected or report.failed),
            "sent": report.sent,
            "already_recorded": report.already_recorded,
            "rejected": report.rejected,
            "failed": report.failed,
            # Corrections Stripe already held came from an earlier run: not sent, not counted.
            "value_sent": sum(c.value for c in plan if id(c) not in not_sent),
            "corrections": [_describe(c) for c in plan],
            "samples": report.samples,
        }


def _describe(correction: Correction) -> dict[str, Any]:
    return {
        "customer_id": correction.customer_id,
        "day": correction.day.isoformat(),
        "value": correction.value,
        "identifier": correction.identifier,
    }


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
