"""Operators that correct what Stripe recorded: top up short days, cancel events."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_stripe_meter.reconcile import Correction


class StripeMeterTopUpOperator(BaseOperator):
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
    :param stripe_conn_id: Airflow connection of type ``stripe``.
    :param stripe_account: Connected account (``acct_...``). (templated)
    """

    template_fields: Sequence[str] = ("reconciliation", "event_name", "stripe_account")
    ui_color = "#635bff"

    def __init__(
        self,
        *,
        reconciliation: Any,
        event_name: str,
        identifier_prefix: str = "usage",
        top_up_prefix: str = "topup",
        max_rps: float | None = None,
        stripe_conn_id: str = "stripe_default",
        stripe_account: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)
        self.reconciliation = reconciliation
        self.event_name = event_name
        self.identifier_prefix = identifier_prefix
        self.top_up_prefix = top_up_prefix
        self.max_rps = max_rps
        self.stripe_conn_id = stripe_conn_id
        self.stripe_account = stripe_account

    def execute(self, context: Context) -> dict[str, Any]:
        """Plan the corrections and send them."""
        from airflow_provider_stripe_meter.delivery import Deliverer, default_max_rps
        from airflow_provider_stripe_meter.hooks.stripe import StripeHook
        from airflow_provider_stripe_meter.operators.meter_event import payload_keys
        from airflow_provider_stripe_meter.reconcile import plan_corrections
        from airflow_provider_stripe_meter.rules import MeterEvent

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
            return {
                "success": True,
                "sent": 0,
                "already_recorded": 0,
                "rejected": 0,
                "failed": 0,
                "value_sent": 0,
                "corrections": [],
            }
        hook = StripeHook(self.stripe_conn_id, stripe_account=self.stripe_account or None)
        customer_key, value_key = payload_keys(hook, self.event_name, True, None, None)

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

        def describe(correction: Correction) -> dict[str, Any]:
            return {
                "customer_id": correction.customer_id,
                "day": correction.day.isoformat(),
                "value": correction.value,
                "identifier": correction.identifier,
            }

        report = Deliverer(
            send,
            key=lambda c: c.customer_id,
            describe=describe,
            max_rps=self.max_rps or default_max_rps(hook.livemode),
            progress=lambda line: self.log.info("Corrections: %s", line),
        ).run(plan)
        not_sent = {id(c) for c in [*report.unsettled, *report.already]}
        outcome = {
            "success": not (report.rejected or report.failed),
            "sent": report.sent,
            "already_recorded": report.already_recorded,
            "rejected": report.rejected,
            "failed": report.failed,
            # Corrections Stripe already held came from an earlier run: not sent, not counted.
            "value_sent": sum(c.value for c in plan if id(c) not in not_sent),
            "corrections": [describe(c) for c in plan],
            "samples": report.samples,
        }
        self.log.info(
            "Corrections: %s", {k: v for k, v in outcome.items() if k not in ("corrections", "samples")}
        )
        if report.failed:
            raise RuntimeError(
                f"{report.failed} corrections could not be delivered; a retry sends them again"
            )
        return outcome


class StripeMeterEventCancelOperator(BaseOperator):
    """
    Cancel meter events by identifier (``POST /v1/billing/meter_event_adjustments``).

    Stripe cancels an event only within 24 hours of receiving it; past that, the answer says so
    plainly and the fix is a correcting event or a credit. Returns ``success``, ``cancelled``
    (identifiers) and ``errors`` (identifier, message, ``too_late``).

    .. seealso:: https://docs.stripe.com/api/billing/meter-event-adjustment/create

    :param event_name: The meter's event name. (templated)
    :param identifiers: One identifier or a list. (templated)
    :param fail_on_error: Fail the task if any cancellation is refused.
    :param stripe_conn_id: Airflow connection of type ``stripe``.
    :param stripe_account: Connected account (``acct_...``). (templated)
    """

    template_fields: Sequence[str] = ("event_name", "identifiers", "stripe_account")
    ui_color = "#635bff"

    def __init__(
        self,
        *,
        event_name: str,
        identifiers: str | Sequence[str],
        fail_on_error: bool = False,
        stripe_conn_id: str = "stripe_default",
        stripe_account: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)
        self.event_name = event_name
        self.identifiers = identifiers
        self.fail_on_error = fail_on_error
        self.stripe_conn_id = stripe_conn_id
        self.stripe_account = stripe_account

    def execute(self, context: Context) -> dict[str, Any]:
        """Cancel each event; report what was cancelled and what was refused, and why."""
        from airflow_provider_stripe_meter.exceptions import StripeAdjustmentTooLate, StripeRequestRejected
        from airflow_provider_stripe_meter.hooks.stripe import StripeHook

        identifiers = [self.identifiers] if isinstance(self.identifiers, str) else list(self.identifiers)
        hook = StripeHook(self.stripe_conn_id, stripe_account=self.stripe_account or None)
        cancelled: list[str] = []
        errors: list[dict[str, Any]] = []
        for identifier in identifiers:
            try:
                hook.cancel_meter_event(self.event_name, identifier)
            except StripeRequestRejected as err:
                too_late = isinstance(err, StripeAdjustmentTooLate)
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
            raise RuntimeError(f"{len(errors)} of {len(identifiers)} cancellations refused: {errors}")
        return outcome
