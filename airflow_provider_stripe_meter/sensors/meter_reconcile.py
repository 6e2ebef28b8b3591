"""Sensor that reconciles the source's usage with Stripe's meter event summaries."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from airflow_provider_stripe_meter.aggregation import DEFAULT_SAFETY_MARGIN
from airflow_provider_stripe_meter.rules import check_fixed_event_name
from airflow_provider_stripe_meter.sources import check_source

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_stripe_meter.hooks.stripe import StripeHook

_DAY = 86400
_SHOWN_MISMATCHES = 50


class StripeMeterReconcileSensor(BaseSensorOperator):
    """
    Wait until Stripe's meter summaries agree with the source, per customer and UTC day.

    The source (``rows`` or ``sql``, read and aggregated exactly as the batch operator does) says
    what each customer used; ``GET /v1/billing/meters/{id}/event_summaries`` with
    ``value_grouping_window=day`` says what Stripe recorded. Stripe's summaries are eventually
    consistent, so a mismatch is re-checked every ``poke_interval`` until ``settle_timeout``;
    in the default ``reschedule`` mode the task gives its worker slot back between checks.

    Finishes (never fails for a mismatch) with ``success`` and a per-customer, per-day table,
    each key also its own XCom: ``lines`` (customer_id, day, expected, recorded, difference,
    status), ``counts`` per status (``ok``, ``missing``, ``short``, ``over``,
    ``customer_unknown``), totals, ``meter_id``. Branch on ``counts`` to a correction
    (:class:`~airflow_provider_stripe_meter.operators.meter_event_correction.StripeMeterTopUpOperator`)
    or an alert.

    .. seealso:: https://docs.stripe.com/api/billing/meter-event-summary/list

    :param event_name: The meter's event name. (templated)
    :param rows: Source rows ``(customer_id, value, timestamp)``, as for the batch operator. (templated)
    :param sql: Query returning the source rows, run on ``sql_conn_id``. (templated)
    :param sql_conn_id: Connection of any common-sql hook.
    :param parameters: Query parameters. (templated)
    :param start_date: First UTC day to compare (ISO date); default the source's first. (templated)
    :param end_date: Last UTC day to compare (ISO date); default the source's last. (templated)
    :param settle_timeout: How long mismatches may be waited out as Stripe catching up: a
        ``timedelta`` or seconds. (templated)
    :param max_rps: Summary requests per second (one per customer).
    :param stripe_conn_id: Airflow connection of type ``stripe``.
    :param stripe_account: Connected account (``acct_...``). (templated)
    """

    template_fields: Sequence[str] = (
        "event_name",
        "rows",
        "sql",
        "parameters",
        "start_date_text",
        "end_date_text",
        "settle_timeout",
        "stripe_account",
    )
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers: ClassVar[dict[str, str]] = {"sql": "sql", "parameters": "json"}
    ui_color = "#635bff"

    def __init__(
        self,
        *,
        event_name: str,
        rows: Any = None,
        sql: str | None = None,
        sql_conn_id: str | None = None,
        parameters: Any = None,
        columns: Sequence[str] = ("customer_id", "value", "timestamp"),
        start_date: str | None = None,
        end_date: str | None = None,
        settle_timeout: timedelta | float | str = timedelta(hours=1),
        naive_timezone: Any = timezone.utc,
        safety_margin: timedelta = DEFAULT_SAFETY_MARGIN,
        max_rps: float = 20.0,
        stripe_conn_id: str = "stripe_default",
        stripe_account: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("mode", "reschedule")
        kwargs.setdefault("poke_interval", 300)
        if not isinstance(settle_timeout, str):
            kwargs.setdefault("timeout", _seconds(settle_timeout) + 3600)
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)
        check_source(rows, sql, sql_conn_id)
        check_fixed_event_name(event_name)
        self.event_name = event_name
        self.rows = rows
        self.sql = sql
        self.sql_conn_id = sql_conn_id
        self.parameters = parameters
        self.columns = tuple(columns)
        # BaseOperator owns start_date/end_date; these are the compared days.
        self.start_date_text = start_date
        self.end_date_text = end_date
        self.settle_timeout = settle_timeout
        self.naive_timezone = naive_timezone
        self.safety_margin = safety_margin
        self.max_rps = max_rps
        self.stripe_conn_id = stripe_conn_id
        self.stripe_account = stripe_account
        self._first_poke: float | None = None

    def poke(self, context: Context) -> PokeReturnValue | bool:
        """Compare once; done when everything matches or the settle time is over."""
        from airflow_provider_stripe_meter.hooks.stripe import StripeHook
        from airflow_provider_stripe_meter.reconcile import compare, summarize
        from airflow_provider_stripe_meter.sources import aggregate_usage

        aggregator = aggregate_usage(
            rows=self.rows,
            sql=self.sql,
            sql_conn_id=self.sql_conn_id,
            parameters=self.parameters,
            event_name=self.event_name,
            columns=self.columns[:3],
            naive_timezone=self.naive_timezone,
            safety_margin=self.safety_margin,
            sample_limit=20,
            log=self.log,
        )
        expected = {(a.customer_id, a.day): (a.value, a.timestamp) for a in aggregator.aggregates()}
        first, last = self._day_range(expected)
        hook = StripeHook(self.stripe_conn_id, stripe_account=self.stripe_account or None)
        meter = hook.active_meter(self.event_name)
        customers = sorted({customer for customer, _ in expected})
        recorded, unknown = self._recorded(hook, meter["id"], customers, first, last)
        lines = compare(
            {k: v for k, v in expected.items() if first <= k[1] <= last},
            {k: v for k, v in recorded.items() if first <= k[1] <= last},
            unknown,
        )
        counts = summarize(lines)
        settled = counts["ok"] + counts["customer_unknown"] == len(lines)
        first_poke = self._first_poke_time(context)
        waited = max(0.0, time.time() - first_poke)
        settle = _seconds(self.settle_timeout)
        if not settled and waited < settle:
            self.log.info(
                "%d of %d customer-days differ from Stripe's summaries (%s); Stripe's summaries are "
                "eventually consistent, checking again (waited %.0f s of %.0f s)",
                len(lines) - counts["ok"],
                len(lines),
                counts,
                waited,
                settle,
            )
            return False
        report = {
            "success": counts["ok"] == len(lines),
            "event_name": self.event_name,
            "meter_id": meter["id"],
            "counts": counts,
            "expected": sum(line.expected for line in lines),
            "recorded": sum(line.recorded or 0 for line in lines),
            "difference": sum(line.difference for line in lines),
            "lines": [line.to_dict() for line in lines],
            "skipped_rows": dict(aggregator.problems.counts),
            "waited_seconds": round(waited, 1),
        }
        self._log_report(report)
        return PokeReturnValue(is_done=True, xcom_value=report)

    def _first_poke_time(self, context: Context) -> float:
        if self.reschedule:
            first = context["ti"].get_first_reschedule_date(context)
            if first is not None:
                return first.timestamp()
        if self._first_poke is None:
            self._first_poke = time.time()
        return self._first_poke

    def _day_range(self, expected: dict[tuple[str, date], Any]) -> tuple[date, date]:
        days = sorted(day for _, day in expected)
        today = datetime.now(timezone.utc).date()
        first = (
            date.fromisoformat(self.start_date_text) if self.start_date_text else (days[0] if days else today)
        )
        last = date.fromisoformat(self.end_date_text) if self.end_date_text else (days[-1] if days else today)
        if last < first:
            raise ValueError(f"end_date {last} is before start_date {first}")
        return first, last

    def _recorded(
        self, hook: StripeHook, meter_id: str, customers: list[str], first: date, last: date
    ) -> tuple[dict[tuple[str, date], int], set[str]]:
        from airflow_provider_stripe_meter.delivery import RateLimiter
        from airflow_provider_stripe_meter.exceptions import StripeRequestRejected

        start = int(datetime(first.year, first.month, first.day, tzinfo=timezone.utc).timestamp())
        end = start + ((last - first).days + 1) * _DAY
        limiter = RateLimiter(self.max_rps)

        def one(customer: str) -> tuple[str, list[dict[str, Any]] | None]:
            limiter.acquire()
            try:
                return customer, hook.list_event_summaries(meter_id, customer, start, end, "day")
            except StripeRequestRejected as err:
                if err.details.get("http_status") == 404 and err.details.get("param") == "customer":
                    return customer, None
                raise

        recorded: dict[tuple[str, date], int] = {}
        unknown: set[str] = set()
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(customers)))) as pool:
            for customer, summaries in pool.map(one, customers):
                if summaries is None:
                    unknown.add(customer)
                    continue
                for summary in summaries:
                    value = summary["aggregated_value"]
                    if value:
                        day = datetime.fromtimestamp(summary["start_time"], timezone.utc).date()
                        # Summaries are numbers (floats in JSON); meter values are whole numbers.
                        recorded[(customer, day)] = recorded.get((customer, day), 0) + round(value)
        return recorded, unknown

    def _log_report(self, report: dict[str, Any]) -> None:
        if report["success"]:
            self.log.info(
                "Stripe agrees with the source: %d customer-days, %d units",
                len(report["lines"]),
                report["expected"],
            )
            return
        mismatches = [line for line in report["lines"] if line["status"] != "ok"]
        self.log.warning(
            "Stripe's meter %s (%s) disagrees with the source on %d customer-days (%s); "
            "expected %d, recorded %d, difference %d:",
            report["meter_id"],
            report["event_name"],
            len(mismatches),
            report["counts"],
            report["expected"],
            report["recorded"],
            report["difference"],
        )
        for line in mismatches[:_SHOWN_MISMATCHES]:
            self.log.warning(
                "  %-16s %s %-28s expected %d recorded %s difference %d",
                line["status"],
                line["day"],
                line["customer_id"],
                line["expected"],
                line["recorded"],
                line["difference"],
            )
        if len(mismatches) > _SHOWN_MISMATCHES:
            self.log.warning("  ... and %d more in the lines XCom", len(mismatches) - _SHOWN_MISMATCHES)


def _seconds(value: timedelta | float | str) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"settle_timeout must be a timedelta or seconds, got {value!r}") from None
