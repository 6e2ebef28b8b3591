"""Packaging: Airflow finds the provider, its metadata is valid, and parsing stays light."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from airflow_provider_stripe_meter.get_provider_info import get_provider_info


def test_entry_point_returns_provider_info():
    [entry] = [
        ep
        for ep in entry_points(group="apache_airflow_provider")
        if ep.value.startswith("airflow_provider_stripe")
    ]
    info = entry.load()()
    assert info["package-name"] == "airflow-provider-stripe-meter"
    [conn] = info["connection-types"]
    assert conn["connection-type"] == "stripe"
    assert conn["ui-field-behaviour"]["relabeling"] == {"password": "API key"}
    assert set(conn["conn-fields"]) >= {"stripe_version", "stripe_account", "max_network_retries", "api_base"}


def test_provider_info_matches_airflows_schema():
    import jsonschema
    from airflow import providers_manager

    schema_path = Path(providers_manager.__file__).with_name("provider_info.schema.json")
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(get_provider_info(), schema)


@pytest.mark.airflow
def test_airflow_lists_the_provider_its_connection_type_link_and_trigger(airflow_db):
    # `airflow providers list|hooks|links|triggers -o json`, run through Airflow's own CLI parser
    # in one process: each command as a user types it, without paying Airflow's start-up four times.
    code = (
        "from airflow.cli.cli_parser import get_parser\n"
        "for command in ('list', 'hooks', 'links', 'triggers'):\n"
        "    print('=== ' + command, flush=True)\n"
        "    args = get_parser().parse_args(['providers', command, '-o', 'json'])\n"
        "    args.func(args)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]
    outputs = dict(part.split("\n", 1) for part in done.stdout.split("=== ")[1:])
    assert "airflow-provider-stripe-meter" in outputs["list"], done.stderr[-2000:]
    assert "StripeHook" in outputs["hooks"], done.stderr[-2000:]
    assert "airflow_provider_stripe_meter.links.stripe.StripeMeterLink" in outputs["links"]
    assert "airflow_provider_stripe_meter.triggers.meter_reconcile" in outputs["triggers"]


def test_importing_the_package_imports_neither_stripe_nor_openlineage():
    # airflow.sdk itself reads every provider's metadata (the OpenLineage provider's too): what
    # counts is what importing this package adds on top of it.
    code = (
        "import sys, importlib, pkgutil, airflow.sdk\n"
        "before = set(sys.modules)\n"
        "import airflow_provider_stripe_meter as p\n"
        "for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.'):\n"
        "    if '.testing' not in m.name: importlib.import_module(m.name)\n"
        "print('stripe' in sys.modules)\n"
        "print(sorted(m for m in set(sys.modules) - before if 'openlineage' in m))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["False", "[]"], out.stdout
