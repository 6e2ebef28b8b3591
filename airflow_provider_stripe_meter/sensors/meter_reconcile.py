"""Sensor that reconciles the source's usage with Stripe's meter event summaries."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseSensorOperator, PokeReturnValue, conf

from airflow_provider_stripe_meter.billing import reconcile
from airflow_provider_stripe_meter.ledger.schema import DEFAULT_TABLE, check_table_name
from airflow_provider_stripe_meter.metrics import MeterMetrics
from airflow_provider_stripe_meter.operators.base import StripeBaseOperator, StripeUsageSourceOperator
from airflow_provider_stripe_meter.utils import paced_reads
from airflow_provider_stripe_meter.utils.rules import check_fixed_event_name

if TYPE_CHECKING:
    from airflow.sdk import Context

_SHOWN_MISMATCHES = 50
#: Customer-days (and customers) handed to the triggerer in its arguments at most (about 300 KB).
INLINE_EXPECTATION = 5_000


class StripeMeterReconcileSensor(StripeUsageSourceOperator, BaseSensorOperator):
    """
    Wait until Stripe's meter summaries agree with the source, per customer and UTC day.

    The source (``rows`` or ``sql``, read and aggregated exactly as the batch operator does) says
    what each customer used; ``GET /v1/billing/meters/{id}/event_summaries`` with
    ``value_grouping_window=day`` says what Stripe recorded. Stripe's summaries are eventually
    consistent, so a mismatch is re-checked every ``poke_interval`` until ``settle_timeout``;
    in the default ``reschedule`` mode the task gives its worker slot back between checks, and
    with ``deferrable=True`` it waits in the triggerer instead.

    Finishes (never fails for a mismatch) with ``success``, each key also its own XCom:
    ``counts`` per status (``ok``, ``missing``, ``short``, ``over``, ``customer_unknown``),
    totals, ``meter_id``, and ``lines`` (customer_id, day, expected, recorded, difference,
    status): at most ``line_limit`` of them, those that differ first, so the result stays small
    at any number of customers (``lines_total``, ``lines_truncated``). The full table, a line per
    customer-day, goes to ``report_path`` when one is named (its URL in ``lines_uri``). When
    something differs, ``stripe_errors`` holds Stripe's own error reports for the meter since the
    first day (``v1.billing.meter.error_report_triggered``: errors per code and a few samples),
    and a line whose customer a sample names carries that code as ``stripe_error``. Branch on
    ``counts`` to a correction
    (:class:`~airflow_provider_stripe_meter.operators.meter_event_correction.StripeMeterTopUpOperator`)
    or an alert.

    .. seealso:: https://docs.stripe.com/api/billing/meter-event-summary/list

    :param event_name: The meter's event name. (templated)
    :param first_day: First UTC day to compare (ISO date); default the source's first. (templated)
    :param last_day: Last UTC day to compare (ISO date); default the source's last. (templated)
    :param settle_timeout: How long mismatches may be waited out as Stripe catching up: a
        ``timedelta`` or seconds. (templated)
    :param max_rps: Summary requests per second (one per customer).
    :param report_path: Where to write the full table, a JSON line per customer-day: an Airflow
        object storage URL (``file:///...``, ``s3://conn_id@bucket/key``, ...). Also where a
        deferred sensor hands the triggerer what the source says once that is too large for
        the trigger's arguments (more than 5,000 customer-days); without it, such a sensor
        waits in ``reschedule`` mode instead. (templated)
    :param line_limit: Lines kept in the result, those that differ first.
    :param ledger_conn_id: The batch operator's ledger (default ``sql_conn_id``; ``None`` with
        ``rows=`` reads no ledger). Usage older than Stripe's window that it billed late
        (``too_old="bill_at_oldest"``) landed on a day inside the window: that day is expected
        to hold it too, and ``billed_late`` gives its units.
    :param ledger_table: The ledger's table (default ``stripe_meter_ledger``).
    :param deferrable: Read the source on the worker, then wait in the triggerer
        (:class:`~airflow_provider_stripe_meter.triggers.meter_reconcile.StripeMeterReconcileTrigger`
        polls the summaries asynchronously every ``poke_interval``), holding no worker slot at
        all. The result is the same as in ``reschedule`` mode. Default: Airflow's
        ``[operators] default_deferrable``.

    The source parameters (``rows``, ``sql``, ``sql_conn_id``, ``parameters``, ``columns``,
    ``naive_timezone``, ``safety_margin``, ``chunk_size``, ``sample_limit``) are those of
    :class:`~airflow_provider_stripe_meter.operators.base.StripeUsageSourceOperator`, read by the same
    rules as the batch operator; ``stripe_conn_id`` and ``stripe_account`` (templated) those of
    :class:`~airflow_provider_stripe_meter.operators.base.StripeBaseOperator`.
    """

    template_fields: Sequence[str] = (
        "event_name",
        *StripeUsageSourceOperator.source_template_fields,
        "first_day",
        "last_day",
        "settle_timeout",
        "report_path",
        *StripeBaseOperator.template_fields,
    )

    def __init__(
        self,
        *,
        event_name: str,
        first_day: str | None = None,
        last_day: str | None = None,
        settle_timeout: timedelta | float | str = timedelta(hours=1),
        max_rps: float = 20.0,
        report_path: str | None = None,
        line_limit: int = reconcile.DEFAULT_LINE_LIMIT,
        ledger_conn_id: str | None = None,
        ledger_table: str = DEFAULT_TABLE,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("mode", "reschedule")
        kwargs.setdefault("poke_interval", 300)
        if not isinstance(settle_timeout, str):
            kwargs.setdefault("timeout", _seconds(settle_timeout) + 3600)
        super().__init__(**kwargs)
        check_fixed_event_name(event_name)
        self.event_name = event_name
        self.first_day = first_day
        self.last_day = last_day
        self.settle_timeout = settle_timeout
        self.max_rps = max_rps
        self.report_path = report_path
        self.line_limit = line_limit
        self.ledger_conn_id = ledger_conn_id or self.sql_conn_id
        self.ledger_table = check_table_name(ledger_table)
        self.deferrable = deferrable
        self._first_poke: float | None = None

    def execute(self, context: Context) -> Any:
        """Poke (``poke``/``reschedule`` mode), or read the source here and defer the waiting."""
        if not self.deferrable:
            return super().execute(context)
        from airflow_provider_stripe_meter.triggers.meter_reconcile import StripeMeterReconcileTrigger

        wanted = self._expectation()
        expectation: dict[str, Any] | None = wanted.to_json()
        expectation_uri = None
        if len(wanted.expected) + len(wanted.customers) > INLINE_EXPECTATION:
            # Trigger arguments are a row in Airflow's metadata database: a table this size goes
            # to the user's storage, and the triggerer reads it from there.
            if not self.report_path:
                self.log.warning(
                    "%d customer-days are too many to hand the triggerer in its arguments (a row of "
                    "Airflow's metadata database); name a report_path on storage the triggerer can "
                    "read to defer. Waiting in reschedule mode on the worker instead.",
                    len(wanted.expected),
                )
                return super().execute(context)
            from airflow_provider_stripe_meter.state.reports import write_json

            expectation_uri = write_json(f"{self.report_path}.expected.json", expectation)
            expectation = None
        self.log.info(
            "Deferring: the triggerer compares %d customer-days of meter %s with Stripe's summaries",
            len(wanted.expected),
            wanted.meter_id,
        )
        self.defer(
            trigger=StripeMeterReconcileTrigger(
                stripe_conn_id=self.stripe_conn_id,
                stripe_account=self.stripe_account or None,
                event_name=self.event_name,
                expectation=expectation,
                expectation_uri=expectation_uri,
                report_path=self.report_path,
                line_limit=self.line_limit,
                started=reconcile.clock(),
                settle_seconds=_seconds(self.settle_timeout),
                poll_interval=float(self.poke_interval),
                max_rps=self.max_rps,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout)),
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Finish with the trigger's report, exactly as a poke that found the answer does."""
        if event.get("status") != "done":
            from airflow_provider_stripe_meter import exceptions

            error = getattr(exceptions, str(event.get("error")), None)
            if not (isinstance(error, type) and issubclass(error, exceptions.StripeMeterError)):
                # Unknown to this release: keep only whether a retry can help.
                error = (
                    exceptions.StripeTransientError
                    if event.get("retryable")
                    else exceptions.StripeRequestRejectedError
                )
            raise error(f"Reconciliation could not read Stripe: {event.get('message')}", event.get("details"))
        # A resumed task is a new process: name the meter for the extra link from the report.
        self.linked_meter_id = event["report"]["meter_id"]
        self.hook  # noqa: B018 (built here so the link knows the key's mode and the account)
        report = event["report"]
        # The triggerer read Stripe; the ledger is read here, as a poke reads it.
        shown = [reconcile.ReconcileLine(**line) for line in report.get("lines") or []]
        report["lines"] = [line.to_dict() for line in self._explain(report["meter_id"], shown)]
        self._mark_dropped(report["meter_id"], report["lines"])
        return self._finish(context, report)

    def _explain(self, meter_id: str, lines: list[reconcile.ReconcileLine]) -> list[reconcile.ReconcileLine]:
        """Each line with the ledger's figure for its day and the cause of any difference.

        The ledger is folded per day the events were stamped in, by the meter's formula, as
        Stripe's summaries are; a sensor without a ledger leaves the lines as they are.
        """
        if not self.ledger_conn_id or not lines:
            return lines
        from airflow_provider_stripe_meter.billing.meters import meter_spec
        from airflow_provider_stripe_meter.billing.settling import stripe_view
        from airflow_provider_stripe_meter.exceptions import raised_for_airflow
        from airflow_provider_stripe_meter.state.ledger import ledger_on
        from airflow_provider_stripe_meter.utils.days import day_end, day_of, day_start

        with raised_for_airflow():
            spec = meter_spec(self.hook.active_meter(self.event_name))
        days = [date.fromisoformat(line.day) for line in lines]
        ledger = ledger_on(self.ledger_conn_id, self.ledger_table)
        try:
            entries = ledger.entries_stamped(
                self.billed_account() or "platform",
                meter_id,
                None,
                day_start(min(days)),
                day_end(max(days)),
            )
        finally:
            ledger.close()
        by_day: dict[tuple[str, date], list[Any]] = {}
        for entry in entries:
            by_day.setdefault((entry.customer_id, day_of(entry.stamp)), []).append(entry)
        return [
            reconcile.explain(
                line, stripe_view(spec, by_day.get((line.customer_id, date.fromisoformat(line.day)), []))
            )
            for line in lines
        ]

    def _mark_dropped(self, meter_id: str, lines: list[dict[str, Any]]) -> int:
        """Mark in the ledger the events of customers Stripe does not know as ``dropped``.

        Stripe accepts such events and drops them; marked so, they are sent again by the batch
        operator's next run, once the customer exists in Stripe. Returns the rows marked.
        """
        keys = {
            (line["customer_id"], date.fromisoformat(line["day"]))
            for line in lines
            if line.get("status") == "customer_unknown"
        }
        if not keys or not self.ledger_conn_id:
            return 0
        from airflow_provider_stripe_meter.state.ledger import ledger_on, mark_dropped

        ledger = ledger_on(self.ledger_conn_id, self.ledger_table)
        try:
            marked = mark_dropped(
                ledger, self.billed_account() or "platform", meter_id, keys, "customer unknown to Stripe"
            )
        finally:
            ledger.close()
        if marked:
            self.log.info(
                "Marked %d ledger rows dropped: Stripe does not know their customers; the batch "
                "operator sends them again once it does",
                marked,
            )
        return marked

    def poke(self, context: Context) -> PokeReturnValue | bool:
        """Compare once; done when everything matches or the settle time is over."""
        wanted = self._expectation()
        recorded, unknown = paced_reads.recorded_per_day(
            self.hook, wanted.meter_id, wanted.customers, wanted.first, wanted.last, max_rps=self.max_rps
        )
        lines = wanted.compare(recorded, unknown)
        counts = reconcile.summarize(lines)
        first_poke = self._first_poke_time(context)
        waited = max(0.0, reconcile.clock() - first_poke)
        settle = _seconds(self.settle_timeout)
        if not reconcile.is_settled(counts) and waited < settle:
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
        from airflow_provider_stripe_meter.state.reports import write_report

        lines = self._explain(wanted.meter_id, lines)
        report = wanted.report(
            self.event_name,
            lines,
            waited,
            line_limit=self.line_limit,
            lines_uri=write_report(self.report_path, lines),
        )
        self._mark_dropped(wanted.meter_id, [line.to_dict() for line in lines])
        return PokeReturnValue(is_done=True, xcom_value=self._finish(context, report))

    def _expectation(self) -> reconcile.Expectation:
        """Read and aggregate the source; its figures by the meter's own formula, per customer-day."""
        from airflow_provider_stripe_meter.billing.meters import MeterSpec, source_figure

        aggregator = self.read_usage(self.event_name)
        meter = self.hook.active_meter(self.event_name)
        # The source's figure by the meter's own formula: the sum, the row count, or the latest value.
        formula = (meter.get("default_aggregation") or {}).get("formula") or "sum"
        spec = MeterSpec(self.event_name, meter["id"], formula=formula)
        expected: dict[tuple[str, date], tuple[int, int | None]] = {
            (a.customer_id, a.day): (source_figure(a, spec), a.timestamp) for a in aggregator.finish()
        }
        first, last = self._day_range(expected)
        customers = {customer for customer, _ in expected}
        # Stripe's figure of a day that late usage landed on includes it: so does the expectation.
        late = {k: v for k, v in self._billed_late(meter["id"], first, last).items() if k[0] in customers}
        for key, units in late.items():
            figure, timestamp = expected.get(key, (0, None))
            expected[key] = (figure + units, timestamp)
        return reconcile.Expectation(
            meter_id=meter["id"],
            expected={k: v for k, v in expected.items() if first <= k[1] <= last},
            first=first,
            last=last,
            customers=sorted(customers),
            skipped_rows=dict(aggregator.problems.counts),
            billed_late=sum(late.values()),
        )

    def _billed_late(self, meter_id: str, first: date, last: date) -> dict[tuple[str, date], int]:
        """Per customer-day of ``first``..``last``, the units the batch operator billed late onto it."""
        if not self.ledger_conn_id:
            return {}
        from airflow_provider_stripe_meter.state.ledger import ledger_on
        from airflow_provider_stripe_meter.utils.days import day_end, day_start

        ledger = ledger_on(self.ledger_conn_id, self.ledger_table)
        try:
            return ledger.landed_late(
                self.billed_account() or "platform", meter_id, day_start(first), day_end(last)
            )
        finally:
            ledger.close()

    def _finish(self, context: Context, report: dict[str, Any]) -> dict[str, Any]:
        report["stripe_errors"] = self._stripe_errors(report)
        self._log_report(report)
        metrics = MeterMetrics.for_task(context, self.billed_account())
        for status, count in report["counts"].items():
            metrics.count(f"reconcile.{status}", count, self.event_name)
        return report

    def _stripe_errors(self, report: dict[str, Any]) -> dict[str, Any] | None:
        """Stripe's own word on what it dropped, read only when something differs.

        The meter's error reports (``v1.billing.meter.error_report_triggered``) since the first
        compared day: counts per code and a few samples. A shown line whose customer a sample
        names gets that code as ``stripe_error``: the evidence behind ``customer_unknown`` and
        ``not_in_stripe``. Evidence only: nothing is re-sent on a sample's word, and a key that
        may not read events leaves it ``None`` without failing the check.
        """
        lines = report.get("lines") or []
        if report.get("success") or not lines:
            return None
        from airflow_provider_stripe_meter.exceptions import StripeMeterError

        first = min(date.fromisoformat(line["day"]) for line in lines)
        since = datetime(first.year, first.month, first.day, tzinfo=timezone.utc).timestamp()
        try:
            found = self.hook.meter_error_reports(report["meter_id"], since)
        except StripeMeterError as err:
            self.log.warning("Could not read Stripe's error reports for the meter: %s", err)
            return None
        for line in lines:
            if line.get("status") == "ok":
                continue
            named = [s["code"] for s in found["samples"] if line["customer_id"] in s["message"]]
            if named:
                line["stripe_error"] = named[0]
        return found

    def _first_poke_time(self, context: Context) -> float:
        if self.reschedule:
            first = context["ti"].get_first_reschedule_date(context)
            if first is not None:
                return first.timestamp()
        if self._first_poke is None:
            self._first_poke = reconcile.clock()
        return self._first_poke

    def _day_range(self, expected: dict[tuple[str, date], Any]) -> tuple[date, date]:
        days = sorted(day for _, day in expected)
        today = datetime.now(timezone.utc).date()
        first = date.fromisoformat(self.first_day) if self.first_day else (days[0] if days else today)
        last = date.fromisoformat(self.last_day) if self.last_day else (days[-1] if days else today)
        if last < first:
            raise ValueError(f"last_day {last} is before first_day {first}")
        return first, last

    def _log_report(self, report: dict[str, Any]) -> None:
        if report["success"]:
            self.log.info(
                "Stripe agrees with the source: %d customer-days, %d units",
                report["lines_total"],
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
        hidden = report["lines_total"] - report["counts"]["ok"] - min(len(mismatches), _SHOWN_MISMATCHES)
        if hidden > 0:
            where = report["lines_uri"] or "the lines XCom (up to line_limit)"
            self.log.warning("  ... and %d more in %s", hidden, where)


def _seconds(value: timedelta | float | str) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"settle_timeout must be a timedelta or seconds, got {value!r}") from None
