"""What the billing core needs of Stripe and of the state runs share, as interfaces.

The operator passes the Stripe hook through :class:`~.hook_port.HookStripe` (:class:`StripeMeters`),
the ledger (:class:`LedgerStore`) and the known-customers table (:class:`CustomerStore`); tests
may pass anything that behaves the same. Nothing here imports Airflow or ``stripe``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.ledger.entries import Change, DayFigure, Entry
    from airflow_provider_stripe_meter.utils.rules import MeterEvent


class StreamSession(Protocol):
    """A v2 meter event session: sends up to 100 events a request."""

    def send(self, events: list[dict[str, Any]]) -> Any: ...


class StripeMeters(Protocol):
    """The Stripe calls of a billing run (:class:`~.hook_port.HookStripe` over the hook; the
    in-process Stripe of :mod:`airflow_provider_stripe_meter.testing.inprocess` in tests)."""

    @property
    def livemode(self) -> bool: ...

    def active_meter(self, event_name: str) -> Mapping[str, Any]: ...

    def retrieve_meter(self, meter_id: str) -> Mapping[str, Any]: ...

    def recorded_per_day(
        self, meter_id: str, customers: list[str], first: date, last: date, *, max_rps: float
    ) -> tuple[dict[tuple[str, date], int], set[str]]: ...

    def usage_between(self, meter_id: str, customer: str, start: int, end: int) -> int | None: ...

    def create_meter_event(
        self,
        event: MeterEvent,
        *,
        customer_payload_key: str,
        value_payload_key: str,
        retry: bool = True,
        idempotency_key: str | None = None,
    ) -> Any: ...

    def meter_event_stream(self) -> StreamSession: ...

    def cancel_meter_event(self, event_name: str, identifier: str) -> Any: ...

    def customers_known(self, customers: Sequence[str], *, max_rps: float) -> set[str]: ...

    def customer_ids(self) -> set[str]: ...


class CustomerStore(Protocol):
    """The customers Stripe has shown to exist
    (:class:`~airflow_provider_stripe_meter.ledger.customers.CustomerTable`)."""

    def known(self, account: str, customers: Iterable[str]) -> set[str]: ...

    def every(self, account: str) -> set[str]: ...

    def add(self, account: str, customers: Iterable[str], seen_at: int) -> None: ...


class Log(Protocol):
    """Where a run says what it is doing (the task's logger)."""

    def info(self, msg: Any, /, *args: Any, **kwargs: Any) -> Any: ...

    def warning(self, msg: Any, /, *args: Any, **kwargs: Any) -> Any: ...


class LedgerStore(Protocol):
    """The billing ledger (:class:`~airflow_provider_stripe_meter.ledger.store.SqlLedger`)."""

    def figures(
        self, account: str, meter_id: str, first: date, last: date, *, newest: bool = False
    ) -> dict[tuple[str, date], DayFigure]: ...

    def figures_of(
        self, account: str, meter_id: str, keys: Iterable[tuple[str, date]]
    ) -> dict[tuple[str, date], DayFigure]: ...

    def open_entries(self, account: str, meter_id: str) -> list[Entry]: ...

    def entries_of(
        self, account: str, meter_id: str, customers: Iterable[str], first: date, last: date
    ) -> list[Entry]: ...

    def entries_stamped(
        self, account: str, meter_id: str, customers: Iterable[str] | None, start: int, end: int
    ) -> list[Entry]: ...

    def insert(self, entries: Sequence[Entry]) -> set[str]: ...

    def resolve(self, account: str, changes: Sequence[Change]) -> None: ...
