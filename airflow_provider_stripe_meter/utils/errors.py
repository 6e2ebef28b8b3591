"""The kinds of failure a Stripe call can end in, as plain Python.

Delivery (:mod:`.delivery`) and the billing core decide what to do by kind: retry, count as
already recorded, count as rejected, or stop. The Airflow-facing exceptions of
:mod:`airflow_provider_stripe_meter.exceptions` are these kinds plus Airflow's own
``AirflowFailException`` where no retry can help, so the plain-Python modules never import
Airflow.
"""

from __future__ import annotations

from typing import Any


class MeterFailure(Exception):
    """A Stripe call, or a billing run, failed; ``details`` says how (JSON-safe, for XCom)."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details: dict[str, Any] = details or {"message": message}


class Transient(MeterFailure):
    """429, 5xx, a network error, or figures not settled yet: the same request can succeed later."""


class SessionExpired(Transient):
    """The v2 meter event session's token expired: the same events go through a new session."""


class Rejected(MeterFailure):
    """Stripe refused the request (4xx other than 429): sending it again cannot succeed."""


class Duplicate(Rejected):
    """Stripe already holds an event with this identifier."""


class Withheld(MeterFailure):
    """The caller decided, at the instant of sending, not to send the batch (nothing went out)."""


class Refused(MeterFailure):
    """The API key is missing, refused or lacks permission: no request can get through."""


class Unsupported(MeterFailure):
    """The meter's settings cannot be billed exactly; nothing was sent."""


class Incomplete(Transient):
    """Some usage could not be delivered, or confirmed, in this try; a retry resumes it."""
