"""Identifiers are deterministic, at most 100 characters, readable where they fit, never shared."""

from __future__ import annotations

from datetime import date

from airflow_provider_stripe_meter.identifiers import bounded_identifier, daily_identifier, task_identifier


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


def test_separator_ambiguity_does_not_collide():
    assert bounded_identifier("a:b", "c", limit=3) != bounded_identifier("a", "b:c", limit=3)


def test_daily_identifier_names_meter_customer_and_day():
    assert (
        daily_identifier("ai_tokens_used", "cus_1", date(2026, 11, 23))
        == "usage:ai_tokens_used:cus_1:2026-11-23"
    )
    assert daily_identifier("e", "cus_1", date(2026, 11, 23), prefix="eu") == "eu:e:cus_1:2026-11-23"
    assert len(daily_identifier("e" * 100, "cus_1", date(2026, 11, 23))) == 100
