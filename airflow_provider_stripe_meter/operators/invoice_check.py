"""Operator that compares each open invoice's metered quantity with the source, before it locks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.ledger.schema import DEFAULT_TABLE, check_table_name
from airflow_provider_stripe_meter.operators.base import StripeBaseOperator, StripeUsageSourceOperator
from airflow_provider_stripe_meter.utils.rules import check_fixed_event_name

if TYPE_CHECKING:
    from airflow.sdk import Context


class StripeMeterInvoiceCheckOperator(StripeUsageSourceOperator):
    """
    Compare what each customer's draft and upcoming invoice bills for a meter with the source.

    Reads the customers' billing periods (as the batch operator does: the metered prices on the
    meter, their subscriptions, the draft invoices), aggregates the source in parts at the
    period boundaries, and folds it per (customer, period) by the meter's formula. Against it:
    each **draft** invoice's metered line (a period that ended and has not finalized; its
    deadline is ``automatically_finalizes_at``) and each **upcoming** invoice
    (``POST /v1/invoices/create_preview``, one request per customer with usage in the open
    period; its deadline is the period's end). Final invoices are past changing and not read.

    Returns ``success`` (every invoice matches), ``counts`` (``ok``, ``differs``), ``lines`` (the
    invoices that differ first, at most ``line_limit``: customer, period, status, source, invoice,
    difference, deadline), ``at_risk`` (the differing ones, the nearest deadline first, at most
    ``line_limit``) and ``lines_total``. Branch on ``success`` to the batch operator (run it again
    before the deadline) or to an alert.

    .. seealso:: https://docs.stripe.com/api/invoices/create_preview
    .. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/configure-grace-period

    :param event_name: The meter's event name. (templated)
    :param ledger_conn_id: The batch operator's ledger database (default ``sql_conn_id``;
        required with ``rows=``), where the meter's subscriptions are kept between runs.
    :param ledger_table: The ledger's table (default ``stripe_meter_ledger``).
    :param line_limit: Lines kept in the result (it is an XCom: a row of Airflow's database).

    The source parameters are those of
    :class:`~airflow_provider_stripe_meter.operators.base.StripeUsageSourceOperator`;
    ``stripe_conn_id`` and ``stripe_account`` (templated) those of
    :class:`~airflow_provider_stripe_meter.operators.base.StripeBaseOperator`.
    """

    template_fields: Sequence[str] = (
        "event_name",
        *StripeUsageSourceOperator.source_template_fields,
        *StripeBaseOperator.template_fields,
    )

    def __init__(
        self,
        *,
        event_name: str,
        ledger_conn_id: str | None = None,
        ledger_table: str = DEFAULT_TABLE,
        line_limit: int = 1_000,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_fixed_event_name(event_name)
        self.event_name = event_name
        ledger_conn = ledger_conn_id or self.sql_conn_id
        if not ledger_conn:
            raise ValueError(
                "ledger_conn_id is required with rows=: the meter's subscriptions are kept beside the "
                "batch operator's ledger; with sql= it defaults to sql_conn_id"
            )
        self.ledger_conn_id: str = ledger_conn
        self.ledger_table = check_table_name(ledger_table)
        self.line_limit = line_limit

    def execute(self, context: Context) -> dict[str, Any]:
        """Read periods, source and invoices; compare per customer and period."""
        from airflow_provider_stripe_meter.billing.invoices import (
            compare,
            draft_lines,
            metered_quantity,
            source_per_period,
        )
        from airflow_provider_stripe_meter.billing.meters import meter_spec
        from airflow_provider_stripe_meter.exceptions import raised_for_airflow
        from airflow_provider_stripe_meter.state.ledger import ledger_on
        from airflow_provider_stripe_meter.state.periods import read_billing_periods

        meter = self.hook.active_meter(self.event_name)
        with raised_for_airflow():
            spec = meter_spec(meter)
        ledger = ledger_on(self.ledger_conn_id, self.ledger_table)
        try:
            periods = read_billing_periods(
                self.hook, ledger, self.event_name, account=self.billed_account() or "platform", log=self.log
            )
        finally:
            ledger.close()
        aggregator = self.read_usage(self.event_name, split=periods.split())
        source = source_per_period(aggregator.finish(), spec, periods)

        price_ids = periods.prices()
        invoices: dict[tuple[str, int, int], tuple[str, int | None, int | None]] = {}
        # A period's draft is made at its end or later: drafts older than the source's first
        # period end are not listed.
        first_end = min((key[2] for key in source), default=None)
        for invoice in self.hook.draft_invoices(first_end - first_end % 86400 if first_end else None):
            # Each draft by the service period of its metered lines (every line read, however many);
            # a draft of another kind has none and is passed over.
            locks = invoice.get("automatically_finalizes_at")
            for key, quantity in draft_lines(invoice, price_ids).items():
                invoices[key] = ("draft", quantity, int(locks) if locks is not None else None)
        # The open period: a preview per customer with usage in it (one request each).
        for key in sorted(source):
            customer, start, end = key
            period = periods.open_period(self.event_name, customer)
            if period is None or (period.start, period.end) != (start, end):
                continue
            preview = self.hook.invoice_preview(period.subscription)
            if preview is not None:
                invoices[key] = ("upcoming", metered_quantity(preview, price_ids), end)
        lines = compare(source, invoices)
        differs = [line for line in lines if line.difference]
        # A draft finalized by hand has no deadline: listed first, as it may lock at any moment.
        at_risk = sorted(differs, key=lambda line: line.deadline if line.deadline is not None else -1)
        shown = (differs + [line for line in lines if not line.difference])[: self.line_limit]
        result = {
            "success": not differs,
            "event_name": self.event_name,
            "meter_id": meter["id"],
            "counts": {"ok": len(lines) - len(differs), "differs": len(differs)},
            "lines": [line.to_dict() for line in shown],
            "at_risk": [line.to_dict() for line in at_risk[: self.line_limit]],
            "lines_total": len(lines),
        }
        for line in at_risk[:20]:
            self.log.warning(
                "Invoice of %s for %s..%s (%s) bills %s, the source %s: fix before %s",
                line.customer_id,
                line.period_start,
                line.period_end,
                line.status,
                line.invoice,
                line.source,
                line.deadline if line.deadline is not None else "it is finalized by hand (auto_advance off)",
            )
        self.log.info("Invoices compared: %s", result["counts"])
        return result
