"""Errors raised by this provider: one tree, each class a plain kind of failure by name.

Each class here is exactly one kind of :mod:`airflow_provider_stripe_meter.utils.errors`, which
the Airflow-free delivery and billing code raises and acts on. Each carries ``details``:
JSON-safe data (type, code, message, HTTP status, request id, param) that operators put in
XCom, so a downstream task can act on what Stripe said.

Retry semantics live in the types, so Airflow spends ``retries`` only where a retry can help:

* a kind no retry can fix (``retryable`` false: a refused key, an unknown meter, a rejected
  request, a meter the operator cannot bill exactly, ``fail_on_error``) is an
  :class:`AirflowFailException` here: the task fails at once, whatever ``retries`` says;
* a transient one (429, 5xx, network, summaries not yet settled) is a plain exception, and a
  retry of the task picks up where the failed try stopped.

The hook raises these classes (its one translation point,
:meth:`~airflow_provider_stripe_meter.hooks.stripe.StripeHook.translate_error`); a kind the
billing core raises becomes its class here at one boundary, :func:`raised_for_airflow`, around
the core's run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


class StripeParameterError(StripeMeterError, errors.Invalid, AirflowFailException):
    """A parameter of the task breaks a rule (``details`` names the field, the value and the rule)."""


class StripeAccountInvalidError(StripeConfigurationError):
    """The key cannot act for this connected account (403 ``account_invalid``); ``details`` names it."""


class StripeMeterNotFoundError(StripeMeterError, errors.NoMeter, AirflowFailException):
    """No active meter has this event name: events sent now would never be billed."""


class StripeMeterDeactivatedError(StripeMeterNotFoundError):
    """The meter stopped being active while the run sent to it: Stripe drops such events."""


class StripeMeterUnsupportedError(StripeMeterError, errors.Unsupported, AirflowFailException):
    """The meter's settings (formula, event time window) cannot be billed exactly by this operator."""


class StripeEventRejectedError(StripeMeterError, errors.NotBilled, AirflowFailException):
    """Usage was rejected (by Stripe or by the input rules) and ``fail_on_error`` asks to fail."""


# -- transient: Airflow's retries apply --------------------------------------------------------


class StripeTransientError(StripeMeterError, errors.Transient):
    """Rate limit, 5xx or connection error that outlasted the retries; a later try can succeed."""


class StripeSessionExpiredError(StripeTransientError, errors.SessionExpired):
    """The v2 meter event session token expired; a new session fixes it."""


class StripeDeliveryIncompleteError(StripeTransientError, errors.Incomplete):
    """Some usage could not be delivered (or confirmed) in this try; the task's retry resumes it."""


#: The class of each plain kind; a kind not named here takes its nearest named ancestor's.
CLASS_OF_KIND: dict[type[errors.MeterFailure], type[StripeMeterError]] = {
    errors.MeterFailure: StripeMeterError,
    errors.Transient: StripeTransientError,
    errors.SessionExpired: StripeSessionExpiredError,
    errors.Incomplete: StripeDeliveryIncompleteError,
    errors.Rejected: StripeRequestRejectedError,
    errors.Duplicate: StripeDuplicateIdentifierError,
    errors.Refused: StripeConfigurationError,
    errors.Unsupported: StripeMeterUnsupportedError,
    errors.NoMeter: StripeMeterNotFoundError,
    errors.Invalid: StripeParameterError,
    errors.NotBilled: StripeEventRejectedError,
}


def as_airflow_error(err: errors.MeterFailure) -> StripeMeterError:
    """``err`` as its class in this module (itself if it is one), message and details kept."""
    if isinstance(err, StripeMeterError):
        return err
    kind = next(k for k in type(err).__mro__ if k in CLASS_OF_KIND)
    return CLASS_OF_KIND[kind](str(err), err.details)


@contextmanager
def raised_for_airflow() -> Iterator[None]:
    """Raise a plain kind of failure (from the billing core) as its class here, chained to it.

    The boundary between the Airflow-free core and Airflow: the task then fails at once, or is
    retried, as the kind says. Anything else goes through as it is.
    """
    try:
        yield
    except StripeMeterError:
        raise
    except errors.MeterFailure as err:
        raise as_airflow_error(err) from err
