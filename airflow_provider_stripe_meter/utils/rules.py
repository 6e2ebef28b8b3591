"""Input rules for Stripe meter events, shared by every operator.

Plain Python on purpose: no Airflow and no ``stripe`` import, so the rules are cheap to import at
DAG-parse time and are tested on their own. Each check returns the normalised value or raises
:class:`MeterEventInputError`, which names the field, the offending value and the rule it broke.

.. seealso:: https://docs.stripe.com/api/billing/meter-event/create
"""

from __future__ import annotations

import calendar
import math
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any

from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY, iso_utc

MAX_EVENT_NAME_LENGTH = 100
MAX_IDENTIFIER_LENGTH = 100
MAX_VALUE_DIGITS = 15
MAX_VALUE = 10**MAX_VALUE_DIGITS - 1
#: Stripe accepts events whose timestamp lies within the past 35 calendar days ...
PAST_WINDOW = timedelta(days=35)
#: ... and at most 5 minutes in the future.
FUTURE_TOLERANCE = timedelta(minutes=5)
#: The zone a timestamp without one is read in, by every operator alike (a SQL ``timestamp``
#: column usually has none, and Stripe's days are UTC days).
NAIVE_TIMEZONE: tzinfo = timezone.utc
#: What to do with a fractional value: Stripe's meter values are whole numbers
#: (https://docs.stripe.com/api/billing/meter-event/create), and rounding here, silently, would
#: bill an amount nobody chose.
WHOLE_NUMBER_ADVICE = (
    "must be a whole number (Stripe's meters take whole numbers only): bill in a smaller unit "
    "(tokens, not thousands of tokens; milliseconds, not seconds), or round in the query (ROUND)"
)

_INTEGER_STRING = re.compile(r"[+-]?\d+")
_CUSTOMER_ID = re.compile(r"cus_\S+")
_UNIX_SECONDS_STRING = re.compile(r"\d+")


class MeterEventInputError(ValueError):
    """A meter event input broke one of Stripe's rules; raised before anything is sent."""

    def __init__(self, field: str, value: Any, rule: str) -> None:
        self.field = field
        self.value = value
        self.rule = rule
        super().__init__(f"{field} {_shorten(value)} is invalid: {rule}")

    def to_dict(self) -> dict[str, Any]:
        """Return the details as JSON-safe data, for XCom and batch reports."""
        return {
            "type": "validation_error",
            "field": self.field,
            "value": _shorten(self.value),
            "rule": self.rule,
        }


def _shorten(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_event_name(value: Any) -> str:
    """Return ``value`` if it is a usable meter event name (1 to 100 characters)."""
    if not isinstance(value, str) or not value.strip():
        raise MeterEventInputError("event_name", value, "must be a non-empty string")
    if len(value) > MAX_EVENT_NAME_LENGTH:
        raise MeterEventInputError(
            "event_name", value, f"must be at most {MAX_EVENT_NAME_LENGTH} characters, got {len(value)}"
        )
    if value != value.strip():
        raise MeterEventInputError("event_name", value, "must not start or end with whitespace")
    return value


def check_fixed_event_name(value: Any) -> None:
    """At DAG-parse time, check an event name that is not a template (a template is checked at run time)."""
    if isinstance(value, str) and "{{" not in value:
        validate_event_name(value)


def validate_customer_id(value: Any) -> str:
    """Return ``value`` if it looks like a Stripe customer id (``cus_...``).

    Stripe accepts an unknown customer with a 200 and reports it days later, so the one mistake
    that can be caught synchronously, passing an internal user id instead of Stripe's, is caught
    here.
    """
    if not isinstance(value, str) or not value:
        raise MeterEventInputError("customer_id", value, "must be a non-empty string")
    if not _CUSTOMER_ID.fullmatch(value):
        raise MeterEventInputError(
            "customer_id", value, "must be a Stripe customer id: 'cus_' followed by the id, no whitespace"
        )
    return value


def validate_value(value: Any, field: str = "value", *, limit: int | None = MAX_VALUE) -> int:
    """Return ``value`` as an ``int`` if it is a whole number (of at most 15 digits by default).

    Accepts ``int``, integral ``Decimal``, integral ``float`` and numeric strings (templates
    render strings). Rejects ``bool``, ``None``, NaN, infinities and fractions: Stripe's meter
    values are whole numbers and a silent rounding would bill the wrong amount. ``limit=None``
    skips the digit check, for a row whose day total is checked instead.
    """
    number: int
    if type(value) is int:  # the common case of a usage row, first
        number = value
    elif isinstance(value, bool) or value is None:
        raise MeterEventInputError(field, value, "must be a whole number, not a boolean or None")
    elif isinstance(value, int):
        number = int(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise MeterEventInputError(field, value, "must be a whole number, not NaN or infinity")
        if not value.is_integer():
            raise MeterEventInputError(field, value, WHOLE_NUMBER_ADVICE)
        number = int(value)
    elif isinstance(value, Decimal):
        number = _decimal_to_int(value, field, value)
    elif isinstance(value, str):
        text = value.strip()
        if _INTEGER_STRING.fullmatch(text):
            number = int(text)
        else:
            try:
                parsed = Decimal(text)
            except InvalidOperation:
                raise MeterEventInputError(field, value, "must be a whole number") from None
            number = _decimal_to_int(parsed, field, value)
    else:
        raise MeterEventInputError(field, value, f"must be a whole number, got {type(value).__name__}")
    if limit is not None and abs(number) > limit:
        raise MeterEventInputError(field, value, f"must have at most {MAX_VALUE_DIGITS} digits")
    return number


def _decimal_to_int(number: Decimal, field: str, original: Any) -> int:
    if not number.is_finite():
        raise MeterEventInputError(field, original, "must be a whole number, not NaN or infinity")
    if number != number.to_integral_value():
        raise MeterEventInputError(field, original, WHOLE_NUMBER_ADVICE)
    return int(number)


def validate_identifier(value: Any) -> str | None:
    """Return ``value`` if it is ``None`` or a usable identifier (1 to 100 characters)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise MeterEventInputError("identifier", value, "must be a non-empty string or None")
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise MeterEventInputError(
            "identifier", value, f"must be at most {MAX_IDENTIFIER_LENGTH} characters, got {len(value)}"
        )
    return value


def to_unix_seconds(value: Any, field: str = "timestamp", *, naive_timezone: tzinfo | None = None) -> int:
    """Convert a timestamp to whole unix seconds without checking the window.

    Accepts unix seconds (``int``, integral ``float``, digit strings), ``datetime`` (pendulum
    included), ``date`` and ISO-8601 strings. A value without a zone is read in
    ``naive_timezone``; with ``None`` (the default here; the operators pass
    :data:`NAIVE_TIMEZONE`, UTC, unless told otherwise) it is rejected.
    """
    if isinstance(value, bool) or value is None:
        raise MeterEventInputError(field, value, "must be unix seconds, a datetime or an ISO-8601 string")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MeterEventInputError(field, value, "must be a finite number of unix seconds")
        return int(value)
    moment = value
    if isinstance(value, str):
        text = value.strip()
        if _UNIX_SECONDS_STRING.fullmatch(text):
            return int(text)
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise MeterEventInputError(
                field, value, "must be unix seconds or an ISO-8601 date-time (without an offset: UTC)"
            ) from None
    elif isinstance(value, date) and not isinstance(value, datetime):
        moment = datetime(value.year, value.month, value.day)
    if not isinstance(moment, datetime):
        raise MeterEventInputError(
            field,
            value,
            f"must be unix seconds, a datetime or an ISO-8601 string, got {type(value).__name__}",
        )
    if moment.tzinfo is None or moment.utcoffset() is None:
        if naive_timezone is None:
            raise MeterEventInputError(
                field, value, "must carry a timezone (naive_timezone=None refuses zone-less date-times)"
            )
        moment = moment.replace(tzinfo=naive_timezone)
    # timegm is exact (no float) and works for pendulum, whose timedelta arithmetic does not mix.
    return calendar.timegm(moment.utctimetuple())


def check_time_window(
    seconds: int,
    now: int,
    *,
    field: str = "timestamp",
    original: Any = None,
    past_window: timedelta = PAST_WINDOW,
) -> int:
    """Return ``seconds`` if Stripe would take it at ``now``; raise :class:`MeterEventInputError` if not.

    Stripe takes timestamps from ``past_window`` (35 days) ago to 5 minutes ahead. A narrower
    ``past_window`` leaves a margin, so an event cannot expire between the check and the send.
    ``original`` is the value as given, shown in the error instead of the converted seconds.
    """
    shown = seconds if original is None else original
    oldest = now - int(past_window.total_seconds())
    if seconds < oldest:
        days = past_window.total_seconds() / SECONDS_PER_DAY
        raise MeterEventInputError(
            field,
            shown,
            f"must be within the past {days:g} days (not before {iso_utc(oldest)}), got {iso_utc(seconds)}",
        )
    newest = now + int(FUTURE_TOLERANCE.total_seconds())
    if seconds > newest:
        raise MeterEventInputError(
            field,
            shown,
            f"must be at most 5 minutes in the future (not after {iso_utc(newest)}), got {iso_utc(seconds)}",
        )
    return seconds


def validate_timestamp(value: Any, now: int, *, naive_timezone: tzinfo | None = NAIVE_TIMEZONE) -> int | None:
    """Return ``value`` as unix seconds within Stripe's window, or ``None`` for "now".

    A value without a zone is read in ``naive_timezone`` (UTC by default, as the batch operator
    reads its rows); ``None`` refuses it.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return check_time_window(to_unix_seconds(value, naive_timezone=naive_timezone), now, original=value)


@dataclass(frozen=True)
class MeterEvent:
    """One meter event, validated and normalised, ready to send."""

    event_name: str
    customer_id: str
    value: int
    identifier: str | None = None
    timestamp: int | None = None


def validate_meter_event(
    *,
    event_name: Any,
    customer_id: Any,
    value: Any,
    identifier: Any = None,
    timestamp: Any = None,
    now: int,
    naive_timezone: tzinfo | None = NAIVE_TIMEZONE,
) -> MeterEvent:
    """Check every field of one meter event and return it normalised (a zone-less timestamp is
    read in ``naive_timezone``, UTC by default)."""
    return MeterEvent(
        event_name=validate_event_name(event_name),
        customer_id=validate_customer_id(customer_id),
        value=validate_value(value),
        identifier=validate_identifier(identifier),
        timestamp=validate_timestamp(timestamp, now, naive_timezone=naive_timezone),
    )
