"""JSON records in Airflow Variables, merged rather than overwritten.

Airflow Variables are last-writer-wins and offer no compare-and-set, so two runs that read a
record, change it and write it back can lose one change. Every write here is therefore a
*merge*: a function of the record as it is now that only adds what this writer knows (a later
time, a higher version, entries keyed by their Stripe identifier). Merges are idempotent and
commute, so applying one again, or on top of another writer's, loses nothing. After writing,
the record is read back; if another writer's value replaced it meanwhile, the merge is applied
to that value and written again, until the record holds this writer's change.

A writer that reads just before another writes, and writes just after, overwrites the other's
change; the other writer's read-back, ``SETTLE_SECONDS`` later, sees that and merges again.
What remains is a writer stalled between its read and its write for longer than that. Every
record is chosen so that even then no usage is billed twice: the journal and the late-billing
records only ever make a later run look Stripe up, and every identifier is derived from the
day and what Stripe held, so a repeat is refused by Stripe.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

#: How often a merge is written again when another writer's value replaced it.
MAX_MERGES = 5
#: How long a writer waits before reading its write back: far longer than another writer takes
#: from its read to its write (one round trip to Airflow's API server), so a write that raced
#: with this one has landed by then.
SETTLE_SECONDS = 0.05
PREFIX = "stripe_meter"


class VariableBackend(Protocol):
    """What is used of :class:`airflow.sdk.Variable` (tests pass a stand-in)."""

    def get(self, key: str, default: Any = ...) -> Any: ...

    def set(self, key: str, value: Any, description: str | None = None) -> None: ...

    def delete(self, key: str) -> Any: ...


def _airflow_variables() -> VariableBackend:
    from airflow.sdk import Variable

    return Variable


class Records:
    """JSON records under keys ``stripe_meter.<kind>.<account>.<meter id>.<prefix>[.<suffix>]``.

    :param account: The Connect account (``acct_...``) or ``None`` for the platform.
    :param meter_id: The Stripe meter.
    :param prefix: The identifier prefix the operator sends under.
    :param backend: Where records live; Airflow's Variables by default.
    """

    def __init__(
        self, account: str | None, meter_id: str, prefix: str, backend: VariableBackend | None = None
    ) -> None:
        self.account = account or "platform"
        self.meter_id = meter_id
        self.prefix = prefix
        self.backend = backend or _airflow_variables()

    def key(self, kind: str, suffix: str | None = None) -> str:
        """The Variable of one record."""
        base = f"{PREFIX}.{kind}.{self.account}.{self.meter_id}.{self.prefix}"
        return f"{base}.{suffix}" if suffix else base

    def get(self, key: str) -> Any:
        """The record under ``key``, ``None`` if there is none; ``{}`` if it cannot be read."""
        raw = self.backend.get(key, default=None)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            # Edited by hand or written under another Fernet key: still says the record exists.
            return {}

    def exists(self, key: str) -> bool:
        """Whether a record is under ``key``."""
        return self.backend.get(key, default=None) is not None

    def merge(self, key: str, change: Callable[[Any], Any], description: str) -> Any:
        """Apply ``change`` to the record (``None`` if missing) and store the result; ``None`` deletes.

        ``change`` must be idempotent and must keep what other writers added: it may be applied
        again, to a record another writer changed meanwhile.
        """
        current = self.get(key)
        for _ in range(MAX_MERGES):
            wanted = change(current)
            self._put(key, wanted, description)
            # Let a concurrent writer's write land, then check ours is what the record holds.
            time.sleep(SETTLE_SECONDS * (1 + random.random()))
            current = self.get(key)
            if _same(current, wanted):
                return wanted
        return current

    def delete(self, key: str) -> None:
        """Remove the record under ``key`` (nothing if there is none)."""
        if self.exists(key):
            self.backend.delete(key)

    def _put(self, key: str, record: Any, description: str) -> None:
        if record is None:
            self.delete(key)
        else:
            self.backend.set(key, json.dumps(record, sort_keys=True), description=description)


def _same(stored: Any, wanted: Any) -> bool:
    return json.dumps(stored, sort_keys=True) == json.dumps(wanted, sort_keys=True)
