"""The v2 meter event stream's session: one token shared by every sender, renewed before it expires.

Plain Python: the session is opened, and events sent, through the hook's calls
(:class:`StreamCalls`); Stripe's expired-token answer is the plain kind
:class:`~.errors.SessionExpired`.

.. seealso:: https://docs.stripe.com/api/v2/billing-meter-stream
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from airflow_provider_stripe_meter.utils.clock import SYSTEM
from airflow_provider_stripe_meter.utils.errors import SessionExpired


class StreamCalls(Protocol):
    """The hook's calls of the stream: open a session, a client for its token, send with it."""

    def create_meter_event_session(self) -> dict[str, Any]: ...

    def session_client(self, authentication_token: str) -> Any: ...

    def send_meter_event_stream(self, session_client: Any, events: Sequence[dict[str, Any]]) -> None: ...


class MeterEventStream:
    """Send batches through ``/v2/billing/meter_event_stream``, renewing the session as needed.

    Sessions last 15 minutes. One is shared by every thread; it is renewed ``renew_before``
    seconds before it expires, and at once when Stripe answers that it has expired.
    """

    def __init__(self, stripe: StreamCalls, *, renew_before: float = 60.0) -> None:
        self.stripe = stripe
        self.renew_before = renew_before
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self._client: Any = None

    def _current(self) -> tuple[str, Any]:
        with self._lock:
            if (
                self._client is None
                or self._token is None
                or SYSTEM.now() >= self._expires_at - self.renew_before
            ):
                session = self.stripe.create_meter_event_session()
                self._token = session["authentication_token"]
                self._expires_at = to_epoch(session["expires_at"])
                self._client = self.stripe.session_client(self._token)
            return self._token, self._client

    def _expire(self, token: str) -> None:
        with self._lock:
            if self._token == token:
                self._client = None

    def send(self, events: Sequence[dict[str, Any]]) -> None:
        """Send up to 100 events; validation happens later on Stripe's side (duplicates dropped)."""
        token, client = self._current()
        try:
            self.stripe.send_meter_event_stream(client, events)
        except SessionExpired:
            self._expire(token)
            _, client = self._current()
            self.stripe.send_meter_event_stream(client, events)


def to_epoch(value: Any) -> float:
    """Unix seconds of ``expires_at`` as Stripe's SDK gives it: a number, a datetime or RFC 3339."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
