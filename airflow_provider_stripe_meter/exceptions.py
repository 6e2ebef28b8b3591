"""Errors raised by this provider, translated from ``stripe.StripeError`` in one place.

Each carries ``details``: JSON-safe data (type, code, message, HTTP status, request id, param)
that operators put in XCom, so a downstream task can act on what Stripe said.

Two families, so Airflow spends ``retries`` only where a retry can help:

* failures no retry can fix (a refused key, an unknown meter, a rejected request, a meter the
  operator cannot bill exactly, ``fail_on_error``) are :class:`AirflowFailException` subclasses:
  the task fails at once, whatever ``retries`` says;
* transient ones (429, 5xx, network, summaries not yet settled) are plain exceptions, and a
  retry of the task picks up where the failed try stopped.

Each is also one of the plain kinds of :mod:`airflow_provider_stripe_meter.utils.errors`, which
is what the Airflow-free delivery and billing code acts on.
"""

from __future__ import annotations

from airflow.providers.common.compat.sdk import AirflowFailException

from airflow_provider_stripe_meter.utils import errors


class StripeMeterError(errors.MeterFailure):
    """A Stripe call failed; ``details`` says how."""


# -- permanent: Airflow does not retry these ---------------------------------------------------


class StripeRequestRejectedError(StripeMeterError, errors.Rejected, AirflowFailException):
    """Stripe refused the request (4xx other than 429): sending it again cannot succeed."""


class StripeDuplicateIdentifierError(StripeRequestRejectedError, errors.Duplicate):
    """Stripe already holds an event with this identifier: for a derived identifier, already recorded."""


class StripeAdjustmentTooLateError(StripeRequestRejectedError):
    """The event was received more than 24 hours ago: Stripe no longer lets it be cancelled."""


class StripeConfigurationError(StripeMeterError, errors.Refused, AirflowFailException):
    """The API key is missing, refused or lacks permission (401/403): a connection problem."""


class StripeParameterError(StripeMeterError, AirflowFailException):
    """A parameter of the task breaks a rule (``details`` names the field, the value and the rule)."""


class StripeAccountInvalidError(StripeConfigurationError):
    """The key cannot act for this connected account (403 ``account_invalid``); ``details`` names it."""


class StripeMeterNotFoundError(StripeMeterError, AirflowFailException):
    """No active meter has this event name: events sent now would never be billed."""


class StripeMeterDeactivatedError(StripeMeterNotFoundError):
    """The meter stopped being active while the run sent to it: Stripe drops such events."""


class StripeMeterUnsupportedError(StripeMeterError, errors.Unsupported, AirflowFailException):
    """The meter's settings (formula, event time window) cannot be billed exactly by this operator."""


class StripeEventRejectedError(StripeMeterError, AirflowFailException):
    """Usage was rejected (by Stripe or by the input rules) and ``fail_on_error`` asks to fail."""


# -- transient: Airflow's retries apply --------------------------------------------------------


class StripeTransientError(StripeMeterError, errors.Transient):
    """Rate limit, 5xx or connection error that outlasted the retries; a later try can succeed."""


class StripeSessionExpiredError(StripeTransientError, errors.SessionExpired):
    """The v2 meter event session token expired; a new session fixes it."""


class StripeDeliveryIncompleteError(StripeTransientError, errors.Incomplete):
    """Some usage could not be delivered (or confirmed) in this try; the task's retry resumes it."""
