"""Deterministic meter event identifiers.

Stripe rejects a second event with an identifier it has already seen (within a rolling window of
at least 24 hours). An identifier derived from the billable fact, rather than a random one, turns
that rule into exactly-once delivery: a task retry, a cleared run or an overlapping backfill sends
the same identifier again and Stripe refuses the copy.

Identifiers stay readable where they fit in Stripe's 100 characters, so a person can find an
event in the dashboard; a longer one keeps a readable head and ends in a hash of the whole. Parts
are joined with ``:``, and a ``:`` or ``%`` inside a part is percent-escaped first, so two
different lists of parts never give the same identifier (``"a:b", "c"`` is not ``"a", "b:c"``).
"""

from __future__ import annotations

import hashlib

from airflow_provider_stripe_meter.utils.rules import MAX_IDENTIFIER_LENGTH

_HASH_CHARS = 24


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A") if ("%" in part or ":" in part) else part


def bounded_identifier(*parts: str, limit: int = MAX_IDENTIFIER_LENGTH) -> str:
    """Join ``parts`` with ``:`` (escaped), hashing the tail if the result would exceed ``limit``."""
    return _bounded(":".join(map(_escape, parts)), limit)


def _bounded(readable: str, limit: int = MAX_IDENTIFIER_LENGTH) -> str:
    if len(readable) <= limit:
        return readable
    # The escaped join is already unambiguous, so its hash is too.
    digest = hashlib.sha256(readable.encode()).hexdigest()[:_HASH_CHARS]
    return f"{readable[: limit - _HASH_CHARS - 1]}~{digest}"


def task_identifier(dag_id: str, task_id: str, run_id: str, map_index: int = -1) -> str:
    """Return the identifier for the one event a task instance records.

    Every try of the same task instance derives the same identifier, so an Airflow retry after a
    recorded event is refused by Stripe instead of billing twice.
    """
    # Airflow's dag and task ids cannot hold ":", so the run id (which does) is the only part
    # that may, and the plain join is already unambiguous; it is kept unescaped so identifiers
    # match those of earlier releases and a re-run after an upgrade is still refused.
    return _bounded(":".join(("airflow", dag_id, task_id, run_id, str(map_index))))
