"""Planning a slice ahead: the plan is consumed only as slices need it, late days go last, and
what planning raises while a slice is out comes out of the next ``take``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from airflow_provider_stripe_meter.billing.ahead import PlanAhead


def days(spec: list[tuple[str, int, bool]], planned: list[str]) -> Iterator[tuple[str, list[int], bool]]:
    """A plan of customer-days (key, number of events, late), noting each key as it is planned."""
    for key, events, late in spec:
        planned.append(key)
        yield key, list(range(events)), late


def test_slices_take_whole_days_and_plan_only_what_they_need():
    planned: list[str] = []
    ahead = PlanAhead(days([("a", 2, False), ("b", 0, False), ("c", 3, False), ("d", 1, False)], planned))
    ahead.fill(2)
    assert planned == ["a"]
    first = ahead.take(4)
    # Whole days until the slice holds 4 events: the last day takes it past.
    assert [key for key, _ in first] == ["a", "c"]
    assert planned == ["a", "b", "c"]
    assert not ahead.done
    assert [key for key, _ in ahead.take(4)] == ["d"]
    assert ahead.done
    assert ahead.take(4) == []


def test_late_days_are_sent_after_every_other_day():
    planned: list[str] = []
    ahead = PlanAhead(days([("old1", 1, True), ("a", 1, False), ("old2", 1, True), ("b", 1, False)], planned))
    slices = []
    while batch := ahead.take(1):
        slices.append([key for key, _ in batch])
    assert slices == [["a"], ["b"], ["old1"], ["old2"]]


def test_what_planning_raises_while_a_slice_is_out_comes_out_of_the_next_take():
    def plan() -> Iterator[tuple[str, list[int], bool]]:
        yield "a", [1], False
        raise RuntimeError("the ledger went away")

    ahead = PlanAhead(plan())
    assert [key for key, _ in ahead.take(1)] == ["a"]
    ahead.fill_quietly(1)  # as while the first slice's requests are out: nothing raised here
    assert ahead.done
    with pytest.raises(RuntimeError, match="the ledger went away"):
        ahead.take(1)
    assert ahead.take(1) == []


def test_fill_none_plans_everything():
    planned: list[str] = []
    ahead = PlanAhead(days([("a", 1, False), ("b", 0, False), ("c", 1, True)], planned))
    ahead.fill(None)
    assert planned == ["a", "b", "c"]
    assert ahead.done
