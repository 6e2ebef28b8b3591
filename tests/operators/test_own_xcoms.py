"""Which keys of the batch operator's result are XComs of their own (the whole result is the
return value): the headline ones, none with ``do_xcom_push=False``, every key with
``multiple_outputs=True`` (Airflow pushes them then)."""

from __future__ import annotations

from typing import Any

from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator


class _Ti:
    """Records what a task pushes."""

    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


RESULT = {"success": True, "sent": 3, "ledger": {"written": 3}, "samples": {}, "report_uri": None}


def _pushed(**kwargs: Any) -> dict[str, Any]:
    operator = StripeMeterEventBatchOperator(
        task_id="bill", event_name="ai_tokens_used", sql="SELECT 1", sql_conn_id="usage_db", **kwargs
    )
    ti = _Ti()
    operator.push_own_xcoms({"ti": ti}, RESULT)  # type: ignore[arg-type]
    return ti.pushed


def test_the_headline_keys_present_in_the_result_are_pushed_on_their_own():
    assert _pushed() == {"success": True, "sent": 3, "report_uri": None}


def test_nothing_is_pushed_without_xcom_push_or_twice_with_multiple_outputs():
    assert _pushed(do_xcom_push=False) == {}
    assert _pushed(multiple_outputs=True) == {}  # Airflow pushes every key itself then
