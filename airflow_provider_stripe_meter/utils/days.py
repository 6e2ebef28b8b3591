"""UTC days and instants: which day a Unix second falls in, where a day starts and ends, ISO forms.

Plain Python. Stripe counts meter events by UTC day, and so does everything here that turns
seconds into a day or a day into seconds.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from functools import lru_cache

SECONDS_PER_DAY = 86400
#: The proleptic ordinal of 1970-01-01: days since it are whole UTC days of Unix time.
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_EPOCH_DAY = date(1970, 1, 1)


@lru_cache(maxsize=256)
def day_start(day: date) -> int:
    """Unix seconds of the first second of ``day`` (UTC)."""
    # Asked twice for each of a night's 100,000 customer-days, about a handful of days.
    return (day.toordinal() - EPOCH_ORDINAL) * SECONDS_PER_DAY


def day_end(day: date) -> int:
    """Unix seconds of the first second after ``day`` (UTC)."""
    return (day.toordinal() - EPOCH_ORDINAL + 1) * SECONDS_PER_DAY


def day_of(seconds: float) -> date:
    """The UTC day the instant ``seconds`` falls in (the day an event stamped so counts in)."""
    return datetime.fromtimestamp(seconds, timezone.utc).date()


def day_numbered(number: int) -> date:
    """The UTC day ``number`` days after 1970-01-01 (Unix seconds // 86400)."""
    return _EPOCH_DAY + timedelta(days=number)


def iso_utc(seconds: int) -> str:
    """Unix seconds as an ISO-8601 UTC string, for messages and reports."""
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        return f"{seconds} (out of range)"


def rfc3339(seconds: float) -> str:
    """Unix seconds as the RFC 3339 UTC string Stripe's v2 endpoints take (``...Z``)."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat().replace("+00:00", "Z")
