"""The kinds of failure of this provider, as plain Python: the one tree every layer raises.

Each kind says whether a later try can succeed (:attr:`MeterFailure.retryable`). Delivery
(:mod:`.delivery`) and the billing core act by kind: retry, count as already recorded, count as
rejected, or stop. :mod:`airflow_provider_stripe_meter.exceptions` names each kind for users,
an ``AirflowFailException`` too where the kind is not retryable; the plain-Python modules raise
the kinds and never import Airflow.
"""

from __future__ import annotations

from typing import Any, ClassVar


class MeterFailure(Exception):
    """A Stripe call, or a billing run, failed; ``details`` says how (JSON-safe, for XCom)."""

    #: Whether the same work can succeed on a later try (Airflow's retries are spent only then).
    retryable: ClassVar[bool] = True

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details: dict[str, Any] = details or {"message": message}


class Transient(MeterFailure):
    """429, 5xx, a network error, or figures not settled yet: the same request can succeed later."""


class SessionExpired(Transient):
    """The v2 meter event session's token expired: the same events go through a new session."""


class Incomplete(Transient):
    """Some usage could not be delivered, or confirmed, in this try; a retry resumes it."""


class Rejected(MeterFailure):
    """Stripe refused the request (4xx other than 429): sending it again cannot succeed."""

    retryable = False


class Duplicate(Rejected):
    """Stripe already holds an event with this identifier."""


class Refused(MeterFailure):
    """The API key is missing, refused or lacks permission: no request can get through."""

    retryable = False


class Unsupported(MeterFailure):
    """The meter's settings cannot be billed exactly; nothing was sent."""

    retryable = False


class NoMeter(MeterFailure):
    """No active meter has the event name: events sent to it would never be billed."""

    retryable = False


class Invalid(MeterFailure):
    """A parameter of the task breaks a rule; nothing was sent."""

    retryable = False


class NotBilled(MeterFailure):
    """Usage was rejected (by Stripe or by the input rules) and the task was asked to fail then."""

    retryable = False


class Withheld(MeterFailure):
    """The caller decided, at the instant of sending, not to send the batch (nothing went out).

    A signal inside delivery (:class:`~.delivery.Deliverer` counts it), never raised past it.
    """
