"""Metrics reach a StatsD server on 127.0.0.1 through Airflow's own metrics setup, tagged by meter."""

from __future__ import annotations

import socket
import sqlite3
from collections import defaultdict
from collections.abc import Iterator

import pytest

from tests.conftest import add_rows, add_window_rows, at, run_dag

pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("airflow_db")]


class StatsdListener:
    """A StatsD server: collects what arrives on a UDP port of 127.0.0.1."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []

    def drain(self) -> list[str]:
        """Every line received so far."""
        while True:
            try:
                packet = self.sock.recv(65_535)
            except TimeoutError:
                return self.lines
            self.lines.extend(packet.decode().splitlines())

    def metrics(self, prefix: str) -> dict[tuple[str, frozenset[tuple[str, str]]], list[float]]:
        """``{(name, tags): [values]}`` of the lines whose name starts with ``prefix``."""
        found: dict[tuple[str, frozenset[tuple[str, str]]], list[float]] = defaultdict(list)
        for line in self.drain():
            key, _, rest = line.partition(":")
            name, *tags = key.split(",")
            if name.startswith(prefix):
                found[(name, frozenset(tuple(t.split("=", 1)) for t in tags))].append(
                    float(rest.split("|")[0])
                )
        return found


@pytest.fixture
def statsd(monkeypatch: pytest.MonkeyPatch) -> Iterator[StatsdListener]:
    """Airflow's metrics pointed at a local StatsD listener, with InfluxDB-style tags."""
    listener = StatsdListener()
    for option, value in {
        "STATSD_ON": "True",
        "STATSD_HOST": "127.0.0.1",
        "STATSD_PORT": str(listener.port),
        "STATSD_PREFIX": "airflow",
        "STATSD_INFLUXDB_ENABLED": "True",
    }.items():
        monkeypatch.setenv(f"AIRFLOW__METRICS__{option}", value)
    reset = _set_up_metrics()
    yield listener
    listener.sock.close()
    monkeypatch.undo()
    reset()


def _set_up_metrics():
    """Initialise Airflow's metrics from its configuration, as a task process does when it starts."""
    try:
        from airflow.sdk._shared.observability.metrics import stats
        from airflow.sdk._shared.observability.metrics.base_stats_logger import NoStatsLogger
        from airflow.sdk.observability.metrics import stats_utils
    except ImportError:  # Airflow 3.1: Stats picks its backend from the configuration when imported
        from airflow.stats import Stats

        def reset_31():
            type(Stats).__init__(Stats)  # pick the backend again, from the configuration as it is now
            Stats.instance = None

        reset_31()
        return reset_31
    stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=True)

    def reset():
        stats.initialize(factory=NoStatsLogger, export_legacy_names=True)

    return reset


PLATFORM = ("account", "platform")
TAGS = frozenset({("dag_id", "t_batch_window"), ("task_id", "bill"), ("meter", "ai_tokens_used"), PLATFORM})


def test_a_batch_run_sends_its_counters_and_delivery_time_tagged_by_meter(secret_server, usage_db, statsd):
    add_window_rows(usage_db)

    run_dag("t_batch_window", run_conf={"days": 40})

    got = statsd.metrics("airflow.stripe_meter.")
    counters = {
        name.removeprefix("airflow.stripe_meter."): values
        for (name, tags), values in got.items()
        if tags == TAGS
    }
    # Two rows too old for Stripe and one bad customer id: an alert on skipped_too_old > 0 fires.
    assert counters["skipped_too_old"] == [2]
    assert counters["invalid"] == [1]
    assert counters["sent"] == [1]
    assert counters["events_sent"] == [1]
    # Every counter is sent, zeros included, so each series exists from the first run.
    for name in ("already_recorded", "rejected", "failed", "over", "customer_unknown", "rate_limited"):
        assert counters[name] == [0], name
    [delivery_ms] = counters["delivery"]
    assert 0 <= delivery_ms < 60_000

    statsd.lines.clear()
    run_dag("t_batch_window", run_conf={"days": 40})  # the re-run finds the day billed

    again = statsd.metrics("airflow.stripe_meter.")
    assert again[("airflow.stripe_meter.already_recorded", TAGS)] == [1]
    assert again[("airflow.stripe_meter.sent", TAGS)] == [0]


def test_the_single_event_operator_counts_its_event(secret_server, statsd):
    run_dag("t_meter_event_branch", run_conf={"customer_id": "cus_metrics"})
    run_dag("t_meter_event_branch", run_conf={"customer_id": "cus_metrics", "value": "1.5"})

    got = statsd.metrics("airflow.stripe_meter.")
    tags = frozenset(
        {("dag_id", "t_meter_event_branch"), ("task_id", "record"), ("meter", "ai_tokens_used"), PLATFORM}
    )
    assert got[("airflow.stripe_meter.sent", tags)] == [1]
    assert got[("airflow.stripe_meter.invalid", tags)] == [1]  # the value 1.5 never left
    assert got[("airflow.stripe_meter.requests", tags)] == [1]


def test_the_sensor_counts_its_statuses_and_the_top_up_its_corrections(
    secret_server, usage_db, statsd, monkeypatch
):
    import time

    from airflow_provider_stripe_meter.billing import reconcile

    readings = iter(range(1, 1_000_000))
    monkeypatch.setattr(reconcile, "clock", lambda: time.time() + next(readings))  # settle in pokes
    add_rows(usage_db, [("cus_a", 5, at(-2, 10)), ("cus_a", 7, at(-1, 10))])
    run_dag("t_bill_day", run_conf={"day": at(-1, 0)[:10]})  # yesterday only: the day before is missing

    run_dag("t_reconcile")

    got = statsd.metrics("airflow.stripe_meter.")

    def tags(task_id):
        return frozenset(
            {("dag_id", "t_reconcile"), ("task_id", task_id), ("meter", "ai_tokens_used"), PLATFORM}
        )

    assert got[("airflow.stripe_meter.reconcile.ok", tags("reconcile"))] == [1]
    assert got[("airflow.stripe_meter.reconcile.missing", tags("reconcile"))] == [1]
    assert got[("airflow.stripe_meter.reconcile.over", tags("reconcile"))] == [0]
    assert got[("airflow.stripe_meter.sent", tags("top_up"))] == [1]
    assert got[("airflow.stripe_meter.events_sent", tags("top_up"))] == [1]
    assert secret_server.ledger.totals() == {"cus_a": 12}


def test_each_mapped_instance_sends_its_own_accounts_figures(statsd, usage_db, monkeypatch):
    from airflow_provider_stripe_meter.testing import LocalStripeServer
    from tests.conftest import SECRET_KEY, share_clock
    from tests.operators.test_mapping import ACCOUNTS, add_account_rows, rows_for

    with LocalStripeServer(meters=["ai_tokens_used"], accounts=ACCOUNTS, api_keys=[SECRET_KEY]) as server:
        monkeypatch.setenv("AIRFLOW_CONN_STRIPE_DEFAULT", server.connection_json(SECRET_KEY))
        share_clock(monkeypatch, server)
        with sqlite3.connect(usage_db) as con:
            con.execute(
                "CREATE TABLE connect_usage (account TEXT, customer_id TEXT, tokens INTEGER, used_at TEXT)"
            )
        # Three customers per account, and two more on the last account only.
        add_account_rows(usage_db, rows_for(ACCOUNTS, -1))
        add_account_rows(usage_db, [(ACCOUNTS[-1], f"cus_extra{n}", 4, at(-1, 60)) for n in range(2)])

        run_dag("t_mapped_accounts")

    got = statsd.metrics("airflow.stripe_meter.")
    sent = {
        dict(tags)["account"]: values
        for (name, tags), values in got.items()
        if name == "airflow.stripe_meter.sent" and dict(tags)["task_id"] == "bill"
    }
    # One series per account (the platform billed nothing), each with its own instance's figure.
    assert sent == {ACCOUNTS[0]: [3], ACCOUNTS[1]: [3], ACCOUNTS[2]: [5]}
