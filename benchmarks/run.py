"""Benchmarks of the batch operator, each printed as a ratio against a baseline measured in the same run.

    ./dev bench                 # everything (about 25 minutes; --only ledger alone about 10)
    ./dev bench --only v1       # one of: v1, stream, stream-unlimited, sql, import, ledger, periods
    ./dev bench --only sql --sql-db duckdb   # the sql figure on PostgreSQL (a DSN) or DuckDB

Every figure runs the real stripe SDK over HTTP against the local Stripe server on 127.0.0.1
with the latency and limits named in its heading, and the operator inside a real Airflow task
(``dag.test()`` on a throwaway SQLite metadata database). The ledger lives in PostgreSQL when
``STRIPE_METER_BENCH_PG_DSN`` (or ``STRIPE_METER_TEST_PG_DSN``) names one, in SQLite otherwise;
its table is dropped before each figure. The SQL figure runs in fresh processes so that peak
memory (resident set, sampled every 2 ms) belongs to one path alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.ledger.entries import Entry

ROOT = Path(__file__).resolve().parent.parent
EVENT = "ai_tokens_used"


def _airflow_env() -> None:
    home = Path(tempfile.mkdtemp(prefix="stripe-meter-bench-"))
    os.environ.setdefault("AIRFLOW_HOME", str(home))
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(Path(os.environ["AIRFLOW_HOME"]) / "dags"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")


def _rows(customers: int, per_customer: int, seed: int = 1) -> list[tuple[str, int, str]]:
    """Usage rows for yesterday (UTC), ``per_customer`` rows for each customer."""
    import pendulum

    rng = random.Random(seed)
    day = pendulum.yesterday("UTC")
    return [
        (
            f"cus_bench{c:06d}",
            rng.randrange(1, 10_000),
            day.add(seconds=rng.randrange(86_400)).strftime("%Y-%m-%d %H:%M:%S"),
        )
        for c in range(customers)
        for _ in range(per_customer)
    ]


def _operator(**kwargs: Any):
    from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator

    return StripeMeterEventBatchOperator(task_id="bench", event_name=EVENT, **kwargs)


_BENCH_DAG = """
import json, os, time

import pendulum
from airflow.sdk import DAG, task

with DAG("stripe_meter_bench", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):

    @task
    def bench(**context):
        from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator
        from airflow_provider_stripe_meter.sensors.meter_reconcile import StripeMeterReconcileSensor

        with open(os.environ["STRIPE_METER_BENCH_ARGS"]) as handle:
            kwargs = json.load(handle)
        if kwargs.pop("kind", "batch") == "sensor":
            op = StripeMeterReconcileSensor(task_id="bench", mode="poke", **kwargs)
        else:
            op = StripeMeterEventBatchOperator(task_id="bench", **kwargs)
        started = time.monotonic()
        outcome = op.execute(context)
        outcome["wall"] = time.monotonic() - started
        with open(os.environ["STRIPE_METER_BENCH_OUT"], "w") as handle:
            json.dump(outcome, handle, default=str)

    bench()
"""


def _airflow_before_3_2() -> bool:
    from airflow import __version__
    from packaging.version import Version

    return Version(__version__) < Version("3.2")


def _bench_dags(home: Path) -> Path:
    """The folder of the bench's DAG file, written (and the metadata database set up) on first use.

    ``STRIPE_METER_BENCH_DAGS`` names a folder that a DAG bundle of an Airflow already set up
    reads (the test suite's, whose processes run the benches at a tiny size); otherwise the DAG
    goes in ``$AIRFLOW_HOME/dags``, the default bundle, of a metadata database made here.
    """
    given = os.environ.get("STRIPE_METER_BENCH_DAGS")
    dags = Path(given) if given else home / "dags"
    if (dags / "stripe_meter_bench.py").exists():
        return dags
    dags.mkdir(parents=True, exist_ok=True)
    (dags / "stripe_meter_bench.py").write_text(_BENCH_DAG)
    airflow = Path(sys.executable).with_name("airflow")
    if not given:
        subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True)
    if _airflow_before_3_2():
        # Airflow 3.1's dag.test() needs the DAG serialized already; 3.2 and later serialize the
        # DAG's bundle on every call.
        subprocess.run([str(airflow), "dags", "reserialize"], check=True, capture_output=True)
    return dags


def _run_in_task(**kwargs: Any) -> dict[str, Any]:
    """Run the batch operator inside a real Airflow task (dag.test()) and return its outcome.

    ``wall`` is the operator's own time, end to end (reading, looking up, marking, sending).
    """
    home = Path(os.environ["AIRFLOW_HOME"])
    dags = _bench_dags(home)
    args, out = home / "bench-args.json", home / "bench-out.json"
    if kwargs.get("kind", "batch") == "batch" and "ledger_conn_id" not in kwargs:
        _ledger_database()
        _reset_ledger()
        kwargs["ledger_conn_id"] = "bench_ledger"
    args.write_text(json.dumps({"event_name": EVENT, **kwargs}))
    os.environ["STRIPE_METER_BENCH_ARGS"], os.environ["STRIPE_METER_BENCH_OUT"] = str(args), str(out)
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.1
        from airflow.models.dagbag import DagBag
    DagBag(dag_folder=str(dags)).get_dag("stripe_meter_bench").test()
    return json.loads(out.read_text())


class RemoteServer:
    """The local Stripe server in its own process, as Stripe would be: it must not share our GIL."""

    def __init__(self, *args: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "airflow_provider_stripe_meter.testing",
                "--port",
                str(port),
                "--meter",
                EVENT,
                *args,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # the banner: serving
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> RemoteServer:
        from airflow_provider_stripe_meter.testing import DEFAULT_API_KEY

        os.environ["AIRFLOW_CONN_STRIPE_DEFAULT"] = json.dumps(
            {
                "conn_type": "stripe",
                "password": DEFAULT_API_KEY,
                # This server's summaries show every event at once (no --summary-lag).
                "extra": {"api_base": self.url, "meter_events_api_base": self.url, "summary_lag": 0},
            }
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def set_clock_offset(self, seconds: float) -> None:
        """Move the server's clock to ``seconds`` from the wall clock."""
        from airflow_provider_stripe_meter.testing import DEFAULT_API_KEY

        request = urllib.request.Request(
            f"{self.url}/_local/clock",
            data=f"offset={seconds}".encode(),
            headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()

    def summary(self) -> dict[str, Any]:
        from airflow_provider_stripe_meter.testing import DEFAULT_API_KEY

        request = urllib.request.Request(
            f"{self.url}/_local/summary", headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)


def _check_exactly_once(server: RemoteServer, expected_events: int) -> tuple[int, int]:
    summary = server.summary()
    duplicates = summary["events"] - summary["unique_identifiers"]
    lost = expected_events - summary["unique_identifiers"]
    return duplicates, lost


def bench_v1(events: int, baseline_events: int) -> None:
    """v1: the operator against a server limited to 100 requests/s, vs a sequential SDK loop."""
    import stripe

    from airflow_provider_stripe_meter.testing import DEFAULT_API_KEY

    limit = 100.0
    print(f"\n## v1 meter events: {events} aggregates, server limit {limit:.0f} requests/s, 50 ms latency")
    rows = _rows(events, 1)
    _customers_met(events)
    server_args = ["--latency", "0.05", "--rate-limit", str(limit)]
    with RemoteServer(*server_args) as server:
        started = time.monotonic()
        outcome = _run_in_task(rows=rows, max_rps=limit)
        seconds = time.monotonic() - started
        duplicates, lost = _check_exactly_once(server, events)
        ours = outcome["sent"] / outcome["seconds"]
        print(
            f"operator: {outcome['sent']} sent in {seconds:.1f} s (delivery {outcome['seconds']:.1f} s) = "
            f"{ours:.1f} events/s; 429s: {outcome['rate_limited']}; duplicates on server: {duplicates}; "
            f"lost: {lost}"
        )

    with RemoteServer(*server_args) as server:
        client = stripe.StripeClient(
            DEFAULT_API_KEY, base_addresses={"api": server.url}, max_network_retries=2
        )
        started = time.monotonic()
        for customer, value, _ in rows[:baseline_events]:
            client.v1.billing.meter_events.create(
                {"event_name": EVENT, "payload": {"stripe_customer_id": customer, "value": str(value)}}
            )
        base = baseline_events / (time.monotonic() - started)
        print(f"baseline (sequential stripe SDK loop, first {baseline_events} events): {base:.1f} events/s")
    print(
        f"RESULT v1: sustained/limit = {ours / limit:.3f} (target >= 0.9); "
        f"operator/baseline = {ours / base:.1f}x"
    )


def bench_stream(events: int, stream_limit: float) -> None:
    """v2 stream: events/s against (server stream request limit x 100)."""
    capacity = stream_limit * 100
    print(
        f"\n## v2 stream: {events} aggregates, server limit {stream_limit:.0f} stream requests/s "
        f"(= {capacity:.0f} events/s), 50 ms latency"
    )
    rows = _rows(events, 1, seed=2)
    _customers_met(events)
    with RemoteServer("--latency", "0.05", "--stream-rate-limit", str(stream_limit)) as server:
        outcome = _run_in_task(rows=rows, api="v2_stream", max_rps=stream_limit)
        ours = outcome["sent"] / outcome["seconds"]
        duplicates, lost = _check_exactly_once(server, events)
        print(
            f"operator: {outcome['sent']} events in {outcome['requests']} requests, "
            f"{outcome['seconds']:.1f} s = "
            f"{ours:.0f} events/s; 429s: {outcome['rate_limited']}; duplicates: {duplicates}; lost: {lost}"
        )
    print(f"RESULT stream: events/s / (limit x 100) = {ours / capacity:.3f} (target >= 0.9)")


def bench_stream_unlimited(customers: int, per_customer: int) -> None:
    """v2 stream, no server limit, 20 ms latency: events/s from raw rows, aggregation included."""
    target = 10_000
    rows = _rows(customers, per_customer, seed=3)
    _customers_met(customers)
    print(
        f"\n## v2 stream, no server limit, 20 ms latency: {len(rows)} raw rows -> {customers} events, "
        "aggregation included"
    )
    with RemoteServer("--latency", "0.02") as server:
        outcome = _run_in_task(rows=rows, api="v2_stream", max_rps=1_000, concurrency=16)
        seconds = outcome["wall"]
        duplicates, lost = _check_exactly_once(server, customers)
    ours = outcome["sent"] / seconds
    print(
        f"operator: {outcome['sent']} events in {seconds:.2f} s end to end "
        f"(delivery {outcome['seconds']:.2f} s) = "
        f"{ours:.0f} events/s; duplicates: {duplicates}; lost: {lost}"
    )
    print(
        f"RESULT stream-unlimited: events/s / 10,000 (Stripe's documented stream rate) = {ours / target:.2f}"
    )


def _ledger_database() -> str:
    """Point the ``bench_ledger`` connection at PostgreSQL when a DSN is given, else a SQLite file."""
    dsn = os.environ.get("STRIPE_METER_BENCH_PG_DSN") or os.environ.get("STRIPE_METER_TEST_PG_DSN")
    if dsn:
        os.environ["AIRFLOW_CONN_BENCH_LEDGER"] = dsn
        return "postgres"
    path = Path(os.environ["AIRFLOW_HOME"]) / "ledger.db"
    os.environ["AIRFLOW_CONN_BENCH_LEDGER"] = json.dumps({"conn_type": "sqlite", "host": str(path)})
    return "sqlite"


def _reset_ledger() -> None:
    """An empty ledger: the table dropped (it is created again on first use)."""
    from airflow_provider_stripe_meter.state.ledger import ledger_on

    store = ledger_on("bench_ledger")
    store.create = False
    cursor = store.conn.cursor()
    cursor.execute(f"DROP TABLE IF EXISTS {store.table}")
    store.conn.commit()
    store.close()


def _customers_met(customers: int) -> None:
    """The run measured is not a base's first: its customers are known (see ``_know_customers``).

    Otherwise the run asks Stripe about each, and the local server lists only the customers it
    has met: past the ones a run checks one by one (``CUSTOMER_RECHECKS``, 1,000), the rest would
    be held as unknown, not sent.
    """
    _ledger_database()
    _know_customers(customers)


def _know_customers(customers: int) -> None:
    """The known-customers table as the first run over ``customers`` customers leaves it (that run
    lists every customer once; the nights measured after it ask Stripe about none)."""
    import time as _time

    from airflow_provider_stripe_meter.ledger.customers import CustomerTable
    from airflow_provider_stripe_meter.state.ledger import ledger_on

    store = ledger_on("bench_ledger")
    CustomerTable(store).add("platform", (f"cus_bench{c:06d}" for c in range(customers)), int(_time.time()))
    store.close()


def _usage_table(rows: list[tuple[str, int, str]]) -> str:
    """A SQLite usage table holding ``rows``, behind the ``bench_usage`` connection; its query."""
    path = Path(tempfile.mkdtemp(prefix="stripe-meter-usage-")) / "usage.db"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE usage (customer_id TEXT, tokens INTEGER, used_at TEXT)")
        con.executemany("INSERT INTO usage VALUES (?, ?, ?)", rows)
    os.environ["AIRFLOW_CONN_BENCH_USAGE"] = json.dumps({"conn_type": "sqlite", "host": str(path)})
    return "SELECT customer_id, tokens, used_at FROM usage"


def bench_ledger(customers: int, days: int, stream_limit: float, v1_limit: float, v1_events: int) -> None:
    """The ledger at scale: (a) a first nightly run, (b) a re-run over ``days`` billed days, (c) rows/s."""
    import pendulum

    from airflow_provider_stripe_meter.billing.run import SLICE
    from airflow_provider_stripe_meter.ledger.schema import DEFAULT_TABLE

    kind = _ledger_database()
    print(f"\n## ledger on {kind}: {customers:,} customers")
    sql = _usage_table(_rows(customers, 1, seed=11))
    source = {"sql": sql, "sql_conn_id": "bench_usage", "ledger_conn_id": "bench_ledger"}

    capacity = stream_limit * 100
    _reset_ledger()
    # The customers met by the runs before (the first run over a base lists them once).
    _know_customers(max(customers, v1_events))
    with RemoteServer("--latency", "0.02", "--stream-rate-limit", str(stream_limit)) as server:
        first = _run_in_task(**source, api="v2_stream", max_rps=stream_limit)
        duplicates, lost = _check_exactly_once(server, customers)
    stream_rate = first["events_sent"] / first["seconds"]
    print(
        f"(a) first nightly run, v2 stream limited to {stream_limit:.0f} requests/s (= {capacity:,.0f} "
        f"events/s): {first['events_sent']:,} events, delivery {first['seconds']:.1f} s = "
        f"{stream_rate:,.0f} events/s; end to end {first['wall']:.1f} s; duplicates {duplicates}, lost {lost}"
    )
    _reset_ledger()
    sql_v1 = _usage_table(_rows(v1_events, 1, seed=12))
    with RemoteServer("--latency", "0.02", "--rate-limit", str(v1_limit)) as server:
        v1 = _run_in_task(**{**source, "sql": sql_v1}, api="v1", max_rps=v1_limit)
        v1_duplicates, v1_lost = _check_exactly_once(server, v1_events)
    v1_rate = v1["events_sent"] / v1["seconds"]
    print(
        f"(a) first nightly run, v1 limited to {v1_limit:.0f} requests/s: {v1['events_sent']:,} events, "
        f"delivery {v1['seconds']:.1f} s = {v1_rate:,.0f} events/s; 429s {v1['rate_limited']}; "
        f"duplicates {v1_duplicates}, lost {v1_lost}"
    )

    # (b) and (c): the ledger of `days` nights already billed, then the re-run over all of them.
    _reset_ledger()
    today = pendulum.today("UTC")
    rng = random.Random(13)
    stamps = [today.add(days=-back, hours=23, minutes=30) for back in range(1, days + 1)]
    rows = [
        (f"cus_bench{c:06d}", rng.randrange(1, 10_000), stamp.strftime("%Y-%m-%d %H:%M:%S"))
        for stamp in stamps
        for c in range(customers)
    ]
    sql_days = _usage_table(rows)
    with RemoteServer("--latency", "0.02") as server:
        # The ledger the nightly runs left, for this server's meter; the baseline writes the
        # first of the same rows, one statement at a time.
        baseline, naive_rows, naive_accepted = _naive_ledger_rate(rows[:20_000])
        written, seconds = _fill_ledger(rows)
        accepted = _count_accepted(DEFAULT_TABLE)
        print(
            f"(c) ledger rows written pending then resolved accepted, {SLICE:,} a slice as a run writes "
            f"them: {written:,} in {seconds:.1f} s = {written / seconds:,.0f} rows/s, {accepted:,} accepted; "
            f"baseline (the first {naive_rows:,} of them, one INSERT and one UPDATE a row, same database): "
            f"{baseline:,.0f} rows/s, {naive_accepted:,} accepted"
        )
        # The same re-run twice: the usage in another database than the ledger (every customer-day
        # read back and planned on the worker), then beside it (the database subtracts the ledger).
        apart = _rerun(server, {**source, "sql": sql_days}, stream_limit, days, "the usage in SQLite, apart")
        again = apart
        if kind == "postgres":
            beside = {**source, "sql": _pg_usage_table(rows), "sql_conn_id": "bench_ledger"}
            again = _rerun(server, beside, stream_limit, days, "the usage beside the ledger in PostgreSQL")
            print(
                f"RESULT ledger-b-beside: re-run beside the ledger / apart = "
                f"{again['wall'] / apart['wall']:.3f} ({again['wall']:.1f} s / {apart['wall']:.1f} s)"
            )
    sent, reads = again["events_sent"], again["summary_requests"]
    print(
        f"RESULT ledger-a: stream events/s / limit = {stream_rate / capacity:.3f} (target >= 0.9); "
        f"v1 events/s / limit = {v1_rate / v1_limit:.3f} (target >= 0.9)"
    )
    print(
        f"RESULT ledger-b: re-run seconds / 10 = {again['wall'] / 10:.2f} (target <= 1, the ledger in "
        f"PostgreSQL beside the usage); events {sent}, summary reads {reads} (target 0, 0)"
    )
    rate = written / seconds
    print(f"RESULT ledger-c: ledger rows/s = {rate:,.0f} = {rate / baseline:.1f}x the baseline")


#: The baseline's scratch table, beside the ledger (the operator's ``ledger_table`` default).
NAIVE_LEDGER = "stripe_meter_ledger_naive"


def _bench_meter_id() -> str:
    """The id of the running local server's meter for the bench's event."""
    from airflow_provider_stripe_meter.hooks.stripe import StripeHook

    return StripeHook().active_meter(EVENT)["id"]


def _rerun(
    server: RemoteServer, source: dict[str, Any], stream_limit: float, days: int, where: str
) -> dict[str, Any]:
    """One re-run of the billed nights, its figures printed."""
    before = server.summary()["stats"]
    again = _run_in_task(**source, api="v2_stream", max_rps=stream_limit)
    after = server.summary()["stats"]
    asked = {
        k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, int) and v != before.get(k, 0)
    }
    database = again.get("database") or {}
    print(
        f"(b) re-run over {days} billed days, {where}: {again['aggregates']:,} customer-days, "
        f"{again['events_sent']} events sent, {again['summary_requests']} summary reads, "
        f"{again['already_recorded']:,} already recorded, {again['wall']:.1f} s end to end "
        f"({asked.get('requests', 0)} requests in all); aggregated in {again['aggregated_in']}"
        + (
            f", {database.get('groups', 0):,} customer-days handed back, "
            f"{database['unchanged']:,} left in the database, {database.get('seconds', 0):.1f} s of SQL"
            if "unchanged" in database
            else ""
        )
    )
    return again


def _pg_usage_table(rows: list[tuple[str, int, str]]) -> str:
    """The usage ``rows`` in a table beside the ledger on the ``bench_ledger`` PostgreSQL; its query."""
    import io

    from airflow_provider_stripe_meter.state.ledger import ledger_on

    store = ledger_on("bench_ledger")
    cursor = store.conn.cursor()
    cursor.execute("DROP TABLE IF EXISTS bench_usage_days")
    cursor.execute("CREATE TABLE bench_usage_days (customer_id text, tokens bigint, used_at timestamp)")
    text = "".join(f"{c}\t{v}\t{t}\n" for c, v, t in rows)
    if hasattr(cursor, "copy_expert"):  # psycopg2
        cursor.copy_expert("COPY bench_usage_days FROM STDIN", io.StringIO(text))
    else:  # psycopg 3
        with cursor.copy("COPY bench_usage_days FROM STDIN") as copy:
            copy.write(text)
    cursor.execute("ANALYZE bench_usage_days")
    store.conn.commit()
    store.close()
    return "SELECT customer_id, tokens, used_at FROM bench_usage_days"


def _fill_ledger(rows: list[tuple[str, int, str]]) -> tuple[int, float]:
    """Write a ledger for ``rows`` as the nightly runs would have (pending, then accepted); rows/s."""
    from airflow_provider_stripe_meter.billing.run import SLICE
    from airflow_provider_stripe_meter.ledger.entries import ACCEPTED, Change
    from airflow_provider_stripe_meter.state.ledger import ledger_on
    from airflow_provider_stripe_meter.utils.aggregation import paused_gc

    entries = _ledger_entries(_bench_meter_id(), rows)
    store = ledger_on("bench_ledger")
    store.conn  # noqa: B018  (opens the connection and creates the table outside the timing)
    started = time.monotonic()
    with paused_gc():
        # A run writes a slice pending, sends it, then resolves it: SqlLedger.insert and .resolve
        # called once a slice, with the slice a run sends at once.
        while chunk := list(itertools.islice(entries, SLICE)):
            store.insert(chunk)
            store.resolve("platform", [Change(e.identifier, ACCEPTED, time.time(), "") for e in chunk])
    seconds = time.monotonic() - started
    store.close()
    return len(rows), seconds


def _ledger_entries(meter_id: str, rows: list[tuple[str, int, str]]) -> Iterator[Entry]:
    """The rows as the nightly runs' ledger rows (each an ``Entry``, pending), one at a time:
    3,500,000 of them held at once would take gigabytes."""
    from datetime import datetime, timezone

    from airflow_provider_stripe_meter.billing.meters import MeterSpec
    from airflow_provider_stripe_meter.billing.plans import ledger_identifier
    from airflow_provider_stripe_meter.ledger.entries import PENDING, Entry

    spec = MeterSpec(EVENT, meter_id)
    for customer, value, used_at in rows:
        moment = datetime.fromisoformat(used_at).replace(tzinfo=timezone.utc)
        stamp = int(moment.timestamp())
        yield Entry(
            account="platform",
            meter_id=meter_id,
            event_name=EVENT,
            customer_id=customer,
            day=moment.date(),
            seq=1,
            identifier=ledger_identifier(spec, customer, moment.date(), 1),
            value=value,
            stamp=stamp,
            source_at=stamp,
            state=PENDING,
            run_id="bench",
            attempt="bench",
            sent_at=time.time(),
        )


def _naive_ledger_rate(rows: list[tuple[str, int, str]]) -> tuple[float, int, int]:
    """Rows/s of the same ledger rows written the plain way, in a scratch table of the same schema:
    one INSERT, then one UPDATE (the columns SqlLedger.resolve sets), each committed, per row.
    Returns the rate, the rows written and the rows found accepted afterwards."""
    from airflow_provider_stripe_meter.ledger.schema import COLUMN_NAMES
    from airflow_provider_stripe_meter.ledger.store import _values
    from airflow_provider_stripe_meter.state.ledger import ledger_on

    # A table left by a run that failed half way would keep the schema of its day.
    _sql_on_ledger_db(f"DROP TABLE IF EXISTS {NAIVE_LEDGER}")
    entries = list(_ledger_entries(_bench_meter_id(), rows))
    store = ledger_on("bench_ledger", NAIVE_LEDGER)
    conn = store.conn
    cursor = conn.cursor()
    mark = store.placeholder
    # The columns named, as SqlLedger names them: the statement holds whatever the schema becomes.
    columns, marks = ", ".join(COLUMN_NAMES), ", ".join([mark] * len(COLUMN_NAMES))
    insert = f"INSERT INTO {NAIVE_LEDGER} ({columns}) VALUES ({marks})"
    update = (
        f"UPDATE {NAIVE_LEDGER} SET state = {mark}, answered_at = {mark}, "
        f"note = COALESCE(NULLIF({mark}, ''), note) WHERE account = {mark} AND identifier = {mark}"
    )
    started = time.monotonic()
    for entry in entries:
        cursor.execute(insert, _values(entry))  # what SqlLedger writes for an entry
        conn.commit()
        cursor.execute(update, ("accepted", time.time(), "", entry.account, entry.identifier))
        conn.commit()
    seconds = time.monotonic() - started
    store.close()
    accepted = _count_accepted(NAIVE_LEDGER)
    _sql_on_ledger_db(f"DROP TABLE {NAIVE_LEDGER}")
    return len(entries) / seconds, len(entries), accepted


def _count_accepted(table: str) -> int:
    """Rows of ``table`` in the bench ledger's database that are ``accepted``."""
    from airflow_provider_stripe_meter.state.ledger import ledger_on

    store = ledger_on("bench_ledger", table)
    store.create = False
    cursor = store.conn.cursor()
    cursor.execute(f"SELECT COUNT(*) FROM {table} WHERE state = 'accepted'")
    (count,) = cursor.fetchone()
    store.close()
    return int(count)


def _make_sqlite(path: Path, n: int) -> None:
    rng = random.Random(4)
    import pendulum

    day = pendulum.yesterday("UTC")
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE usage (customer_id TEXT, tokens INTEGER, used_at TEXT)")
        con.executemany(
            "INSERT INTO usage VALUES (?, ?, ?)",
            (
                (
                    f"cus_bench{rng.randrange(5_000):06d}",
                    rng.randrange(1, 10_000),
                    day.add(seconds=rng.randrange(86_400)).strftime("%Y-%m-%d %H:%M:%S"),
                )
                for _ in range(n)
            ),
        )


def _make_postgres(dsn: str, n: int) -> None:
    """The same shape of table in PostgreSQL: ``n`` rows, 5,000 customers, yesterday (UTC)."""
    import pendulum
    import psycopg2

    start = int(pendulum.yesterday("UTC").timestamp())
    with psycopg2.connect(dsn) as con, con.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS usage")
        cur.execute("CREATE TABLE usage (customer_id TEXT, tokens BIGINT, used_at TIMESTAMP)")
        # Generated in the database: a Python loop would take longer than the bench.
        cur.execute(
            "INSERT INTO usage SELECT 'cus_bench' || lpad((g::bigint * 7919 %% 5000)::text, 6, '0'), "
            "1 + g::bigint * 104729 %% 9999, "
            "to_timestamp(%s + g::bigint * 15485863 %% 86400) AT TIME ZONE 'UTC' "
            "FROM generate_series(1, %s) g",
            (start, n),
        )
        cur.execute("ANALYZE usage")


def _make_duckdb(path: str, n: int) -> None:
    """The same shape of table in a DuckDB file: ``n`` rows, 5,000 customers, yesterday (UTC)."""
    import duckdb
    import pendulum

    start_ms = int(pendulum.yesterday("UTC").timestamp()) * 1000
    with duckdb.connect(path) as con:
        # Generated in the database, as for PostgreSQL; epoch_ms gives a TIMESTAMP (no zone, UTC).
        con.execute(
            "CREATE TABLE usage AS SELECT 'cus_bench' || lpad(CAST(g * 7919 % 5000 AS VARCHAR), 6, '0') "
            "AS customer_id, CAST(1 + g * 104729 % 9999 AS BIGINT) AS tokens, "
            "epoch_ms(? + (g * 15485863 % 86400) * 1000) AS used_at FROM range(1, ? + 1) t(g)",
            [start_ms, n],
        )


#: The modes of the sql bench: a bare fetch, the database's own GROUP BY (a reference), and the
#: operator's two paths.
SQL_MODES = ("bare", "group", "database", "worker")


def _inner_sql(mode: str, db: str) -> None:
    """Run in a fresh process: one path over the table, print seconds and memory as JSON."""
    print(json.dumps(_measure_sql(mode, db)))


def _measure_sql(mode: str, db: str) -> dict[str, Any]:
    """One path over the table: rows, seconds, memory (meaningful in a fresh process only)."""
    _airflow_env()
    if db.endswith(".duckdb"):
        return _measure_duckdb(mode, db)
    if db.startswith("postgres"):
        os.environ["AIRFLOW_CONN_USAGE_DB"] = db
        group_sql = (
            "SELECT customer_id, CAST(EXTRACT(EPOCH FROM used_at) AS BIGINT) / 86400, SUM(tokens), "
            "COUNT(*), MAX(used_at) FROM usage GROUP BY 1, 2"
        )
    else:
        os.environ["AIRFLOW_CONN_USAGE_DB"] = json.dumps({"conn_type": "sqlite", "host": db})
        group_sql = (
            "SELECT customer_id, substr(used_at, 1, 10), SUM(tokens), COUNT(*), MAX(used_at) "
            "FROM usage GROUP BY 1, 2"
        )
    sql = "SELECT customer_id, tokens, used_at FROM usage"
    op = _operator(sql=sql, sql_conn_id="usage_db", aggregate_in="worker" if mode == "worker" else "database")
    from airflow.sdk import BaseHook

    from airflow_provider_stripe_meter.sources import row_chunks

    BaseHook.get_connection("usage_db").get_hook()  # imports and connection lookup outside the timing
    import sqlalchemy  # noqa: F401  (imported by the database path: outside the timing too)

    sampler = _RssSampler()
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if mode == "bare":
        rows = sum(
            len(chunk) for chunk in row_chunks(sql=sql, sql_conn_id="usage_db", chunk_size=op.chunk_size)
        )
    elif mode == "group":
        rows = sum(
            len(chunk) for chunk in row_chunks(sql=group_sql, sql_conn_id="usage_db", chunk_size=10_000)
        )
    else:
        # A sum meter: no latest values looked up (the operator reads the meter to know).
        aggregator = op.read_usage(EVENT, needs_last=lambda names: set())
        rows, extra = _finished(aggregator)
    seconds = time.perf_counter() - started
    start_mb, peak_mb = sampler.stop()
    return {"rows": rows, "seconds": seconds, "start_mb": start_mb, "peak_mb": peak_mb, **extra}


def _finished(aggregator: Any) -> tuple[int, dict[str, Any]]:
    """The aggregator's customer-days made (part of the timing), its rows and what the bench prints."""
    from airflow_provider_stripe_meter.utils.aggregation import paused_gc

    with paused_gc():
        aggregates = aggregator.finish()
    return aggregator.rows, {
        "aggregates": len(aggregates),
        "fast_chunks": aggregator.fast_chunks,
        "path": aggregator.path,
    }


def _measure_duckdb(mode: str, path: str) -> dict[str, Any]:
    """:func:`_measure_sql` for a DuckDB file. Airflow has no DuckDB connection type of its own
    (a provider outside Airflow's adds one), so the operator's two paths run here on a DuckDB
    connection through the functions the operator calls: the same SQL, aggregator and checks."""
    import duckdb

    from airflow_provider_stripe_meter.pushdown.dialects import DuckdbDialect
    from airflow_provider_stripe_meter.pushdown.source import aggregate_in_database
    from airflow_provider_stripe_meter.sources import zone
    from airflow_provider_stripe_meter.utils.aggregation import UsageAggregator, paused_gc
    from airflow_provider_stripe_meter.utils.clock import SYSTEM

    sql = "SELECT customer_id, tokens, used_at FROM usage"
    group_sql = (
        "SELECT customer_id, CAST(epoch(used_at) AS BIGINT) // 86400, SUM(tokens), COUNT(*), MAX(used_at) "
        "FROM usage GROUP BY 1, 2"
    )
    op = _operator(sql=sql, sql_conn_id="usage_db")
    import sqlalchemy  # noqa: F401  (imported by the database path: outside the timing)

    conn = duckdb.connect(path, read_only=True)
    sampler = _RssSampler()
    started = time.perf_counter()
    extra: dict[str, Any] = {}

    def fetched(query: str) -> Iterator[list[Any]]:
        cur = conn.cursor()
        cur.execute(query)
        while chunk := cur.fetchmany(op.chunk_size):
            yield chunk

    if mode in ("bare", "group"):
        rows = sum(len(chunk) for chunk in fetched(sql if mode == "bare" else group_sql))
    else:
        aggregator = UsageAggregator(
            event_name=EVENT,
            now=int(SYSTEM.now()),
            columns=op.columns,
            naive_timezone=zone(op.naive_timezone),
            safety_margin=op.safety_margin,
            sample_limit=op.sample_limit,
        )
        if mode == "database":
            aggregate_in_database(
                conn, DuckdbDialect(), sql, None, aggregator, needs_last=lambda names: set()
            )
            aggregator.path = "database"
        else:
            with paused_gc():
                for chunk in fetched(sql):
                    aggregator.add_rows(chunk)
            aggregator.path = "worker"
        rows, extra = _finished(aggregator)
    seconds = time.perf_counter() - started
    start_mb, peak_mb = sampler.stop()
    conn.close()
    return {"rows": rows, "seconds": seconds, "start_mb": start_mb, "peak_mb": peak_mb, **extra}


class _RssSampler:
    """Peak resident memory of this process while it runs, read from /proc every 2 ms."""

    def __init__(self) -> None:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return self.start, max(self.peak, self._rss())


def bench_sql(n: int, repeats: int, database: str = "sqlite", in_process: bool = False) -> None:
    """``n`` raw rows through the operator's two paths vs a bare fetch of the same rows, and the
    database's own GROUP BY of them for reference; medians of ``repeats`` fresh processes each.

    ``database``: ``sqlite`` or ``duckdb`` (a file made here), or ``postgres`` (the server of
    ``STRIPE_METER_TEST_PG_DSN``; ``source scripts/postgres.sh; start_test_postgres`` starts one).
    ``in_process``: every path in this process (the suite's tiny run: the counts, not the times
    or the memory, which only a fresh process measures).
    """
    print(
        f"\n## sql path: {n} raw rows from {database} (5,000 customers, one day), "
        f"median of {repeats} runs each"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if database == "postgres":
            db = os.environ.get("STRIPE_METER_TEST_PG_DSN", "")
            if not db:
                raise SystemExit("--sql-db postgres needs STRIPE_METER_TEST_PG_DSN (scripts/postgres.sh)")
            _make_postgres(db, n)
        elif database == "duckdb":
            db = str(Path(tmp) / "usage.duckdb")
            _make_duckdb(db, n)
        else:
            db = str(Path(tmp) / "usage.db")
            _make_sqlite(Path(db), n)
        results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in SQL_MODES}
        for _ in range(repeats):
            for mode in SQL_MODES:
                if in_process:
                    results[mode].append(_measure_sql(mode, db))
                    continue
                out = subprocess.run(
                    [sys.executable, __file__, "--inner-sql", mode, db],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    seconds = {mode: statistics.median(r["seconds"] for r in results[mode]) for mode in SQL_MODES}
    memory = {mode: max(r["peak_mb"] - r["start_mb"] for r in results[mode]) for mode in SQL_MODES}
    last = {mode: results[mode][-1] for mode in SQL_MODES}
    print(
        f"bare fetch (fetchmany loop on the same hook and query): {seconds['bare']:.3f} s, "
        f"+{memory['bare']:.1f} MB peak"
    )
    print(f"the database's own GROUP BY of the rows (reference): {seconds['group']:.3f} s")
    for mode, words in (("database", "summed in the database"), ("worker", "row by row on the worker")):
        assert last[mode]["path"] == mode, last[mode]
        print(
            f"operator sql path, {words}: {seconds[mode]:.3f} s, +{memory[mode]:.1f} MB peak, "
            f"{last[mode]['aggregates']} aggregates, {last[mode]['fast_chunks']} fast chunks"
        )
    # Targets for the databases across a network (PostgreSQL) and in the worker's process.
    target = "0.5" if database == "postgres" else "1.5"
    print(
        f"RESULT sql ({database}): time database/bare = {seconds['database'] / seconds['bare']:.2f} "
        f"(target <= {target}); worker/bare = {seconds['worker'] / seconds['bare']:.2f}; "
        f"the database's GROUP BY/bare = {seconds['group'] / seconds['bare']:.2f}; "
        f"peak memory over bare = {memory['database'] - memory['bare']:+.1f} MB (target <= 50)"
    )


#: What a DAG file using every operator and the sensor imports.
OPERATOR_MODULES = (
    "airflow_provider_stripe_meter.operators.meter_event",
    "airflow_provider_stripe_meter.operators.meter_event_batch",
    "airflow_provider_stripe_meter.operators.meter_event_correction",
    "airflow_provider_stripe_meter.sensors.meter_reconcile",
)


def _import_seconds(modules: tuple[str, ...]) -> tuple[float, float, list[str]]:
    """In a fresh interpreter: wall time of importing ``airflow.sdk``, then of ``modules`` on top
    of it, and what of stripe and OpenLineage the second import added."""
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "import airflow.sdk\n"
        "sdk = time.perf_counter() - t\n"
        "before = set(sys.modules)\n"
        "t = time.perf_counter()\n"
        f"for m in {modules!r}: __import__(m)\n"
        "took = time.perf_counter() - t\n"
        "new = set(sys.modules) - before\n"
        "added = sorted(m for m in new if m.split('.')[0] == 'stripe' or 'openlineage' in m)\n"
        "print(sdk, took, ','.join(added))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    sdk, took, *added = out.split()
    return float(sdk), float(took), [m for m in "".join(added).split(",") if m]


def bench_import(repeats: int) -> None:
    """Parse-time cost of a DAG file using the operators: on top of ``airflow.sdk`` (the baseline,
    measured in the same processes), budget 80 ms, with neither stripe nor OpenLineage imported."""
    print(f"\n== import: the operators and the sensor after airflow.sdk, fresh process, median of {repeats}")
    # pip compiles a package's modules when it installs it; an editable install (and a machine
    # with PYTHONDONTWRITEBYTECODE) does not, which would time the compiler instead.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "airflow_provider_stripe_meter")], check=True
    )
    runs = [_import_seconds(OPERATOR_MODULES) for _ in range(repeats)]
    sdk = sorted(run[0] for run in runs)[len(runs) // 2]
    ours = sorted(run[1] for run in runs)[len(runs) // 2]
    added = sorted({m for run in runs for m in run[2]})
    print(f"  baseline, import airflow.sdk: {sdk * 1000:.0f} ms")
    print(
        f"  then the operators and the sensor: +{ours * 1000:.1f} ms (budget 80 ms); "
        f"{(sdk + ours) / sdk:.3f}x the baseline"
    )
    print(f"  stripe or OpenLineage modules imported: {added or 'none'}")


def _sql_on_ledger_db(text: str) -> None:
    """Run one statement on the bench ledger's database."""
    from airflow_provider_stripe_meter.state.ledger import ledger_on

    store = ledger_on("bench_ledger")
    store.create = False
    cursor = store.conn.cursor()
    cursor.execute(text)
    store.conn.commit()
    store.close()


def bench_periods(customers: int, stream_limit: float, repeats: int = 3) -> None:
    """What reading billing periods costs a nightly run: the same night with and without them,
    ``repeats`` times each, taking turns on one server, medians compared.

    With them, the run is a steady-state night: the meter's subscriptions were listed in full by
    a run 24 hours earlier (measured apart, as the first run's cost, with the server's clock a
    day behind), so the table holds them as they were then and the night reads a day of Stripe's
    subscription events (the renewals of about 1/30 of the subscriptions). Before each night
    the table is put back as that run left it, and the setup's writes are flushed to disk.
    """
    kind = _ledger_database()
    print(f"\n## billing periods: a nightly run of {customers:,} customers, ledger on {kind}")
    sql = _usage_table(_rows(customers, 1, seed=21))
    source = {"sql": sql, "sql_conn_id": "bench_usage", "ledger_conn_id": "bench_ledger"}
    server_args = (
        "--latency",
        "0.02",
        "--stream-rate-limit",
        str(stream_limit),
        "--subscriptions",
        str(customers),
        "--grace",
        str(72 * 3600),
        "--clock-offset",
        "-86400",
    )
    tables = ("stripe_meter_ledger_subscriptions", "stripe_meter_ledger_subscriptions_sync")
    for table in tables:
        _sql_on_ledger_db(f"DROP TABLE IF EXISTS {table}")
        _sql_on_ledger_db(f"DROP TABLE IF EXISTS bench_{table}")
    _reset_ledger()
    keys = ("requests", "v1_subscriptions", "v1_events", "v1_invoices", "v1_prices")
    with RemoteServer(*server_args) as server:

        def run(**kwargs: Any) -> tuple[dict[str, Any], dict[str, int]]:
            summary = server.summary()
            before, cpu = summary["stats"], summary["cpu_seconds"]
            _reset_ledger()
            # The setup's writes (the ledger dropped, the table put back: tens of MB) reach the
            # disk now, not during the night, whose commits would wait on them.
            os.sync()
            outcome = _run_in_task(**{**source, **kwargs}, api="v2_stream", max_rps=stream_limit)
            summary = server.summary()
            after = summary["stats"]
            counts = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
            # The local server runs on this machine: its CPU competes with the run's, as Stripe's does not.
            outcome["server_cpu"] = summary["cpu_seconds"] - cpu
            return outcome, counts

        # The night before (the server a day behind): one customer's usage, planned only.
        first, listed = run(sql=_usage_table(_rows(1, 1, seed=22)), dry_run=True)
        _usage_table(_rows(customers, 1, seed=21))
        _sql_on_ledger_db(f"UPDATE {tables[1]} SET events_to = events_to - 86400, full_at = full_at - 86400")
        for table in tables:
            _sql_on_ledger_db(f"CREATE TABLE bench_{table} AS SELECT * FROM {table}")
        server.set_clock_offset(0)
        _know_customers(customers)
        offs, holds = [], []
        for _ in range(repeats):
            offs.append(run(billing_periods="off"))
            for table in tables:
                _sql_on_ledger_db(f"DELETE FROM {table}")
                _sql_on_ledger_db(f"INSERT INTO {table} SELECT * FROM bench_{table}")
            holds.append(run(billing_periods="hold"))
    off_wall = sorted(o["wall"] for o, _ in offs)[repeats // 2]
    hold_wall = sorted(h["wall"] for h, _ in holds)[repeats // 2]
    off_requests = sorted(n["requests"] for _, n in offs)[repeats // 2]
    hold, night = holds[-1]
    print(
        f"first run (lists the subscriptions in full): {listed['v1_subscriptions']} subscription pages, "
        f"{first['wall']:.1f} s end to end for one customer's usage"
    )
    print(
        f"billing_periods=off: {offs[-1][0]['events_sent']:,} events, {off_requests:,} requests; "
        f"{', '.join(f'{o[0]:.1f}' for o in sorted((o['wall'],) for o, _ in offs))} s end to end"
    )
    print(
        f"billing_periods=hold, a steady-state night: {hold['events_sent']:,} events, {night['requests']:,} "
        f"requests ({night['v1_events']} event pages, {night['v1_subscriptions']} subscription pages, "
        f"{night['v1_invoices']} invoice pages, {night['v1_prices']} price pages); "
        f"{', '.join(f'{h[0]:.1f}' for h in sorted((h['wall'],) for h, _ in holds))} s end to end, of which "
        f"reading the periods {', '.join(str(h['invoices']['read']['seconds']) for h, _ in holds)} s; "
        f"success {hold['success']}, held "
        f"{[hold[k] for k in ('invoice_final', 'subscription_ended', 'no_invoice')]}"
    )
    off_cpu = sorted(o["server_cpu"] for o, _ in offs)[repeats // 2]
    hold_cpu = sorted(h["server_cpu"] for h, _ in holds)[repeats // 2]
    print(
        f"the local server's own CPU time a night (on this machine; Stripe's is not): off {off_cpu:.1f} s, "
        f"hold {hold_cpu:.1f} s (medians)"
    )
    print(
        f"RESULT periods: requests with / without = {night['requests'] / max(1, off_requests):.3f}, time "
        f"with / without = {hold_wall:.1f} / {off_wall:.1f} s = {hold_wall / off_wall:.3f} "
        f"(medians of {repeats}; target <= 1.05 each)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", choices=["v1", "stream", "stream-unlimited", "sql", "import", "ledger", "periods"]
    )
    parser.add_argument("--ledger-customers", type=int, default=100_000)
    parser.add_argument("--ledger-days", type=int, default=35)
    parser.add_argument("--ledger-stream-limit", type=float, default=50.0, help="stream requests/s")
    parser.add_argument("--ledger-v1-limit", type=float, default=500.0, help="v1 requests/s")
    parser.add_argument("--ledger-v1-events", type=int, default=30_000)
    parser.add_argument("--v1-events", type=int, default=5_000)
    parser.add_argument(
        "--baseline-events", type=int, default=300, help="events the sequential baseline sends"
    )
    parser.add_argument("--stream-events", type=int, default=20_000)
    parser.add_argument("--stream-limit", type=float, default=20.0, help="server stream requests/s")
    parser.add_argument(
        "--unlimited-customers", type=int, default=50_000, help="stream-unlimited: customers (4 rows each)"
    )
    parser.add_argument("--sql-rows", type=int, default=1_000_000)
    parser.add_argument("--sql-db", choices=("sqlite", "postgres", "duckdb"), default="sqlite")
    parser.add_argument(
        "--sql-in-process",
        action="store_true",
        help="run the sql bench's paths in this process (counts only: times and memory need fresh ones)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--periods-customers", type=int, help="billing periods: customers (default: --ledger-customers)"
    )
    parser.add_argument("--periods-repeats", type=int, default=3, help="billing periods: nights of each kind")
    parser.add_argument("--import-repeats", type=int, default=15)
    parser.add_argument("--inner-sql", nargs=2, metavar=("MODE", "DB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner_sql:
        _inner_sql(*args.inner_sql)
        return
    _airflow_env()
    # Import the SDK up front: the figures are sustained rates, not a process's start-up.
    import stripe  # noqa: F401

    started = time.monotonic()
    if args.only in (None, "v1"):
        bench_v1(args.v1_events, args.baseline_events)
    if args.only in (None, "stream"):
        bench_stream(args.stream_events, args.stream_limit)
    if args.only in (None, "stream-unlimited"):
        bench_stream_unlimited(customers=args.unlimited_customers, per_customer=4)
    if args.only in (None, "sql"):
        bench_sql(args.sql_rows, args.repeats, args.sql_db, args.sql_in_process)
    if args.only in (None, "import"):
        bench_import(args.import_repeats)
    if args.only in (None, "ledger"):
        bench_ledger(
            args.ledger_customers,
            args.ledger_days,
            args.ledger_stream_limit,
            args.ledger_v1_limit,
            args.ledger_v1_events,
        )
    if args.only in (None, "periods"):
        bench_periods(
            args.periods_customers or args.ledger_customers, args.ledger_stream_limit, args.periods_repeats
        )
    print(f"\n(benchmarks took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
