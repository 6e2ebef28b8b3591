"""The docs agree with the code: documented defaults and rates, parameters, links, the PyPI page.

A figure in the docs that stops agreeing with the code fails here, so the next drift is caught
where it happens.
"""

from __future__ import annotations

import inspect
import re
from datetime import timedelta
from pathlib import Path

import pytest

from airflow_provider_stripe_meter.billing import periods
from airflow_provider_stripe_meter.operators.base import StripeBaseOperator, StripeUsageSourceOperator
from airflow_provider_stripe_meter.operators.invoice_check import StripeMeterInvoiceCheckOperator
from airflow_provider_stripe_meter.operators.meter_event import StripeMeterEventOperator
from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator
from airflow_provider_stripe_meter.operators.meter_event_correction import (
    StripeMeterEventCancelOperator,
    StripeMeterTopUpOperator,
)
from airflow_provider_stripe_meter.sensors.meter_reconcile import StripeMeterReconcileSensor
from airflow_provider_stripe_meter.testing import billing
from airflow_provider_stripe_meter.utils import delivery

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = {p.name: p.read_text() for p in DOCS.glob("*.md")}
OPERATORS = (
    StripeMeterEventBatchOperator,
    StripeMeterEventOperator,
    StripeMeterInvoiceCheckOperator,
    StripeMeterTopUpOperator,
    StripeMeterEventCancelOperator,
    StripeMeterReconcileSensor,
    StripeUsageSourceOperator,
    StripeBaseOperator,
)


def _defaults() -> dict[str, set[object]]:
    """Every operator parameter's default(s), by name."""
    found: dict[str, set[object]] = {}
    for cls in OPERATORS:
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if param.default is not inspect.Parameter.empty:
                found.setdefault(name, set()).add(param.default)
    return found


def _as_value(text: str) -> object | None:
    """A documented default as a value: ``1,000`` -> 1000, ``10 minutes`` -> a timedelta."""
    text = text.strip()
    if m := re.fullmatch(r"([\d,]+)", text):
        return int(m.group(1).replace(",", ""))
    if m := re.fullmatch(r"(\d+) (second|minute|hour|day)s?", text):
        return timedelta(**{m.group(2) + "s": int(m.group(1))})
    return None


def test_every_documented_default_is_the_one_in_the_signature():
    defaults = _defaults()
    checked = 0
    for page, text in PAGES.items():
        for name, value in re.findall(r"`([a-z_]+)` \((?:default )?([^)]*)\)", text):
            wanted = _as_value(value)
            if name not in defaults or wanted is None:
                continue
            assert wanted in defaults[name], (
                f"{page}: `{name}` documented as {value}, code says {defaults[name]}"
            )
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize(
    ("page", "phrase", "value"),
    [
        ("guarantees.md", r"default (\d+)/s with a test key", delivery.DEFAULT_MAX_RPS["test"]),
        ("guarantees.md", r"live key ([\d,]+) meter events/s", delivery.DEFAULT_MAX_RPS["live"]),
        ("guarantees.md", r"(\d+)/s for a connected account", delivery.default_max_rps(True, connected=True)),
        ("guarantees.md", r"(\d+) summary reads/s", delivery.DEFAULT_READ_RPS["live"]),
        ("going-live.md", r"([\d,]+) meter events a second", delivery.DEFAULT_MAX_RPS["live"]),
        ("going-live.md", r"(\d+) for a connected account", delivery.default_max_rps(True, connected=True)),
        ("invoices.md", r"finalizes more than (\d+) minutes from now", periods.FINALIZATION_MARGIN / 60),
        ("invoices.md", r"(\d+) hour by default", billing.DEFAULT_GRACE / 3600),
    ],
)
def test_documented_rates_and_limits_are_the_codes(page, phrase, value):
    found = re.search(phrase, " ".join(PAGES[page].split()))
    assert found, f"{page} no longer says {phrase!r}"
    assert float(found.group(1).replace(",", "")) == value, (page, phrase, value)


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_every_parameter_is_documented_in_the_reference(cls):
    """The API reference is the docstrings: each parameter of ``__init__`` has a ``:param``."""
    own = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "kwargs")]
    documented = set(re.findall(r":param (\w+):", cls.__doc__ or ""))
    # Parameters of a base are documented there, and the class names the base.
    inherited = {
        n
        for base in cls.__mro__[1:]
        if base in OPERATORS
        for n in inspect.signature(base.__init__).parameters
    }
    missing = [n for n in own if n not in documented and n not in inherited]
    assert not missing, f"{cls.__name__} does not document {missing}"


def test_every_page_is_in_the_table_of_contents_and_every_relative_link_resolves():
    toc = PAGES["index.md"]
    for page in PAGES:
        if page != "index.md":
            assert f"\n{page[:-3]}\n" in toc, f"{page} is not in the docs' table of contents"
    for source in [*DOCS.glob("*.md"), ROOT / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", source.read_text()):
            assert (source.parent / target).exists(), f"{source.name} links to {target}, which does not exist"


def test_the_pypi_page_starts_with_installing_and_links_only_absolutely():
    text = (ROOT / "PYPI.md").read_text()
    # The install line names an extra: without one, SQLite and PostgreSQL lack their provider.
    assert 'pip install "airflow-provider-stripe-meter[' in text.split("\n## ")[0]
    assert "./dev" not in text, "the sdist and wheel do not ship ./dev"
    relative = re.findall(r"\]\((?!https?://)([^)]+)\)", text)
    assert not relative, f"relative links 404 on PyPI: {relative}"


def test_the_layout_in_the_testing_page_names_every_part_of_the_package():
    package = ROOT / "airflow_provider_stripe_meter"
    layout = " ".join(PAGES["testing.md"].split())
    parts = [p.name + "/" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    parts += [
        p.name
        for p in package.glob("*.py")
        if p.name not in ("__init__.py", "version.py", "get_provider_info.py")
    ]
    missing = [p for p in parts if f"`{p}" not in layout and f"/{p}`" not in layout]
    assert not missing, f"docs/testing.md's layout does not name {missing}"


def test_the_documented_tables_have_the_codes_columns():
    """Every CREATE TABLE in the ledger page names each column the code writes, in every dialect."""
    from airflow_provider_stripe_meter.ledger import customers, schema, subscriptions

    text = PAGES["ledger.md"]
    tables = {
        "stripe_meter_ledger (": schema.COLUMN_NAMES,
        "STRIPE_METER_LEDGER (": schema.COLUMN_NAMES,
        "stripe_meter_ledger_subscriptions (": subscriptions.NAMES,
        "stripe_meter_ledger_subscriptions_sync (": tuple(n for n, _ in subscriptions.SYNC_COLUMNS),
        "stripe_meter_ledger_customers (": customers.NAMES,
        "STRIPE_METER_LEDGER_CUSTOMERS (": customers.NAMES,
    }
    checked = 0
    for block in re.findall(r"CREATE TABLE IF NOT EXISTS [\w.]+ \(.*?\n\);", text, flags=re.S):
        head = block.split("\n")[0]
        names = next((names for marker, names in tables.items() if head.endswith(marker)), None)
        assert names is not None, head
        declared = set(
            re.findall(
                r"(?:^|[,(]\s*)(\w+) (?:VARCHAR|CHAR|INTEGER|BIGINT|NUMBER|FLOAT|DOUBLE|STRING|INT64)",
                block,
                flags=re.M,
            )
        )
        assert declared == set(names), f"{head}: {sorted(set(names) ^ declared)}"
        checked += 1
    assert checked >= 5
