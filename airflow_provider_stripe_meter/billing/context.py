"""What every phase of a billing run works with: one narrow context, not the run itself.

Settling, planning, delivery and the checks take a :class:`RunContext` (settings, Stripe, the
ledger, who writes, the log, the run's book, the clock), so none of them imports
:mod:`.run`, and a test can build one for a single phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.billing.book import RunBook
    from airflow_provider_stripe_meter.billing.ports import LedgerStore, Log, StripeMeters
    from airflow_provider_stripe_meter.billing.settings import RunSettings
    from airflow_provider_stripe_meter.utils.clock import Clock


@dataclass(frozen=True)
class Writer:
    """Who writes ledger rows: the account billed, the Airflow run, and this try of the task."""

    account: str
    run_id: str
    attempt: str


@dataclass(frozen=True, slots=True)
class RunContext:
    """The settings, ports and state one billing run's phases share."""

    settings: RunSettings
    stripe: StripeMeters
    ledger: LedgerStore
    writer: Writer
    log: Log
    #: The run's record of every customer-day and request (:mod:`.book`).
    book: RunBook
    #: What the run reads "now" from and waits on.
    clock: Clock

    @property
    def account(self) -> str:
        """The account billed (one ledger per account and meter)."""
        return self.writer.account
