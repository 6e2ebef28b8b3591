"""Operator that records one Stripe meter event."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import tzinfo
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.exceptions import StripeConfigurationError
from airflow_provider_stripe_meter.metrics import MeterMetrics
from airflow_provider_stripe_meter.operators.base import (
    StripeBaseOperator,
    meter_outlets,
    update_meter_assets,
)
from airflow_provider_stripe_meter.utils.clock import SYSTEM
from airflow_provider_stripe_meter.utils.identifiers import task_identifier
from airflow_provider_stripe_meter.utils.rules import (
    NAIVE_TIMEZONE,
    MeterEventInputError,
    check_fixed_event_name,
    validate_meter_event,
)

if TYPE_CHECKING:
    from airflow.sdk import Context


class StripeMeterEventOperator(StripeBaseOperator):
    """
    Record one usage event on a Stripe billing meter.

    The task returns ``{"success": bool, "response": dict}`` and pushes each key as its own XCom,
    so a downstream task can branch on ``op.output["success"]``. ``response`` is Stripe's event on
    success and the error details on failure.

    Exactly once: the event carries an identifier, by default derived from the task instance
    (dag id, task id, run id, map index). Every Airflow retry of the task sends the same
    identifier, and Stripe refuses a second event with an identifier it has seen, which this
    operator reports as ``success=True`` with ``response["already_recorded"] = True``.

    Outcomes:

    * accepted: ``success=True``, ``response`` is the ``billing.meter_event``;
    * already recorded (duplicate identifier): ``success=True``, ``already_recorded=True``;
    * rejected by Stripe (4xx other than 429) or by the local input rules: ``success=False``
      and the task succeeds, so the DAG can branch; with ``fail_on_error=True`` the task fails
      with :class:`~airflow_provider_stripe_meter.exceptions.StripeEventRejectedError`, and is
      not retried;
    * a refused API key, or no active meter for ``event_name``: the task fails at once, without
      spending ``retries`` (no retry can fix it);
    * rate limited, 5xx or network errors that outlast the SDK's retries: the task raises
      :class:`~airflow_provider_stripe_meter.exceptions.StripeTransientError`, and Airflow's
      retries send the same identifier again.

    .. seealso:: https://docs.stripe.com/api/billing/meter-event/create

    :param event_name: The meter's ``event_name``, at most 100 characters. (templated)
    :param customer_id: The Stripe customer id, ``cus_...``. (templated)
    :param value: A whole number of at most 15 digits; numeric strings are accepted. (templated)
    :param identifier: Up to 100 characters identifying the billable fact; by default derived from
        the task instance. Give one derived from the data when the same fact may be sent by
        different task instances. (templated)
    :param timestamp: When the usage happened: unix seconds, a datetime or an ISO-8601 string;
        within the past 35 days and at most 5 minutes ahead. Defaults to now. One without a zone
        (``"2026-11-23 10:00:00"``) is read in ``naive_timezone``, UTC by default, as the batch
        operator reads its rows. (templated)
    :param naive_timezone: The zone a ``timestamp`` without one is read in: UTC by default; a
        ``tzinfo`` or a zone name (``"Europe/Paris"``); ``None`` refuses such a timestamp
        (``success=False``, nothing sent).
    :param fail_on_error: Fail the task (no retry) when the event is rejected instead of returning
        ``success=False``.
    :param customer_payload_key: The meter's ``customer_mapping.event_payload_key``; default the
        meter's (with ``preflight``) or ``stripe_customer_id``.
    :param value_payload_key: The meter's ``value_settings.event_payload_key``; default the
        meter's (with ``preflight``) or ``value``.
    """

    bills_meters = True
    template_fields: Sequence[str] = (
        "event_name",
        "customer_id",
        "value",
        "identifier",
        "timestamp",
        *StripeBaseOperator.template_fields,
    )

    def __init__(
        self,
        *,
        event_name: str,
        customer_id: str,
        value: Any,
        identifier: str | None = None,
        timestamp: Any = None,
        naive_timezone: tzinfo | str | None = NAIVE_TIMEZONE,
        fail_on_error: bool = False,
        customer_payload_key: str | None = None,
        value_payload_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        meter_outlets(kwargs, event_name, kwargs.get("stripe_account"))
        super().__init__(**kwargs)
        check_fixed_event_name(event_name)
        self.event_name = event_name
        self.customer_id = customer_id
        self.value = value
        self.identifier = identifier
        self.timestamp = timestamp
        self.naive_timezone = naive_timezone
        self.fail_on_error = fail_on_error
        self.customer_payload_key = customer_payload_key
        self.value_payload_key = value_payload_key

    def execute(self, context: Context) -> dict[str, Any]:
        """Validate the rendered inputs, send the event and report the outcome."""
        from airflow_provider_stripe_meter.exceptions import (
            StripeDuplicateIdentifierError,
            StripeRequestRejectedError,
            StripeTransientError,
        )
        from airflow_provider_stripe_meter.sources import zone

        try:
            event = validate_meter_event(
                event_name=self.event_name,
                customer_id=self.customer_id,
                value=self.value,
                identifier=self.identifier,
                timestamp=self.timestamp,
                now=int(SYSTEM.now()),
                naive_timezone=zone(self.naive_timezone),
            )
        except MeterEventInputError as err:
            return self._finish(context, False, err.to_dict(), str(err), counter="invalid")

        if event.identifier is None:
            ti = context["ti"]
            derived = task_identifier(
                ti.dag_id, ti.task_id, ti.run_id, ti.map_index if ti.map_index is not None else -1
            )
            event = replace(event, identifier=derived)

        customer_key, value_key = self.payload_keys(
            event.event_name, self.customer_payload_key, self.value_payload_key
        )
        note = self._formula_note(event.event_name)
        if note:
            self.log.warning("Meter event %r: %s", event.event_name, note)
        try:
            known = self.hook.customer_exists(event.customer_id)
        except StripeConfigurationError as err:
            # A key restricted to meter events: say which permission the check needs.
            raise StripeConfigurationError(
                f"Checking that Stripe knows customer {event.customer_id!r} before sending needs the key "
                f"to read Customers (a restricted key's Customers: Read permission). {err}",
                err.details,
            ) from err
        if not known:
            # Stripe would answer 200 and drop the event later (reported only in the meter's error
            # reports): nothing is sent, and the task says so; a retry once the customer exists sends it.
            details = {
                "type": "customer_unknown",
                "code": "customer_unknown",
                "customer_id": event.customer_id,
                "message": f"Stripe does not know customer {event.customer_id!r}: the event was not sent",
            }
            return self._finish(context, False, details, details["message"], counter="customer_unknown")
        self.log.info(
            "Recording %s=%s for %s on meter event %r (identifier %r, timestamp %s)",
            value_key,
            event.value,
            event.customer_id,
            event.event_name,
            event.identifier,
            event.timestamp if event.timestamp is not None else "now",
        )
        started = time.monotonic()
        try:
            recorded = self.hook.create_meter_event(
                event, customer_payload_key=customer_key, value_payload_key=value_key
            )
        except StripeTransientError:
            # Airflow retries the task with the same identifier; count the try that did not land.
            self._metrics(context, "failed", started)
            raise
        except StripeDuplicateIdentifierError as err:
            # The identifier names this billable fact, so Stripe already holds it: an earlier try
            # of this task (or another run sending the same fact) recorded it.
            self.log.info("Already recorded: Stripe holds an event with identifier %r", event.identifier)
            response = {
                "already_recorded": True,
                "identifier": event.identifier,
                "event_name": event.event_name,
                "request_id": err.details.get("request_id"),
            }
            self._metrics(context, "already_recorded", started)
            return self._finish(context, True, response, "already recorded")
        except StripeRequestRejectedError as err:
            self._metrics(context, "rejected", started)
            return self._finish(context, False, err.details, str(err))
        self._metrics(context, "sent", started)
        if note:
            recorded = {**recorded, "note": note}
        return self._finish(context, True, recorded, "recorded")

    def _metrics(self, context: Context, counter: str, started: float | None = None) -> None:
        """Count this event's fate (and time its request) in Airflow's metrics, by meter."""
        metrics = MeterMetrics.for_task(context, self.billed_account())
        metrics.count(counter, 1, self.event_name)
        if counter == "sent":
            metrics.count("events_sent", 1, self.event_name)
        if started is not None:
            metrics.count("requests", 1, self.event_name)
            metrics.time("delivery", time.monotonic() - started, self.event_name)

    def _formula_note(self, event_name: str) -> str | None:
        """What the meter's formula does with this event's value, where it is not simply added."""
        if not self.preflight:
            return None
        meter = self.hook.active_meter(event_name)
        formula = (meter.get("default_aggregation") or {}).get("formula")
        window = meter.get("event_time_window")
        if formula == "count":
            return f"meter {meter['id']} counts events: this event counts as 1, its value is ignored"
        if window:
            return (
                f"meter {meter['id']} is pre-aggregated by {window}: Stripe keeps only the most recent "
                f"event of each {window}, so this value replaces any earlier one in the same {window}"
            )
        if formula == "last":
            return f"meter {meter['id']} bills the last value: this replaces earlier ones if it is the latest"
        return None

    def _finish(
        self,
        context: Context,
        success: bool,
        response: dict[str, Any],
        summary: str,
        counter: str | None = None,
    ) -> dict[str, Any]:
        if counter:
            self._metrics(context, counter)
        if success:
            self.log.info("Meter event %s: %s", summary, response)
        else:
            self.log.warning("Meter event not recorded: %s", summary)
            if self.fail_on_error:
                from airflow_provider_stripe_meter.exceptions import StripeEventRejectedError

                raise StripeEventRejectedError(f"Meter event not recorded: {summary}", response)
        if success:
            update_meter_assets(
                self,
                context,
                {
                    "success": True,
                    "already_recorded": bool(response.get("already_recorded")),
                    "summary": summary,
                },
                [self.event_name],
            )
        else:
            # Nothing reached the meter, so its Asset gets no event: DAGs scheduled on the meter
            # must not run for usage that was not recorded. Airflow emits an event for every
            # outlet of a successful task (read after execute), so the outlets go; an event name
            # that broke the rules could not even name an Asset.
            self.outlets = []
        return {"success": success, "response": response}
