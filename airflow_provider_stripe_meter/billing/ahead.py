"""Planning a slice ahead of the one being sent.

Planning 100,000 customer-days takes most of a second, about as long as a slice of events waits
on Stripe's rate limit, so a run plans its first slice, then each next one while the requests of
the one before are out: it waits on the plan only once. Plain Python: the plan is an iterator of
planned customer-days, in the order they are planned.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
E = TypeVar("E")


class PlanAhead(Generic[K, E]):
    """The planned events of a run, handed out a slice at a time, planned as they are needed.

    ``plan`` yields ``(key, events, late)`` for every customer-day as it is planned (``events``
    empty: nothing to send). A day billed late (older than Stripe's window) is sent after every
    other day, in the order planned, as a run that planned everything first sent them.
    """

    def __init__(self, plan: Iterator[tuple[K, Sequence[E], bool]]) -> None:
        self._plan: Iterator[tuple[K, Sequence[E], bool]] | None = plan
        self._ready: deque[tuple[K, Sequence[E]]] = deque()
        self._ready_events = 0
        self._late: deque[tuple[K, Sequence[E]]] = deque()
        #: What planning raised while a slice was out: raised by the next :meth:`take`.
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        """Whether every customer-day is planned."""
        return self._plan is None

    def fill(self, events: int | None) -> None:
        """Plan until ``events`` events are ready to send (``None``: plan everything)."""
        while self._plan is not None and (events is None or self._ready_events < events):
            try:
                key, planned, late = next(self._plan)
            except StopIteration:
                self._plan = None
                return
            if not planned:
                continue
            if late:
                self._late.append((key, planned))
            else:
                self._ready.append((key, planned))
                self._ready_events += len(planned)

    def fill_quietly(self, events: int) -> None:
        """:meth:`fill`, keeping what it raises for the next :meth:`take` (work done while a
        slice's requests are out must not raise into the sending)."""
        if self._error is not None:
            return
        try:
            self.fill(events)
        except Exception as err:  # raised by take(), once the slice being sent is resolved
            self._error = err
            self._plan = None

    def take(self, events: int) -> list[tuple[K, Sequence[E]]]:
        """The next slice: whole customer-days until it holds ``events`` events (the last day may
        take it past), planning what it needs; late days once every other day is sent; ``[]``
        when everything is sent."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        self.fill(events)
        # With nothing ready after fill(), everything is planned: the late days go last.
        ready = bool(self._ready)
        source = self._ready if ready else self._late
        batch: list[tuple[K, Sequence[E]]] = []
        size = 0
        while source and size < events:
            item = source.popleft()
            _, planned = item
            batch.append(item)
            size += len(planned)
        if ready:
            self._ready_events -= size
        return batch
