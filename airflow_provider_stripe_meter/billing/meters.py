"""What the billing core needs to know of a Stripe meter, and the meters it refuses.

Each meter falls in one of three kinds (:attr:`MeterSpec.kind`): ``add`` (a raw ``sum`` meter),
``count`` (a raw ``count`` meter) and ``set`` (the newest event decides: ``last``, or a
pre-aggregated ``day``/``hour`` window); see :mod:`.plans` for what each is sent.

.. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/meters/configure
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow_provider_stripe_meter.utils.errors import Unsupported

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.utils.aggregation import DailyAggregate

ADD, COUNT, SET = "add", "count", "set"


class MeterUnsupportedError(Unsupported, ValueError):
    """The meter's settings cannot be billed exactly from daily aggregates."""


@dataclass(frozen=True)
class MeterSpec:
    """What the batch operator needs to know of a Stripe meter."""

    event_name: str
    meter_id: str
    formula: str = "sum"
    event_time_window: str | None = None
    customer_key: str = "stripe_customer_id"
    value_key: str = "value"

    @property
    def payload_keys(self) -> dict[str, str]:
        """The hook's payload key arguments for this meter."""
        return {"customer_payload_key": self.customer_key, "value_payload_key": self.value_key}

    @cached_property
    def kind(self) -> str:
        """``add``, ``count`` or ``set``: how Stripe turns events into the day's figure."""
        if self.event_time_window is not None or self.formula == "last":
            return SET
        return COUNT if self.formula == "count" else ADD


def meter_spec(
    meter: Mapping[str, Any], *, customer_key: str | None = None, value_key: str | None = None
) -> MeterSpec:
    """Read a ``billing.meter`` object; refuse settings that cannot be billed exactly.

    :raises MeterUnsupportedError: names the meter, the setting and what to do instead.
    """
    formula = (meter.get("default_aggregation") or {}).get("formula") or "sum"
    window = meter.get("event_time_window") or None
    name, meter_id = meter["event_name"], meter["id"]
    if formula not in ("sum", "count", "last"):
        raise MeterUnsupportedError(
            f"meter {meter_id} ({name!r}) aggregates by {formula!r}: only sum, count and last are known"
        )
    if window not in (None, "day", "hour"):
        raise MeterUnsupportedError(f"meter {meter_id} ({name!r}) has event_time_window {window!r}")
    if formula == "count" and window is not None:
        raise MeterUnsupportedError(
            f"meter {meter_id} ({name!r}) counts events but is pre-aggregated (event_time_window="
            f"{window!r}): Stripe keeps one event per {window}, so a count of rows cannot be billed. "
            "Use a raw count meter, or a sum meter with the rows counted in SQL."
        )
    if formula == "sum" and window == "hour":
        raise MeterUnsupportedError(
            f"meter {meter_id} ({name!r}) sums pre-aggregated hourly windows (event_time_window='hour'): "
            "Stripe keeps the newest event of each hour, so a daily total sent again in another hour "
            "would count twice. Use a raw sum meter or a day-window meter."
        )
    return MeterSpec(
        event_name=name,
        meter_id=meter_id,
        formula=formula,
        event_time_window=window,
        customer_key=customer_key
        or (meter.get("customer_mapping") or {}).get("event_payload_key")
        or "stripe_customer_id",
        value_key=value_key or (meter.get("value_settings") or {}).get("event_payload_key") or "value",
    )


def source_figure(aggregate: DailyAggregate, spec: MeterSpec) -> int:
    """The day's figure as the meter computes it: the sum, the number of rows, or the latest value."""
    if spec.formula == "count":
        return aggregate.rows
    if spec.formula == "last":
        return aggregate.last_value
    return aggregate.value
