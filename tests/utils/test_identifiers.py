"""Identifiers are deterministic, at most 100 characters, readable where they fit, never shared."""

from __future__ import annotations

import pytest

from airflow_provider_stripe_meter.utils.identifiers import (
    bounded_identifier,
    task_identifier,
)


def test_task_identifier_is_readable_and_stable():
    first = task_identifier("billing", "record", "scheduled__2026-11-23T00:00:00+00:00", -1)
    assert first == "airflow:billing:record:scheduled__2026-11-23T00:00:00+00:00:-1"
    assert task_identifier("billing", "record", "scheduled__2026-11-23T00:00:00+00:00", -1) == first
    assert task_identifier("billing", "record", "scheduled__2026-11-23T00:00:00+00:00", 3) != first


def test_long_identifiers_are_bounded_and_distinct():
    long_dag = "d" * 90
    a = task_identifier(long_dag, "record", "manual__2026-11-23T00:00:00+00:00", 0)
    b = task_identifier(long_dag, "record", "manual__2026-11-23T00:00:00+00:00", 1)
    assert len(a) == len(b) == 100
    assert a != b
    assert a.startswith("airflow:ddd")


@pytest.mark.parametrize("limit", [100, 3], ids=["readable", "hashed"])
def test_separator_ambiguity_does_not_collide(limit):
    pairs = [(("a:b", "c"), ("a", "b:c")), (("a%3Ab", "c"), ("a:b", "c")), (("a%", "b"), ("a", "%b"))]
    for left, right in pairs:
        assert bounded_identifier(*left, limit=limit) != bounded_identifier(*right, limit=limit)


def test_readable_identifiers_escape_only_what_needs_it():
    assert (
        bounded_identifier("usage", "api_calls", "cus_1", "2026-11-23") == "usage:api_calls:cus_1:2026-11-23"
    )
    assert bounded_identifier("usage", "a:b", "cus_%1") == "usage:a%3Ab:cus_%251"


def test_length_limit_is_exact_and_the_hash_covers_the_whole():
    at_limit = bounded_identifier("x" * 98, "y")
    assert (len(at_limit), "~" in at_limit) == (100, False)
    over = bounded_identifier("x" * 98, "yz")
    assert len(over) == 100
    assert over.startswith("x" * 75 + "~")
    assert over != bounded_identifier("x" * 98, "zy")  # differs only after the readable head
