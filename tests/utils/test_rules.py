"""Every input rule, good and bad values, with the message naming field, value and rule."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pendulum
import pytest

from airflow_provider_stripe_meter.utils.rules import (
    WHOLE_NUMBER_ADVICE,
    MeterEventInputError,
    check_time_window,
    validate_customer_id,
    validate_event_name,
    validate_identifier,
    validate_meter_event,
    validate_timestamp,
    validate_value,
)

NOW = 1_790_000_000  # 2026-09-21T14:13:20Z
DAY = 86400


@pytest.mark.parametrize(
    ("check", "value", "field", "rule"),
    [
        pytest.param(validate_event_name, "", "event_name", "non-empty", id="event-name-empty"),
        pytest.param(validate_event_name, None, "event_name", "non-empty", id="event-name-none"),
        pytest.param(
            validate_event_name, "x" * 101, "event_name", "at most 100 characters", id="event-name-101"
        ),
        pytest.param(validate_event_name, " tokens", "event_name", "whitespace", id="event-name-padded"),
        pytest.param(validate_customer_id, "", "customer_id", "non-empty", id="customer-empty"),
        pytest.param(validate_customer_id, 42, "customer_id", "non-empty string", id="customer-int"),
        pytest.param(validate_customer_id, "user_42", "customer_id", "'cus_'", id="customer-not-stripe"),
        pytest.param(validate_customer_id, "cus_", "customer_id", "'cus_'", id="customer-prefix-only"),
        pytest.param(validate_customer_id, "cus_a b", "customer_id", "no whitespace", id="customer-space"),
        pytest.param(validate_value, True, "value", "not a boolean", id="value-bool"),
        pytest.param(validate_value, None, "value", "not a boolean or None", id="value-none"),
        pytest.param(validate_value, math.nan, "value", "whole number", id="value-nan"),
        pytest.param(validate_value, math.inf, "value", "whole number", id="value-inf"),
        pytest.param(validate_value, 1.5, "value", "whole number", id="value-float-fraction"),
        pytest.param(validate_value, Decimal("2.25"), "value", "whole number", id="value-decimal-fraction"),
        pytest.param(validate_value, Decimal("NaN"), "value", "whole number", id="value-decimal-nan"),
        pytest.param(validate_value, "12.5", "value", "whole number", id="value-string-fraction"),
        pytest.param(validate_value, "abc", "value", "whole number", id="value-string-text"),
        pytest.param(validate_value, "", "value", "whole number", id="value-string-empty"),
        pytest.param(validate_value, 10**15, "value", "at most 15 digits", id="value-16-digits"),
        pytest.param(
            validate_value, "-1000000000000000", "value", "at most 15 digits", id="value-16-digits-neg"
        ),
        pytest.param(validate_value, [1], "value", "got list", id="value-list"),
        pytest.param(validate_identifier, "", "identifier", "non-empty", id="identifier-empty"),
        pytest.param(
            validate_identifier, "i" * 101, "identifier", "at most 100 characters", id="identifier-101"
        ),
        pytest.param(validate_identifier, 7, "identifier", "non-empty string", id="identifier-int"),
    ],
)
def test_bad_values_are_rejected_with_field_value_and_rule(check, value, field, rule):
    with pytest.raises(MeterEventInputError) as caught:
        check(value)
    err = caught.value
    assert (err.field, err.rule.find(rule) >= 0) == (field, True), err.rule
    message = str(err)
    assert message.startswith(f"{field} ")
    assert repr(value)[:50] in message
    assert rule in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(7, 7, id="int"),
        pytest.param(0, 0, id="zero"),
        pytest.param("42", 42, id="string"),
        pytest.param(" 42 ", 42, id="string-padded"),
        pytest.param("+42", 42, id="string-plus"),
        pytest.param("1e3", 1000, id="string-exponent"),
        pytest.param("5.0", 5, id="string-integral-decimal"),
        pytest.param(Decimal("3"), 3, id="decimal"),
        pytest.param(Decimal("3.000"), 3, id="decimal-integral"),
        pytest.param(9.0, 9, id="float-integral"),
        pytest.param(999_999_999_999_999, 999_999_999_999_999, id="15-digits"),
        pytest.param("-5", -5, id="negative"),
    ],
)
def test_good_values_are_normalised_to_int(value, expected):
    result = validate_value(value)
    assert result == expected
    assert type(result) is int


def test_good_names_customers_and_identifiers_pass_through():
    assert validate_event_name("e" * 100) == "e" * 100
    assert validate_customer_id("cus_NffrFeUfNV2Hib") == "cus_NffrFeUfNV2Hib"
    assert validate_identifier("i" * 100) == "i" * 100
    assert validate_identifier(None) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(NOW - DAY, NOW - DAY, id="unix-int"),
        pytest.param(str(NOW - DAY), NOW - DAY, id="unix-string"),
        pytest.param(float(NOW - DAY), NOW - DAY, id="unix-float"),
        pytest.param(datetime.fromtimestamp(NOW - DAY, tz=timezone.utc), NOW - DAY, id="aware-datetime"),
        pytest.param(pendulum.from_timestamp(NOW - DAY, tz="Europe/Paris"), NOW - DAY, id="pendulum"),
        pytest.param("2026-09-20T14:13:20+00:00", NOW - DAY, id="iso-offset"),
        pytest.param("2026-09-20T14:13:20Z", NOW - DAY, id="iso-z"),
        pytest.param("2026-09-20T16:13:20+02:00", NOW - DAY, id="iso-other-zone"),
        # Zone-less: read as UTC, as the batch operator reads its rows.
        pytest.param(datetime(2026, 9, 20, 14, 13, 20), NOW - DAY, id="naive-datetime-as-utc"),
        pytest.param("2026-09-20T14:13:20", NOW - DAY, id="naive-iso-as-utc"),
        pytest.param("2026-09-20 14:13:20", NOW - DAY, id="naive-sql-as-utc"),
        pytest.param(NOW - 35 * DAY, NOW - 35 * DAY, id="oldest-allowed"),
        pytest.param(NOW + 300, NOW + 300, id="five-minutes-ahead"),
        pytest.param(None, None, id="none-means-now"),
        pytest.param("", None, id="blank-means-now"),
    ],
)
def test_timestamps_in_every_accepted_form(value, expected):
    assert validate_timestamp(value, NOW) == expected


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        pytest.param(NOW - 35 * DAY - 1, "within the past 35 days", id="too-old"),
        pytest.param(NOW + 301, "at most 5 minutes in the future", id="too-far-ahead"),
        pytest.param("yesterday", "ISO-8601", id="unparseable"),
        pytest.param(True, "unix seconds", id="bool"),
        pytest.param(math.inf, "finite", id="infinite"),
        pytest.param([NOW], "got list", id="list"),
    ],
)
def test_bad_timestamps_are_rejected(value, rule):
    with pytest.raises(MeterEventInputError) as caught:
        validate_timestamp(value, NOW)
    assert caught.value.field == "timestamp"
    assert rule in str(caught.value)
    assert repr(value)[:40] in str(caught.value)


def test_narrower_window_for_batches():
    with pytest.raises(MeterEventInputError, match="within the past 34 days"):
        check_time_window(NOW - 34 * DAY - 1, NOW, past_window=timedelta(days=34))


def test_whole_event_is_normalised():
    event = validate_meter_event(
        event_name="ai_tokens_used",
        customer_id="cus_1",
        value="12",
        identifier=None,
        timestamp=str(NOW),
        now=NOW,
    )
    assert (event.value, event.timestamp, event.identifier) == (12, NOW, None)


def test_error_details_are_json_safe():
    with pytest.raises(MeterEventInputError) as caught:
        validate_value(Decimal("1.5"))
    assert caught.value.to_dict() == {
        "type": "validation_error",
        "field": "value",
        "value": "Decimal('1.5')",
        "rule": WHOLE_NUMBER_ADVICE,
    }
