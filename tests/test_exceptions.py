"""One tree of errors: each class users catch is one plain kind, and fails the task at once
exactly when its kind cannot be retried."""

from __future__ import annotations

import inspect

import pytest
from airflow.providers.common.compat.sdk import AirflowFailException

from airflow_provider_stripe_meter import exceptions
from airflow_provider_stripe_meter.billing.meters import MeterUnsupportedError
from airflow_provider_stripe_meter.utils import errors

#: Every kind but ``Withheld``, a signal inside delivery that never leaves it.
KINDS = [
    c
    for c in vars(errors).values()
    if inspect.isclass(c) and issubclass(c, errors.MeterFailure) and c is not errors.Withheld
]
PUBLIC = [
    c for c in vars(exceptions).values() if inspect.isclass(c) and issubclass(c, exceptions.StripeMeterError)
]


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_a_class_fails_the_task_at_once_exactly_when_its_kind_cannot_be_retried(cls):
    assert issubclass(cls, AirflowFailException) is (not cls.retryable)


@pytest.mark.parametrize("kind", KINDS, ids=lambda c: c.__name__)
def test_a_kind_the_core_raises_reaches_airflow_as_its_class_with_its_message_and_details(kind):
    err = kind("it failed", {"type": "example"})
    with pytest.raises(exceptions.StripeMeterError) as raised, exceptions.raised_for_airflow():
        raise err
    assert isinstance(raised.value, kind)
    assert raised.value.__cause__ is err
    assert str(raised.value) == "it failed"
    assert raised.value.details == {"type": "example"}
    assert isinstance(raised.value, AirflowFailException) is (not kind.retryable)


def test_a_meter_the_core_cannot_bill_fails_the_task_without_its_retries():
    with pytest.raises(exceptions.StripeMeterUnsupportedError) as raised, exceptions.raised_for_airflow():
        raise MeterUnsupportedError("meter mtr_1 has formula 'mean'", {"type": "meter_unsupported"})
    assert isinstance(raised.value, AirflowFailException)
    assert raised.value.details == {"type": "meter_unsupported"}


def test_the_provider_s_own_errors_and_any_other_go_through_as_they_are():
    own = exceptions.StripeAccountInvalidError(
        "Connection 'stripe_default': ...", {"code": "account_invalid"}
    )
    for err in (own, KeyError("bug")):
        with pytest.raises(type(err)) as raised, exceptions.raised_for_airflow():
            raise err
        assert raised.value is err
