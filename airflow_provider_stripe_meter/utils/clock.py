"""The clock billing reads time from: one object, passed to whoever needs "now".

Plain Python. Billing decisions depend on "now" (is a day still inside Stripe's identifier
window, has Stripe's summary had time to settle, which rows are older than 35 days), so a run
reads it from the :class:`Clock` in its context, and waits on it too. :data:`SYSTEM` is the wall
clock the operators pass; a test moves time by giving a run a clock of its own, or by pointing
:data:`SYSTEM` at a virtual source (and the local server's clock with it).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Clock:
    """Unix seconds now, and a wait: both from ``source`` and ``sleeper`` (the wall clock by default)."""

    __slots__ = ("sleeper", "source")

    def __init__(
        self,
        source: Callable[[], float] = time.time,
        sleeper: Callable[[float], None] = time.sleep,
    ) -> None:
        self.source = source
        self.sleeper = sleeper

    def now(self) -> float:
        """Unix seconds, now."""
        return self.source()

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a virtual clock moves on instead)."""
        self.sleeper(seconds)


#: The wall clock: what operators, sensors and adapters read time from.
SYSTEM = Clock()
