"""A local, spec-following Stripe billing-meter server for tests, demos and benchmarks."""

from __future__ import annotations

from airflow_provider_stripe_meter.testing.server import DEFAULT_API_KEY, LocalStripeServer

__all__ = ["DEFAULT_API_KEY", "LocalStripeServer"]
