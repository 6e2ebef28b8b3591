"""Deterministic meter event identifiers.

Stripe rejects a second event with an identifier it has already seen (within a rolling window of
at least 24 hours). An identifier derived from the billable fact, rather than a random one, turns
that rule into exactly-once delivery: a task retry, a cleared run or an overlapping backfill sends
the same identifier again and Stripe refuses the copy.

Identifiers stay readable where they fit in Stripe's 100 characters, so a person can find an
event in the dashboard; a longer one keeps a readable head and ends in a hash of the whole, so two
different facts never share an identifier.
"""

from __future__ import annotations

import hashlib
from datetime import date

from airflow_provider_stripe_meter.rules import MAX_IDENTIFIER_LENGTH

_HASH_CHARS = 24


def bounded_identifier(*parts: str, limit: int = MAX_IDENTIFIER_LENGTH) -> str:
    """Join ``parts`` with ``:``, hashing the tail if the result would exceed ``limit``."""
    readable = ":".join(parts)
    if len(readable) <= limit:
        return readable
    # Hash the unambiguous form (unit separators), not the readable one, so "a:b"+"c" != "a"+"b:c".
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:_HASH_CHARS]
    return f"{readable[: limit - _HASH_CHARS - 1]}~{digest}"


def task_identifier(dag_id: str, task_id: str, run_id: str, map_index: int = -1) -> str:
    """Return the identifier for the one event a task instance records.

    Every try of the same task instance derives the same identifier, so an Airflow retry after a
    recorded event is refused by Stripe instead of billing twice.
    """
    return bounded_identifier("airflow", dag_id, task_id, run_id, str(map_index))


def daily_identifier(event_name: str, customer_id: str, day: date, prefix: str = "usage") -> str:
    """Return the identifier of one customer's usage of one meter on one UTC day."""
    return bounded_identifier(prefix, event_name, customer_id, day.isoformat())
