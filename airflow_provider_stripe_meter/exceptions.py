"""Errors raised by this provider, translated from ``stripe.StripeError`` in one place.

Each carries ``details``: JSON-safe data (type, code, message, HTTP status, request id, param)
that operators put in XCom, so a downstream task can act on what Stripe said.

Two families, so Airflow spends ``retries`` only where a retry can help:

* failures no retry can fix (a refused key, an unknown meter, a rejected request, a meter the
  operator cannot bill exactly, ``fail_on_error``) are :class:`AirflowFailException` subclasses:
  the task fails at once, whatever ``retries`` says;
* transient ones (429, 5xx, network, summaries not yet settled) are plain exceptions, and a
  retry of the task picks up where the failed try stopped.
"""

from __future__ import annotations

from typing import Any

try:
    from airflow.sdk.exceptions import AirflowFailException
except ImportError:  # Airflow 3.1 keeps it in airflow.exceptions only
    from airflow.exceptions import AirflowFailException


class StripeMeterError(Exception):
    """A Stripe call failed; ``details`` says how."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details: dict[str, Any] = details or {"message": message}


# -- permanent: Airflow does not retry these ---------------------------------------------------


class StripeRequestRejectedError(StripeMeterError, AirflowFailException):
    """Stripe refused the request (4xx other than 429): sending it again cannot succeed."""


class StripeDuplicateIdentifierError(StripeRequestRejectedError):
    """Stripe already holds an event with this identifier: for a derived identifier, already recorded."""


class StripeAdjustmentTooLateError(StripeRequestRejectedError):
    """The event was received more than 24 hours ago: Stripe no longer lets it be cancelled."""


class StripeConfigurationError(StripeMeterError, AirflowFailException):
    """The API key is missing, refused or lacks permission (401/403): a connection problem."""


class StripeMeterNotFoundError(StripeMeterError, AirflowFailException):
    """No active meter has this event name: events sent now would never be billed."""


class StripeMeterDeactivatedError(StripeMeterNotFoundError):
    """The meter stopped being active while the run sent to it: Stripe drops such events."""


class StripeMeterUnsupportedError(StripeMeterError, AirflowFailException):
    """The meter's settings (formula, event time window) cannot be billed exactly by this operator."""


class StripeEventRejectedError(StripeMeterError, AirflowFailException):
    """Usage was rejected (by Stripe or by the input rules) and ``fail_on_error`` asks to fail."""


# -- transient: Airflow's retries apply --------------------------------------------------------


class StripeTransientError(StripeMeterError):
    """Rate limit, 5xx or connection error that outlasted the retries; a later try can succeed."""


class StripeSessionExpiredError(StripeTransientError):
    """The v2 meter event session token expired; a new session fixes it."""


class StripeDeliveryIncompleteError(StripeTransientError):
    """Some usage could not be delivered (or confirmed) in this try; the task's retry resumes it."""


# Names of the first release, kept for one release so existing ``except`` clauses keep working.
StripeRequestRejected = StripeRequestRejectedError
StripeDuplicateIdentifier = StripeDuplicateIdentifierError
StripeAdjustmentTooLate = StripeAdjustmentTooLateError
StripeMeterNotFound = StripeMeterNotFoundError
StripeSessionExpired = StripeSessionExpiredError
