"""Errors raised by the Stripe hook, translated from ``stripe.StripeError`` in one place.

Each carries ``details``: JSON-safe data (type, code, message, HTTP status, request id, param)
that operators put in XCom, so a downstream task can act on what Stripe said.
"""

from __future__ import annotations

from typing import Any


class StripeMeterError(Exception):
    """A Stripe call failed; ``details`` says how."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details: dict[str, Any] = details or {"message": message}


class StripeRequestRejected(StripeMeterError):
    """Stripe refused the request (4xx other than 429): sending it again cannot succeed."""


class StripeDuplicateIdentifier(StripeRequestRejected):
    """Stripe already holds an event with this identifier: for a derived identifier, already recorded."""


class StripeConfigurationError(StripeMeterError):
    """The API key was refused or lacks permission (401/403): a connection problem, not a bad event."""


class StripeTransientError(StripeMeterError):
    """Rate limit, 5xx or connection error that outlasted the retries; a later try can succeed."""


class StripeSessionExpired(StripeTransientError):
    """The v2 meter event session token expired; a new session fixes it."""


class StripeMeterNotFound(StripeMeterError):
    """No active meter has this event name: events sent now would never be billed."""


class StripeAdjustmentTooLate(StripeRequestRejected):
    """The event was received more than 24 hours ago: Stripe no longer lets it be cancelled."""
