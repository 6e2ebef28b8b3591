"""The customers' billing periods for a task: Stripe through the task's hook, the subscriptions
table through its ledger's connection."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow_provider_stripe_meter.utils.clock import SYSTEM

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.billing.periods import PeriodBook
    from airflow_provider_stripe_meter.billing.ports import Log
    from airflow_provider_stripe_meter.hooks.stripe import StripeHook
    from airflow_provider_stripe_meter.ledger.store import SqlLedger


def read_billing_periods(
    hook: StripeHook,
    ledger: SqlLedger,
    event_name: str | None,
    *,
    account: str,
    log: Log,
    billing_periods: str = "hold",
    defer: bool = False,
) -> PeriodBook:
    """The periods of the meter of ``event_name`` (``None``: of every active meter) on ``account``,
    read through ``hook`` and logged to ``log``; ``billing_periods``: the task's setting, named
    when the key may not read them.

    With ``defer`` the subscriptions table is written by the book's ``save()``, later.
    """
    import time

    from airflow_provider_stripe_meter.billing.period_sync import read_periods
    from airflow_provider_stripe_meter.ledger.subscriptions import SubscriptionCache
    from airflow_provider_stripe_meter.utils.aggregation import DEFAULT_SAFETY_MARGIN
    from airflow_provider_stripe_meter.utils.rules import PAST_WINDOW

    started = time.monotonic()
    now = int(SYSTEM.now())
    # Periods reaching back over every day Stripe still takes usage for (and one more).
    since = now - int((PAST_WINDOW - DEFAULT_SAFETY_MARGIN).total_seconds()) - 86400
    from concurrent.futures import ThreadPoolExecutor

    from airflow_provider_stripe_meter.exceptions import StripeConfigurationError

    with ThreadPoolExecutor(max_workers=1) as pool:
        # The metered prices are listed while the meters are: neither request needs the other.
        listed = pool.submit(hook.metered_prices, None)
        if event_name:
            meters = {event_name: hook.active_meter(event_name)["id"]}
        else:
            meters = {
                name: found[0]["id"]
                for name, found in hook.meters_by_event_name().items()
                if found and found[0].get("status") == "active"
            }
    try:
        ids = set(meters.values())
        prices = [p for p in listed.result() if p["recurring"]["meter"] in ids]
        periods, figures = read_periods(
            hook,
            SubscriptionCache(ledger),
            meters,
            account,
            since,
            now,
            defer=defer,
            prices=prices,
        )
    except StripeConfigurationError as err:
        # A restricted key made for meter events alone: say what the periods need, and the way out.
        raise StripeConfigurationError(
            f"Reading billing periods (billing_periods={billing_periods!r}) "
            "needs the key to read Prices, Subscriptions, Invoices and Events: grant them, or set "
            f"billing_periods='off' to bill by UTC day alone. {err}",
            err.details,
        ) from err
    periods.read_seconds = round(time.monotonic() - started, 3)
    periods.read_figures = figures
    if not periods.metered:
        # Said plainly for a billing reader: with no metered price there are no invoices to split for.
        unpriced = sorted(meters)
        log.info(
            "Billing periods: %s %s no metered price, so usage is billed by UTC day (%.1f s)",
            ", ".join(unpriced) or "no active meter",
            "have" if len(unpriced) > 1 else "has",
            periods.read_seconds,
        )
        return periods
    log.info(
        "Billing periods: %d customers subscribed on %s (subscriptions listed %d, changes read %d, "
        "kept %d; %.1f s); a day in which a customer's billing period ends is billed in two pieces, "
        "one on each invoice",
        len(periods.customers),
        ", ".join(sorted(periods.metered)),
        figures["listed"],
        figures["changes"],
        figures["cached"],
        periods.read_seconds,
    )
    return periods
