"""Every benchmark of benchmarks/run.py at a tiny size, end to end, so that a change that breaks
one fails here instead of rotting until someone runs ``./dev bench``.

Each test calls the script's own ``main()`` with its command line (``--only`` one bench, small
sizes), in this process, on the suite's Airflow: the metadata database is the suite's, and the
imports and the in-process execution API that a process's first ``dag.test()`` costs (about 12 s
of CPU) are already paid by the worker. The bench's DAG lives in a DAG bundle of its own, put
first in the bundle list for the test's length. What each bench prints is then checked: the
exactly-once checks it makes itself, and counts that must come out exact. The timings are not
checked (at this size they measure start-up, not rates).

The benches that time fresh processes (``sql``, ``import``) start them here too: they are most
of this file's CPU (each process imports Airflow).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import BUNDLES_VARIABLE, ROOT, fresh_pg_database

pytestmark = pytest.mark.airflow

#: The command line of each bench at its tiny size (the script's defaults stay the real sizes).
TINY: dict[str, list[str]] = {
    "v1": ["--v1-events", "20", "--baseline-events", "3"],
    # 300 events at 100 a stream request: 3 requests.
    "stream": ["--stream-events", "300"],
    "stream-unlimited": ["--unlimited-customers", "100"],
    # In this process: the counts of both paths are what is checked here (four fresh processes
    # importing Airflow would cost 15 s of the suite's time).
    "sql": ["--sql-rows", "2000", "--repeats", "1", "--sql-in-process"],
    "import": ["--import-repeats", "1"],
    "ledger": ["--ledger-customers", "100", "--ledger-days", "2", "--ledger-v1-events", "50"],
    "periods": ["--periods-customers", "40", "--periods-repeats", "1"],
}

#: A line of Airflow's log (structlog's console format), which the task prints among the bench's.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")

_SCRIPT: list[ModuleType] = []


def _script() -> ModuleType:
    """benchmarks/run.py as a module, loaded once per process (it is not a package)."""
    if not _SCRIPT:
        spec = importlib.util.spec_from_file_location(
            "stripe_meter_benchmarks", ROOT / "benchmarks" / "run.py"
        )
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPT.append(module)
    return _SCRIPT[0]


@pytest.fixture
def bench(
    airflow_db: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Callable[..., str]]:
    """Run the script's ``main()`` with the arguments given; return what it printed.

    The ledger is SQLite unless the test names a PostgreSQL database (STRIPE_METER_BENCH_PG_DSN).
    """
    script = _script()
    dags = tmp_path / "stripe_meter_bench"
    bundles = json.loads(os.environ.get(BUNDLES_VARIABLE, "[]"))
    bundle = {
        "name": "stripe_meter_bench",
        "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
        "kwargs": {"path": str(dags)},
    }
    # First in the list: dag.test() looks for a DAG it has not met in each bundle in turn.
    monkeypatch.setenv(BUNDLES_VARIABLE, json.dumps([bundle, *bundles]))
    monkeypatch.setenv("STRIPE_METER_BENCH_DAGS", str(dags))
    monkeypatch.delenv("STRIPE_METER_BENCH_PG_DSN", raising=False)
    monkeypatch.delenv("STRIPE_METER_TEST_PG_DSN", raising=False)
    # The script's scratch files (usage tables, an unused Airflow home) go where pytest cleans up.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # The script sets connections and its own variables in os.environ, for the task it runs:
    # none of them may outlive the test (AIRFLOW_CONN_STRIPE_DEFAULT would reach other tests).
    saved = dict(os.environ)

    def run(*argv: str) -> str:
        monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "run.py"), *argv])
        capsys.readouterr()
        script.main()
        # What the script printed, without Airflow's log lines (a failure shows the bench's own).
        out = "\n".join(line for line in capsys.readouterr().out.splitlines() if not LOG_LINE.match(line))
        assert "(benchmarks took" in out, out
        return out

    try:
        yield run
    finally:
        # The script's files in the Airflow home (here the worker's): its SQLite ledger, the
        # task's arguments and outcome.
        home = Path(os.environ["AIRFLOW_HOME"])
        for name in ("ledger.db", "bench-args.json", "bench-out.json"):
            (home / name).unlink(missing_ok=True)
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def _find(pattern: str, out: str) -> re.Match[str]:
    found = re.search(pattern, out)
    assert found, f"{pattern!r} not in the bench's output:\n{out}"
    return found


def check_v1(out: str) -> None:
    sent = _find(r"operator: (\d+) sent .*429s: \d+; duplicates on server: (\d+); lost: (\d+)", out)
    assert sent.groups() == ("20", "0", "0")
    assert float(_find(r"baseline \(sequential stripe SDK loop, first 3 events\): ([\d.]+)", out)[1]) > 0
    _find(r"RESULT v1: sustained/limit = [\d.]+ .*operator/baseline = [\d.]+x", out)


def check_stream(out: str) -> None:
    sent = _find(r"operator: (\d+) events in (\d+) requests.*duplicates: (\d+); lost: (\d+)", out)
    assert sent.groups() == ("300", "3", "0", "0")
    _find(r"RESULT stream: events/s / \(limit x 100\) = [\d.]+", out)


def check_stream_unlimited(out: str) -> None:
    _find(r"400 raw rows -> 100 events, aggregation included", out)
    sent = _find(r"operator: (\d+) events in .*duplicates: (\d+); lost: (\d+)", out)
    assert sent.groups() == ("100", "0", "0")
    _find(r"RESULT stream-unlimited: .* = [\d.]+", out)


def check_sql(out: str, database: str = "sqlite") -> None:
    # The customers the bench's table holds, counted apart from the operator's aggregation.
    with tempfile.TemporaryDirectory() as tmp:
        if database == "duckdb":
            import duckdb

            path = str(Path(tmp) / "usage.duckdb")
            _script()._make_duckdb(path, 2000)
            with duckdb.connect(path) as duck:
                ((customers,),) = duck.execute("SELECT COUNT(DISTINCT customer_id) FROM usage").fetchall()
        else:
            db = Path(tmp) / "usage.db"
            _script()._make_sqlite(db, 2000)
            with sqlite3.connect(db) as con:
                ((customers,),) = con.execute("SELECT COUNT(DISTINCT customer_id) FROM usage").fetchall()
    assert customers > 1000  # 2,000 rows over 5,000 customers: the check below can fail
    # Both paths, each the same number of customer-days: one per customer (one day).
    for words in ("summed in the database", "row by row on the worker"):
        aggregates = _find(rf"operator sql path, {words}: .*, (\d+) aggregates, (\d+) fast chunks", out)
        assert int(aggregates[1]) == customers
    _find(r"bare fetch .*: [\d.]+ s, \+[\d.-]+ MB peak", out)
    _find(
        rf"RESULT sql \({database}\): time database/bare = [\d.]+ .*peak memory over bare = [+-][\d.]+ MB",
        out,
    )


def check_import(out: str) -> None:
    assert float(_find(r"baseline, import airflow.sdk: (\d+) ms", out)[1]) > 0
    _find(r"then the operators and the sensor: \+[\d.]+ ms", out)
    # What the bench guards beside the time: neither SDK is imported by a DAG file's parse.
    _find(r"stripe or OpenLineage modules imported: none", out)


def check_ledger(out: str) -> None:
    stream = _find(
        r"\(a\) first nightly run, v2 stream.*: ([\d,]+) events, .*duplicates (\d+), lost (\d+)", out
    )
    assert stream.groups() == ("100", "0", "0")
    v1 = _find(
        r"\(a\) first nightly run, v1 .*: ([\d,]+) events, .*429s \d+; duplicates (\d+), lost (\d+)", out
    )
    assert v1.groups() == ("50", "0", "0")
    # 100 customers x 2 days: every row written and accepted, by the ledger and by the baseline.
    fill = _find(r"\(c\) ledger rows .*: ([\d,]+) in [\d.]+ s = [\d,]+ rows/s, ([\d,]+) accepted", out)
    assert (_int(fill[1]), _int(fill[2])) == (200, 200)
    naive = _find(r"baseline \(the first ([\d,]+) of them, .*: [\d,]+ rows/s, ([\d,]+) accepted", out)
    assert (_int(naive[1]), _int(naive[2])) == (200, 200)
    again = _find(
        r"\(b\) re-run over 2 billed days, the usage in SQLite, apart: ([\d,]+) customer-days, (\d+) events "
        r"sent, (\d+) summary reads, ([\d,]+) already recorded",
        out,
    )
    assert again.groups() == ("200", "0", "0", "200")
    _find(r"RESULT ledger-a: stream events/s / limit = [\d.]+ .*v1 events/s / limit = [\d.]+", out)
    _find(r"RESULT ledger-b: re-run seconds / 10 = [\d.]+ .*events 0, summary reads 0", out)
    _find(r"RESULT ledger-c: ledger rows/s = [\d,]+ = [\d.]+x the baseline", out)


def check_periods(out: str) -> None:
    assert int(_find(r"first run \(lists the subscriptions in full\): (\d+) subscription pages", out)[1]) >= 1
    assert _int(_find(r"billing_periods=off: ([\d,]+) events", out)[1]) == 40
    hold = _find(r"billing_periods=hold, a steady-state night: ([\d,]+) events, .*success (\w+), held", out)
    assert hold.groups() == ("40", "True")
    _find(r"RESULT periods: requests with / without = [\d.]+, time with / without", out)


CHECKS: dict[str, Callable[[str], None]] = {
    "v1": check_v1,
    "stream": check_stream,
    "stream-unlimited": check_stream_unlimited,
    "sql": check_sql,
    "import": check_import,
    "ledger": check_ledger,
    "periods": check_periods,
}


def test_every_bench_of_the_script_is_run_here() -> None:
    parser_choices = re.search(
        r'"--only", choices=\[([^\]]*)\]', (ROOT / "benchmarks" / "run.py").read_text()
    )
    assert parser_choices
    assert set(re.findall(r'"([\w-]+)"', parser_choices[1])) == set(TINY) == set(CHECKS)


@pytest.mark.parametrize("name", list(TINY))
def test_the_bench_runs_to_completion_at_a_tiny_size(bench: Callable[..., str], name: str) -> None:
    out = bench("--only", name, *TINY[name])
    if name in ("ledger", "periods"):
        _find(r"ledger on sqlite", out)
    CHECKS[name](out)


@pytest.fixture
def bench_pg_dsn() -> Iterator[str]:
    """A PostgreSQL database of the bench's own, dropped after: the bench drops and creates tables
    that other tests of this worker use. Asked for before ``bench``, which hides the suite's DSN."""
    dsn = os.environ.get("STRIPE_METER_TEST_PG_DSN")
    if not dsn:
        pytest.skip("STRIPE_METER_TEST_PG_DSN not set: no PostgreSQL server (.ci/run starts one)")
    import psycopg2

    name = f"stripe_meter_bench_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    try:
        yield fresh_pg_database(dsn, name)
    finally:
        admin = psycopg2.connect(dsn)
        admin.autocommit = True  # DROP DATABASE cannot run inside a transaction
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.mark.postgres
def test_the_ledger_bench_runs_to_completion_on_postgresql(
    bench_pg_dsn: str, bench: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STRIPE_METER_BENCH_PG_DSN", bench_pg_dsn)
    out = bench("--only", "ledger", *TINY["ledger"])
    _find(r"ledger on postgres", out)
    check_ledger(out)
    # Beside the ledger, the database subtracts it: the days before the run's own stay there.
    beside = _find(
        r"\(b\) re-run over 2 billed days, the usage beside the ledger in PostgreSQL: "
        r"([\d,]+) customer-days, (\d+) events sent, (\d+) summary reads, ([\d,]+) already recorded, "
        r".*aggregated in database, "
        r"([\d,]+) customer-days handed back, ([\d,]+) left in the database",
        out,
    )
    assert beside.groups()[:4] == ("200", "0", "0", "200")
    assert _int(beside[5]) + _int(beside[6]) == 200
    assert _int(beside[6]) >= 100
    _find(r"RESULT ledger-b-beside: re-run beside the ledger / apart = [\d.]+", out)


def test_the_sql_bench_runs_on_duckdb_at_a_tiny_size(bench: Callable[..., str]) -> None:
    pytest.importorskip("duckdb")
    out = bench("--only", "sql", "--sql-db", "duckdb", *TINY["sql"])
    check_sql(out, "duckdb")
