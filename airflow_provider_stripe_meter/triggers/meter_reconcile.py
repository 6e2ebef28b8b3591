"""Trigger that waits in the triggerer until Stripe's meter summaries agree with the source.

The deferrable form of
:class:`~airflow_provider_stripe_meter.sensors.meter_reconcile.StripeMeterReconcileSensor`: the
sensor reads the source on a worker, hands the expected figures to this trigger and gives its
worker slot back; the trigger polls ``GET /v1/billing/meters/{id}/event_summaries``
asynchronously until every customer-day matches or the settle time is over, then hands the
sensor the same report the sensor builds when it polls itself.

.. seealso:: https://airflow.apache.org/docs/apache-airflow/stable/authoring-and-scheduling/deferring.html
.. seealso:: https://docs.stripe.com/api/billing/meter-event-summary/list
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_stripe_meter.billing import reconcile
from airflow_provider_stripe_meter.utils import paced_reads


class StripeMeterReconcileTrigger(BaseTrigger):
    """Poll a meter's daily summaries until they match the source or ``settle_seconds`` are over.

    Yields one event: ``{"status": "done", "report": ...}`` (the sensor's report, matched or
    not), or ``{"status": "error", "retryable": bool, "error": class name, "message", "details"}``
    when Stripe could not be read: a refused key or a rejected request at once (no retry can fix
    them), 429s, 5xx and network failures only once the settle time is over (until then the next
    poll tries again).

    :param stripe_conn_id: The ``stripe`` connection.
    :param stripe_account: Connected account (``acct_...``) or ``None``.
    :param event_name: The meter's event name (for the report).
    :param expectation: What the source says, per compared customer-day, as
        :meth:`~airflow_provider_stripe_meter.billing.reconcile.Expectation.to_json` gives it;
        ``None`` when it is read from ``expectation_uri``.
    :param expectation_uri: Where the sensor wrote the expectation when it was too large for
        these arguments (a row of Airflow's metadata database): an object storage URL.
    :param report_path: Where to write the full table (JSON Lines), or ``None``.
    :param line_limit: Lines kept in the report, those that differ first.
    :param started: Unix time the sensor started waiting.
    :param settle_seconds: How long after ``started`` a mismatch may be waited out.
    :param poll_interval: Seconds between polls.
    :param max_rps: Summary requests per second.
    """

    def __init__(
        self,
        *,
        stripe_conn_id: str,
        stripe_account: str | None,
        event_name: str,
        expectation: dict[str, Any] | None,
        started: float,
        settle_seconds: float,
        poll_interval: float,
        max_rps: float,
        expectation_uri: str | None = None,
        report_path: str | None = None,
        line_limit: int = reconcile.DEFAULT_LINE_LIMIT,
    ) -> None:
        super().__init__()
        if (expectation is None) == (expectation_uri is None):
            raise ValueError("give the trigger either expectation or expectation_uri")
        self.stripe_conn_id = stripe_conn_id
        self.stripe_account = stripe_account
        self.event_name = event_name
        self.expectation = expectation
        self.expectation_uri = expectation_uri
        self.report_path = report_path
        self.line_limit = line_limit
        self.started = started
        self.settle_seconds = settle_seconds
        self.poll_interval = poll_interval
        self.max_rps = max_rps

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and keyword arguments, as the triggerer stores them."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "stripe_conn_id": self.stripe_conn_id,
                "stripe_account": self.stripe_account,
                "event_name": self.event_name,
                "expectation": self.expectation,
                "expectation_uri": self.expectation_uri,
                "report_path": self.report_path,
                "line_limit": self.line_limit,
                "started": self.started,
                "settle_seconds": self.settle_seconds,
                "poll_interval": self.poll_interval,
                "max_rps": self.max_rps,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until settled or out of time; yield the report (or why Stripe could not be read)."""
        from asgiref.sync import sync_to_async

        from airflow_provider_stripe_meter.exceptions import StripeMeterError, StripeTransientError
        from airflow_provider_stripe_meter.hooks.stripe import StripeHook

        hook = StripeHook(self.stripe_conn_id, stripe_account=self.stripe_account or None)
        try:
            # Reading the connection is synchronous (it may ask the supervisor): off the event loop.
            await sync_to_async(lambda: hook.async_client)()
        except StripeMeterError as err:
            yield _error(err, retryable=isinstance(err, StripeTransientError))
            return
        try:
            async for event in self._poll(hook):
                yield event
        finally:
            await hook.aclose()

    def _expectation(self) -> reconcile.Expectation:
        """What the source says: from the arguments, or read from the sensor's storage."""
        if self.expectation is not None:
            return reconcile.Expectation.from_json(self.expectation)
        from airflow_provider_stripe_meter.state.reports import read_json

        assert self.expectation_uri is not None
        return reconcile.Expectation.from_json(read_json(self.expectation_uri))

    async def _poll(self, hook: Any) -> AsyncIterator[TriggerEvent]:
        from asgiref.sync import sync_to_async

        from airflow_provider_stripe_meter.exceptions import StripeMeterError, StripeTransientError
        from airflow_provider_stripe_meter.state.reports import write_report

        wanted = await sync_to_async(self._expectation)()
        while True:
            try:
                recorded, unknown = await paced_reads.arecorded_per_day(
                    hook, wanted.meter_id, wanted.customers, wanted.first, wanted.last, max_rps=self.max_rps
                )
            except StripeTransientError as err:
                if reconcile.clock() - self.started >= self.settle_seconds:
                    yield _error(err, retryable=True)
                    return
                self.log.warning("Stripe's summaries could not be read (%s); polling again", err)
                await asyncio.sleep(self.poll_interval)
                continue
            except StripeMeterError as err:
                yield _error(err, retryable=False)
                return
            lines = wanted.compare(recorded, unknown)
            counts = reconcile.summarize(lines)
            waited = max(0.0, reconcile.clock() - self.started)
            if reconcile.is_settled(counts) or waited >= self.settle_seconds:
                # The event is stored with the task too: the report keeps ``line_limit`` lines.
                uri = await sync_to_async(write_report)(self.report_path, lines)
                report = wanted.report(
                    self.event_name, lines, waited, line_limit=self.line_limit, lines_uri=uri
                )
                yield TriggerEvent({"status": "done", "report": report})
                return
            self.log.info(
                "%d of %d customer-days differ from Stripe's summaries (%s); checking again in %.0f s "
                "(waited %.0f s of %.0f s)",
                len(lines) - counts["ok"],
                len(lines),
                counts,
                self.poll_interval,
                waited,
                self.settle_seconds,
            )
            await asyncio.sleep(self.poll_interval)


def _error(err: Exception, *, retryable: bool) -> TriggerEvent:
    return TriggerEvent(
        {
            "status": "error",
            "retryable": retryable,
            "error": type(err).__name__,
            "message": str(err),
            "details": getattr(err, "details", {}),
        }
    )
