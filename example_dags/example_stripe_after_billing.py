"""Run work once billing is done: a DAG scheduled on the meter's Asset.

The batch operator of ``example_stripe_daily_usage`` bills the meter ``ai_tokens_used`` and, when
its task succeeds, updates the Asset ``stripe://platform/meters/ai_tokens_used`` with the run's
figures as the event's extra. This DAG is scheduled on that Asset, so it runs after each
billing run (to finalize invoices, refresh a revenue dashboard, ...) and reads what was billed.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_stripe_meter.assets.stripe import create_asset

# [START howto_billing_asset]
AI_TOKENS_METER = create_asset(event_name="ai_tokens_used")

with DAG(
    dag_id="example_stripe_after_billing",
    schedule=[AI_TOKENS_METER],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "stripe"],
) as dag:

    @task
    def finalize_invoices(triggering_asset_events=None) -> list[str]:
        days = []
        for event in triggering_asset_events[AI_TOKENS_METER]:
            # The billing run's figures: days, customers, sent, already recorded, totals, problems.
            print(
                f"billed {event.extra['days']}: {event.extra['totals']} (success: {event.extra['success']})"
            )
            days += event.extra["days"]
        return days

    finalize_invoices()
# [END howto_billing_asset]
