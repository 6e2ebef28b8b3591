"""Benchmarks of the batch operator, each printed as a ratio against a baseline measured in the same run.

    ./dev bench                 # everything (about 27 minutes; --only scale alone about 14)
    ./dev bench --only v1       # one of: v1, stream, stream-unlimited, sql, truth, import, scale

Every figure runs the real stripe SDK over HTTP against the local Stripe server on 127.0.0.1
with the latency and limits named in its heading, and the operator inside a real Airflow task
(``dag.test()`` on a throwaway SQLite metadata database: its marks of sent days are Airflow
Variables); the SQL figure runs in fresh processes so that peak memory (resident set, sampled
every 2 ms) belongs to one path alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

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


def _run_in_task(**kwargs: Any) -> dict[str, Any]:
    """Run the batch operator inside a real Airflow task (dag.test()) and return its outcome.

    ``wall`` is the operator's own time, end to end (reading, looking up, marking, sending).
    """
    home = Path(os.environ["AIRFLOW_HOME"])
    dags = home / "dags"
    if not dags.exists():
        dags.mkdir(parents=True)
        (dags / "stripe_meter_bench.py").write_text(_BENCH_DAG)
        airflow = Path(sys.executable).with_name("airflow")
        for command in (["db", "migrate"], ["dags", "reserialize"]):
            subprocess.run([str(airflow), *command], check=True, capture_output=True)
    args, out = home / "bench-args.json", home / "bench-out.json"
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


def bench_truth(customers: int, days: int) -> None:
    """What exactly-once beyond the identifier window costs: (a) a first nightly, (b) a backfill."""
    import pendulum

    from airflow_provider_stripe_meter.hooks.stripe import StripeHook
    from airflow_provider_stripe_meter.utils.delivery import Deliverer
    from airflow_provider_stripe_meter.utils.identifiers import daily_identifier
    from airflow_provider_stripe_meter.utils.rules import MeterEvent

    limit = 100.0
    print(
        f"\n## truth (a): nightly run, {customers} customers billing yesterday for the first time, "
        f"server limit {limit:.0f} requests/s, 50 ms latency"
    )
    rows = _rows(customers, 1, seed=5)
    server_args = ["--latency", "0.05", "--rate-limit", str(limit)]
    with RemoteServer(*server_args) as server:
        # Baseline: what the operator cost before this release, one request per aggregate and
        # nothing else (no meter list, no marks, no summaries), through the same deliverer.
        hook = StripeHook()
        day = pendulum.yesterday("UTC").date()
        events = [MeterEvent(EVENT, c, v, daily_identifier(EVENT, c, day), None) for c, v, _ in rows]
        started = time.monotonic()
        report = Deliverer(
            lambda batch: hook.create_meter_event(batch[0]),
            key=lambda e: e.customer_id,
            describe=lambda e: {"customer_id": e.customer_id},
            max_rps=limit,
        ).run(events)
        base_seconds = time.monotonic() - started
        base_requests = server.summary()["stats"]["requests"]
        print(
            f"baseline (send every aggregate, no look-ups): {report.sent} sent, {base_requests} requests, "
            f"{base_seconds:.1f} s"
        )
    with RemoteServer(*server_args) as server:
        outcome = _run_in_task(rows=rows, max_rps=limit)
        requests = server.summary()["stats"]["requests"]
        duplicates, lost = _check_exactly_once(server, customers)
        print(
            f"operator: {outcome['sent']} sent, {requests} requests ({outcome['summary_requests']} summary "
            f"look-ups), {outcome['wall']:.1f} s end to end; duplicates {duplicates}, lost {lost}"
        )
    print(
        f"RESULT truth-a: requests operator/baseline = {requests / base_requests:.3f}, "
        f"seconds = {outcome['wall'] / base_seconds:.3f} (target <= 1.10)"
    )

    test_limit = 25.0
    print(
        f"\n## truth (b): {days}-day backfill of the same {customers} customers over days already billed, "
        f"test-mode limits (server {test_limit:.0f} requests/s, operator default 20/s), 50 ms latency"
    )
    today = pendulum.today("UTC")
    backfill, held = [], []
    rng = random.Random(6)
    for back in range(1, days + 1):
        stamp = today.add(days=-back, hours=23, minutes=30)
        for c in range(customers):
            customer, value = f"cus_bench{c:06d}", rng.randrange(1, 10_000)
            backfill.append((customer, value, stamp.strftime("%Y-%m-%d %H:%M:%S")))
            held.append(
                {
                    "event_name": EVENT,
                    "customer": customer,
                    "value": value,
                    "timestamp": int(stamp.timestamp()),
                    "identifier": daily_identifier(EVENT, customer, stamp.date()),
                }
            )
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(held, handle)
    server_args = ["--latency", "0.05", "--rate-limit", str(test_limit), "--preload", handle.name]
    with RemoteServer(*server_args) as server:
        _mark_as_billed_by_the_nightly(today.add(days=-1).date())
        before = server.summary()
        outcome = _run_in_task(rows=backfill)
        after = server.summary()
    os.unlink(handle.name)
    resent = after["stats"].get("v1_meter_event", 0) + after["stats"].get("v2_stream", 0)
    print(
        f"operator: {outcome['aggregates']} customer-days ({outcome['skipped_too_old']} rows too old), "
        f"{outcome['summary_requests']} summary look-ups, {resent} events sent, "
        f"{outcome['already_recorded']} already recorded, {outcome['rate_limited']} 429s, "
        f"{outcome['wall']:.1f} s end to end; events on the server {before['events']} -> {after['events']}"
    )
    print(
        f"RESULT truth-b: seconds = {outcome['wall']:.0f} / 300 = {outcome['wall'] / 300:.2f} (target < 1); "
        f"aggregates re-sent = {resent} (target 0)"
    )


def bench_scale(customers: int, max_rps: float) -> None:
    """Bill and reconcile ``customers`` customers for yesterday, each phase against Stripe's limits.

    (1) the first nightly run sends on the v2 stream, against Stripe's 10,000 events/s; (2) a
    re-run looks every customer up in the summaries and sends nothing, and (3) the reconcile
    sensor reads every customer's summaries: both against ``max_rps`` (the summaries read rate
    the operator is given; Stripe's live limit for the account is 1,000 requests/s, shared).
    """
    print(
        f"\n## scale: {customers} customers billed for yesterday, then looked up and reconciled; "
        f"summaries paced at max_rps={max_rps:.0f}, server 20 ms latency, in its own process"
    )
    rows = _rows(customers, 1, seed=11)
    with RemoteServer("--latency", "0.02") as server:
        first = _run_in_task(rows=rows, api="v2_stream", max_rps=max_rps)
        duplicates, lost = _check_exactly_once(server, customers)
        stream_rate = first["sent"] / first["wall"]
        print(
            f"(1) first billing: {first['sent']} sent in {first['wall']:.1f} s = {stream_rate:,.0f} events/s "
            f"end to end; duplicates {duplicates}, lost {lost}"
        )
        again = _run_in_task(rows=rows, api="v2_stream", max_rps=max_rps)
        lookup_rate = again["summary_requests"] / again["wall"]
        print(
            f"(2) re-run: {again['summary_requests']} summary look-ups, {again['sent']} sent, "
            f"{again['already_recorded']} already recorded, {again['wall']:.1f} s end to end = "
            f"{lookup_rate:,.0f} look-ups/s"
        )
        report = _run_in_task(kind="sensor", rows=rows, max_rps=max_rps, settle_timeout=0)
        reconcile_rate = customers / report["wall"]
        print(
            f"(3) reconcile: {report['counts']}, {report['wall']:.1f} s end to end = "
            f"{reconcile_rate:,.0f} summary reads/s"
        )
        events = server.summary()["events"]
    print(
        f"RESULT scale-1: stream events/s / Stripe's 10,000 = {stream_rate / 10_000:.2f}; "
        f"RESULT scale-2: look-ups/s / max_rps = {lookup_rate / max_rps:.2f} (target >= 0.9); "
        f"RESULT scale-3: reconcile reads/s / max_rps = {reconcile_rate / max_rps:.2f} (target >= 0.9); "
        f"Stripe holds {events} events for {customers} customer-days"
    )


def _mark_as_billed_by_the_nightly(day: Any) -> None:
    """Leave the mark last night's run of the operator leaves on the day it billed.

    The preloaded events stand for what the nightly DAG sent; a nightly run also marks its fresh
    day (an Airflow Variable) before sending, and that mark is what makes later runs look first.
    """
    from airflow.models.variable import Variable

    from airflow_provider_stripe_meter.hooks.stripe import StripeHook
    from airflow_provider_stripe_meter.state.day_journal import SentDays

    meter_id = StripeHook().active_meter(EVENT)["id"]
    Variable.set(SentDays(None, meter_id, "usage").day_key(day), json.dumps({"dag_id": "nightly"}))


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


def _inner_sql(mode: str, db: str) -> None:
    """Run in a fresh process: one path over the table, print seconds and memory as JSON."""
    _airflow_env()
    os.environ["AIRFLOW_CONN_USAGE_DB"] = json.dumps({"conn_type": "sqlite", "host": db})
    sql = "SELECT customer_id, tokens, used_at FROM usage"
    op = _operator(sql=sql, sql_conn_id="usage_db")
    from airflow.sdk import BaseHook

    from airflow_provider_stripe_meter.sources import row_chunks
    from airflow_provider_stripe_meter.utils.aggregation import paused_gc

    BaseHook.get_connection("usage_db").get_hook()  # imports and connection lookup outside the timing
    sampler = _RssSampler()
    started = time.perf_counter()
    if mode == "bare":
        rows = sum(
            len(chunk) for chunk in row_chunks(sql=sql, sql_conn_id="usage_db", chunk_size=op.chunk_size)
        )
        extra: dict[str, Any] = {}
    else:
        aggregator = op.read_usage(EVENT)
        with paused_gc():
            aggregates = aggregator.finish()
        rows = aggregator.rows
        extra = {"aggregates": len(aggregates), "fast_chunks": aggregator.fast_chunks}
    seconds = time.perf_counter() - started
    start_mb, peak_mb = sampler.stop()
    print(json.dumps({"rows": rows, "seconds": seconds, "start_mb": start_mb, "peak_mb": peak_mb, **extra}))


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


def bench_sql(n: int, repeats: int) -> None:
    """1,000,000 raw rows from SQLite through the sql path vs a bare fetch of the same rows."""
    print(f"\n## sql path: {n} raw rows from SQLite (5,000 customers, one day), best of {repeats} runs each")
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "usage.db"
        _make_sqlite(db, n)
        results: dict[str, list[dict[str, Any]]] = {"bare": [], "operator": []}
        for _ in range(repeats):
            for mode in ("bare", "operator"):
                out = subprocess.run(
                    [sys.executable, __file__, "--inner-sql", mode, str(db)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    bare = min(results["bare"], key=lambda r: r["seconds"])
    ours = min(results["operator"], key=lambda r: r["seconds"])
    bare_mem = max(r["peak_mb"] - r["start_mb"] for r in results["bare"])
    ours_mem = max(r["peak_mb"] - r["start_mb"] for r in results["operator"])
    print(
        f"bare fetch (fetchmany loop on the same hook and query): {bare['seconds']:.3f} s, "
        f"+{bare_mem:.1f} MB peak"
    )
    print(
        f"operator sql path (fetch + validate + aggregate): {ours['seconds']:.3f} s, "
        f"+{ours_mem:.1f} MB peak, "
        f"{ours['aggregates']} aggregates, {ours['fast_chunks']} fast chunks"
    )
    print(
        f"RESULT sql: time operator/bare = {ours['seconds'] / bare['seconds']:.2f} (target <= 1.5); "
        f"peak memory over bare = {ours_mem - bare_mem:+.1f} MB (target <= 100)"
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", choices=["v1", "stream", "stream-unlimited", "sql", "truth", "import", "scale"]
    )
    parser.add_argument("--scale-customers", type=int, default=100_000)
    parser.add_argument("--scale-max-rps", type=float, default=250.0)
    parser.add_argument("--truth-customers", type=int, default=5_000)
    parser.add_argument("--truth-days", type=int, default=35)
    parser.add_argument("--v1-events", type=int, default=5_000)
    parser.add_argument(
        "--baseline-events", type=int, default=300, help="events the sequential baseline sends"
    )
    parser.add_argument("--stream-events", type=int, default=20_000)
    parser.add_argument("--stream-limit", type=float, default=20.0, help="server stream requests/s")
    parser.add_argument("--sql-rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
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
        bench_stream_unlimited(customers=50_000, per_customer=4)
    if args.only in (None, "sql"):
        bench_sql(args.sql_rows, args.repeats)
    if args.only in (None, "truth"):
        bench_truth(args.truth_customers, args.truth_days)
    if args.only in (None, "import"):
        bench_import(args.import_repeats)
    if args.only in (None, "scale"):
        bench_scale(args.scale_customers, args.scale_max_rps)
    print(f"\n(benchmarks took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
