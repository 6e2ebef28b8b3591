"""The run's figures as Airflow metrics (StatsD, Datadog or OpenTelemetry, as Airflow is set up).

Every name starts with ``stripe_meter.`` and every figure is tagged with the meter's event name
(``meter``), the Stripe account billed (``account``: the connected account, or ``platform``) and
the task (``dag_id``, ``task_id``). The instances of a mapped task share the task's tags and
differ by account, so a platform mapping over its connected accounts sees each account's series,
and the task's total is their sum. A team can alert on, say,
``stripe_meter.skipped_too_old > 0`` without reading logs. Counters are sent even when zero, so
each series exists from the first run; a failed batch run sends its figures before it fails, a
dry run sends none. Airflow's ``[metrics]`` section decides where they go
(``statsd_on``, ``statsd_datadog_enabled``, ``otel_on``; tags reach plain StatsD with
``statsd_influxdb_enabled``); with metrics off they cost nothing.

Counters, per meter (customer-days unless named otherwise; the single-event operator counts its
one event, the top-up operator its corrections):

* ``sent``, ``already_recorded``, ``rejected``, ``failed``, ``over``, ``customer_unknown``,
  ``billed_late``: what became of each customer-day;
* ``skipped_too_old``, ``skipped_future``, ``invalid``: source rows left out, by reason;
* ``invoice_final``, ``subscription_ended``, ``no_invoice``: customer-day parts held because no
  open invoice will carry them (see the batch operator's ``billing_periods``);
* ``events_sent``, ``requests``, ``rate_limited`` (429s): meter events and HTTP requests;

the timer ``delivery``: time spent delivering events (milliseconds, as StatsD times are); and,
from the reconcile sensor, ``reconcile.<status>`` (``ok``, ``missing``, ``short``, ``over``,
``customer_unknown``): customer-days per status when it finishes.

.. seealso:: https://airflow.apache.org/docs/apache-airflow/stable/administration-and-deployment/logging-monitoring/metrics.html
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from airflow_provider_stripe_meter.billing.outcomes import METRIC_OUTCOMES

PREFIX = "stripe_meter"
DAY_COUNTERS = tuple(outcome.value for outcome in METRIC_OUTCOMES)
ROW_COUNTERS = ("skipped_too_old", "skipped_future", "invalid")
#: Customer-day parts held because no open invoice carries them (run-wide).
INVOICE_COUNTERS = ("invoice_final", "subscription_ended", "no_invoice")
REQUEST_COUNTERS = ("events_sent", "requests", "rate_limited")
#: The meter tag of run-wide figures (rows, requests) of a batch that billed several meters.
SEVERAL_METERS = "several"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
log = logging.getLogger(__name__)


def _stats() -> Any:
    """Airflow's metrics facade, wherever this Airflow version keeps it (common-compat knows)."""
    from airflow.providers.common.compat.sdk import Stats

    return Stats


def _tag(value: Any) -> str:
    # StatsD line formats split on ',', ':', '|' and '='; event names may hold other characters.
    return _UNSAFE.sub("_", str(value))


class MeterMetrics:
    """Sends one task's figures, tagged with the task and, per figure, the meter."""

    def __init__(self, dag_id: str, task_id: str, account: str | None = None) -> None:
        self.task_tags = {
            "dag_id": _tag(dag_id),
            "task_id": _tag(task_id),
            "account": _tag(account or "platform"),
        }
        self.stats = _stats()

    @classmethod
    def for_task(cls, context: Mapping[str, Any], account: str | None) -> MeterMetrics:
        """The metrics of the task instance in ``context``, billing ``account`` (``None``: the platform)."""
        ti = context["ti"]
        return cls(ti.dag_id, ti.task_id, account)

    def _tags(self, meter: str) -> dict[str, str]:
        return {**self.task_tags, "meter": _tag(meter)}

    def count(self, name: str, value: int, meter: str) -> None:
        """Add ``value`` to the counter ``stripe_meter.<name>`` of ``meter``."""
        try:
            self.stats.incr(f"{PREFIX}.{name}", int(value), tags=self._tags(meter))
        except Exception:  # a metrics backend's trouble must never fail a billing task
            log.warning("Could not send metric %s.%s", PREFIX, name, exc_info=True)

    def time(self, name: str, seconds: float, meter: str) -> None:
        """Record ``seconds`` on the timer ``stripe_meter.<name>`` of ``meter``."""
        try:
            self.stats.timing(f"{PREFIX}.{name}", timedelta(seconds=seconds), tags=self._tags(meter))
        except Exception:  # a metrics backend's trouble must never fail a billing task
            log.warning("Could not send metric %s.%s", PREFIX, name, exc_info=True)

    def batch(self, outcome: Mapping[str, Any], meters: Iterable[str]) -> None:
        """A batch run's figures: per meter from ``outcome["by_meter"]``, the rest run-wide.

        Run-wide figures (rows, requests, delivery time) carry the meter's name when the batch
        billed one meter, and :data:`SEVERAL_METERS` when it billed more.
        """
        names = sorted(meters)
        for meter in names:
            counts = outcome.get("by_meter", {}).get(meter, {})
            for name in DAY_COUNTERS:
                self.count(name, counts.get(name, 0), meter)
        run_meter = names[0] if len(names) == 1 else SEVERAL_METERS
        for name in (*ROW_COUNTERS, *INVOICE_COUNTERS, *REQUEST_COUNTERS):
            self.count(name, outcome.get(name, 0), run_meter)
        self.time("delivery", outcome.get("seconds", 0.0), run_meter)

    def delivery(self, report: Any, meter: str) -> None:
        """A delivery of corrections (one event per customer-day): its counts, requests and time."""
        for name in ("sent", "already_recorded", "rejected", "failed"):
            self.count(name, getattr(report, name), meter)
        self.count("events_sent", report.sent, meter)
        self.count("requests", report.requests, meter)
        self.count("rate_limited", report.rate_limited, meter)
        self.time("delivery", report.seconds, meter)
