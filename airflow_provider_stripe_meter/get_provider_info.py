"""The provider's description for Airflow (entry point ``apache_airflow_provider``).

Kept in a module of its own, as Airflow's official providers generate theirs, so that reading
it imports nothing else of the package.
"""

from __future__ import annotations

from airflow_provider_stripe_meter.version import __version__

_OPTIONAL_STR = {"type": ["string", "null"]}


def get_provider_info() -> dict:
    """Describe the provider to Airflow (entry point ``apache_airflow_provider``)."""
    return {
        "package-name": "airflow-provider-stripe-meter",
        "name": "Stripe Meter",
        "description": "Record usage-based billing in Stripe as meter events, exactly once.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Stripe Billing",
                "external-doc-url": "https://docs.stripe.com/billing/subscriptions/usage-based",
                "tags": ["service"],
            }
        ],
        "hooks": [
            {
                "integration-name": "Stripe Billing",
                "python-modules": ["airflow_provider_stripe_meter.hooks.stripe"],
            }
        ],
        "operators": [
            {
                "integration-name": "Stripe Billing",
                "python-modules": [
                    "airflow_provider_stripe_meter.operators.meter_event",
                    "airflow_provider_stripe_meter.operators.meter_event_batch",
                    "airflow_provider_stripe_meter.operators.meter_event_correction",
                    "airflow_provider_stripe_meter.operators.invoice_check",
                ],
            }
        ],
        "sensors": [
            {
                "integration-name": "Stripe Billing",
                "python-modules": ["airflow_provider_stripe_meter.sensors.meter_reconcile"],
            }
        ],
        "triggers": [
            {
                "integration-name": "Stripe Billing",
                "python-modules": ["airflow_provider_stripe_meter.triggers.meter_reconcile"],
            }
        ],
        "extra-links": ["airflow_provider_stripe_meter.links.stripe.StripeMeterLink"],
        "asset-uris": [
            {
                "schemes": ["stripe"],
                "handler": "airflow_provider_stripe_meter.assets.stripe.sanitize_uri",
                "factory": "airflow_provider_stripe_meter.assets.stripe.create_asset",
                "to_openlineage_converter": (
                    "airflow_provider_stripe_meter.assets.stripe.convert_asset_to_openlineage"
                ),
            }
        ],
        "connection-types": [
            {
                "hook-class-name": "airflow_provider_stripe_meter.hooks.stripe.StripeHook",
                "hook-name": "Stripe",
                "connection-type": "stripe",
                "conn-fields": {
                    "stripe_version": {
                        "label": "Stripe API version",
                        "schema": _OPTIONAL_STR,
                        "description": "Pin an API version, e.g. 2026-07-29.dahlia; empty uses the SDK's.",
                    },
                    "stripe_account": {
                        "label": "Connected account (Connect)",
                        "schema": _OPTIONAL_STR,
                        "description": "acct_... to act on behalf of a connected account.",
                    },
                    "max_network_retries": {
                        "label": "Max network retries",
                        "schema": {"type": ["integer", "null"], "default": 3, "minimum": 0},
                        "description": "SDK retries of connection errors, 409 and 5xx, same Idempotency-Key.",
                    },
                    "timeout": {
                        "label": "Request timeout (seconds)",
                        "schema": {"type": ["number", "null"], "default": 30},
                    },
                    "api_base": {
                        "label": "API base URL",
                        "schema": _OPTIONAL_STR,
                        "description": "Any Stripe-compatible server (a proxy, the local test server).",
                    },
                    "meter_events_api_base": {
                        "label": "Meter events API base URL",
                        "schema": _OPTIONAL_STR,
                        "description": "Host of the v2 meter event stream; defaults to Stripe's.",
                    },
                    "summary_lag": {
                        "label": "Summary lag (seconds)",
                        "schema": {"type": ["number", "null"], "default": 300, "minimum": 0},
                        "description": "How long Stripe's meter summaries may trail events; a day sent "
                        "to more recently is read only once this has passed.",
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["host", "schema", "login", "port"],
                    "relabeling": {"password": "API key"},
                    "placeholders": {"password": "sk_live_... or rk_live_... (restricted key)"},
                },
            }
        ],
    }
