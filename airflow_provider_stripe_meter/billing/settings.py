"""The knobs of one billing run, resolved: the operator's arguments and the connection's.

:func:`run_settings` resolves them for every operator (the rates from the key's mode and
account, the summary lag from the connection), so no operator works out a default itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, Protocol, get_args

Api = Literal["v1", "v2_stream"]
Confirm = Literal["meter", "summaries"]
TooOld = Literal["skip", "bill_at_oldest"]
BillingPeriods = Literal["hold", "carry", "off"]
#: The allowed values of each, as the operator checks them (written once, in the types above).
APIS: tuple[Api, ...] = get_args(Api)
CONFIRMS: tuple[Confirm, ...] = get_args(Confirm)
TOO_OLDS: tuple[TooOld, ...] = get_args(TooOld)
BILLING_PERIODS: tuple[BillingPeriods, ...] = get_args(BillingPeriods)

#: Stripe refuses a repeated identifier for at least this long (its documented minimum).
STRIPE_IDENTIFIER_WINDOW = timedelta(hours=24)
#: A day counts as fresh only if it ended this much inside the identifier window.
FRESH_MARGIN = timedelta(hours=1)


@dataclass(frozen=True)
class Delivery:
    """How events go out: pace, parallelism and retries.

    :param max_rps: Requests per second, summaries included; ``None`` fits the key's mode
        (20 test, 900 live).
    :param concurrency: Requests in flight at most (default from ``max_rps``).
    :param max_attempts: Tries per request for 429, 5xx and network errors outside an outage.
    :param outage_timeout: How long an outage (every request failing) is ridden out before what
        is left fails the task for its retry.
    """

    max_rps: float | None = None
    concurrency: int | None = None
    max_attempts: int = 8
    outage_timeout: timedelta = timedelta(minutes=10)

    def __post_init__(self) -> None:
        if self.max_rps is not None and self.max_rps <= 0:
            raise ValueError(f"max_rps must be positive, got {self.max_rps!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts!r}")
        if not isinstance(self.outage_timeout, timedelta):
            raise TypeError(f"outage_timeout must be a timedelta, got {self.outage_timeout!r}")


@dataclass(frozen=True)
class Timing:
    """How far Stripe's guarantees are trusted, and how long its summaries are waited for.

    :param identifier_window: How long Stripe is assumed to refuse a repeated identifier (Stripe
        promises at least 24 hours): a killed run's ``pending`` events younger than this, less
        an hour, are sent again under their identifiers; older ones are settled from Stripe's
        summaries. ``None`` settles every one from the summaries.
    :param summary_lag: How long Stripe's meter summaries may trail the events it accepted;
        ``None`` takes the connection's ``summary_lag`` extra (default 5 minutes).
    :param settle_timeout: The longest wait for Stripe's summaries to show events already
        answered. Past it, open ledger rows stay open for a later run (the run is then not a
        success), and ``confirm="summaries"`` does not read that meter back.
    """

    identifier_window: timedelta | None = STRIPE_IDENTIFIER_WINDOW
    summary_lag: timedelta | None = None
    settle_timeout: timedelta = timedelta(minutes=10)

    def __post_init__(self) -> None:
        for name in ("identifier_window", "summary_lag", "settle_timeout"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, timedelta):
                raise TypeError(f"{name} must be a timedelta, got {value!r}")
        if self.identifier_window is not None and self.identifier_window <= FRESH_MARGIN:
            raise ValueError(
                f"identifier_window must be longer than {FRESH_MARGIN}, got {self.identifier_window}"
            )


@dataclass(frozen=True)
class RunSettings:
    """Everything a :class:`~.run.BillingRun` is told (seconds where it sleeps or waits)."""

    api: Api = "v1"
    confirm: Confirm = "meter"
    #: Rebuild the ledger from Stripe's summaries for customer-days it holds nothing of.
    adopt: bool = False
    #: Send usage of a period whose invoice is final into the customer's open period instead.
    carry: bool = False
    dry_run: bool = False
    plan_limit: int = 1_000
    sample_limit: int = 20
    max_rps: float = 20.0
    #: Summary reads per second (Stripe's basic read limit, unless ``max_rps`` was given).
    read_rps: float = 20.0
    delivery: Delivery = field(default_factory=Delivery)
    timing: Timing = field(default_factory=Timing)
    summary_lag: float = 300.0

    @property
    def settle_seconds(self) -> float:
        """``timing.settle_timeout`` in seconds."""
        return self.timing.settle_timeout.total_seconds()


class KeyFacts(Protocol):
    """What the defaults depend on of a task's Stripe connection (the hook has them)."""

    @property
    def livemode(self) -> bool: ...

    @property
    def stripe_account(self) -> str | None: ...

    @property
    def summary_lag(self) -> float: ...


def run_settings(
    key: KeyFacts, *, max_rps: float | None, summary_lag: float | None = None, **knobs: Any
) -> RunSettings:
    """The settings of a run on ``key``'s connection: ``max_rps`` caps sends and reads alike;
    without it, each rate is the default for the key's mode (a connected account's sends count
    toward the basic limit); ``summary_lag`` (seconds) defaults to the connection's. ``knobs``:
    the other :class:`RunSettings` fields."""
    from airflow_provider_stripe_meter.utils.delivery import default_max_rps, default_read_rps

    return RunSettings(
        max_rps=max_rps or default_max_rps(key.livemode, connected=bool(key.stripe_account)),
        read_rps=max_rps or default_read_rps(key.livemode),
        summary_lag=summary_lag if summary_lag is not None else float(key.summary_lag),
        **knobs,
    )
