"""Apache Airflow provider that records usage-based billing in Stripe as meter events."""

from __future__ import annotations

from airflow_provider_stripe_meter.version import __version__

__all__ = ["__version__"]
