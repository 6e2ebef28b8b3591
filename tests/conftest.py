"""Test harness: a throwaway Airflow home with a SQLite metadata DB, and the local Stripe server.

Airflow reads its configuration when first imported, so the environment is set here, before any
test module imports it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pendulum
import pytest

ROOT = Path(__file__).resolve().parent.parent
_HOME = Path(tempfile.mkdtemp(prefix="stripe-meter-airflow-"))
DAGS_FOLDER = _HOME / "dags"
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS_FOLDER)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
# One Fernet key for this process and every Airflow process a test starts (a killed worker's
# Variables must read back here); otherwise each may generate its own before airflow.cfg exists.
os.environ["AIRFLOW__CORE__FERNET_KEY"] = "dGVzdC1vbmx5LWZlcm5ldC1rZXktMzItYnl0ZXMhISE="
os.environ.pop("AIRFLOW_CONN_STRIPE_DEFAULT", None)
#: The example and test DAG files, each in a folder of the DAGs folder that is a DAG bundle of its
#: own: dag.test() parses and serializes every DAG of the bundle that holds the DAG it runs (Airflow
#: 3.2+, on every call), a few DAGs then rather than all of them.
DAG_FILES = [
    *sorted((ROOT / "example_dags").glob("*.py")),
    *sorted(path for path in (ROOT / "tests" / "dags").glob("*.py") if path.name != "__init__.py"),
]
BUNDLES_VARIABLE = "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"
os.environ[BUNDLES_VARIABLE] = json.dumps(
    [
        {
            "name": path.stem,
            "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
            "kwargs": {"path": str(DAGS_FOLDER / path.stem)},
        }
        for path in DAG_FILES
    ]
)

pytest_plugins = ["airflow_provider_stripe_meter.testing.pytest_plugin"]

#: An API key no test output may ever contain.
SECRET_KEY = "sk_test_LEAKCANARY_7f3c9a1e5b"


def _airflow_before_3_2() -> bool:
    from airflow import __version__
    from packaging.version import Version

    return Version(__version__) < Version("3.2")


@pytest.fixture(scope="session")
def migrated_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty metadata DB that ``airflow db migrate`` made, once for every pytest-xdist worker of
    the run (the first to ask makes it, the others wait for it and copy it): migrating costs each
    process that does it seconds of CPU."""
    import fcntl

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above each worker's own
    template = shared / "airflow-migrated.db"
    with open(shared / "airflow-migrated.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not template.exists():
            home = shared / "airflow-migrate-home"
            (home / "dags").mkdir(parents=True, exist_ok=True)
            env = {k: v for k, v in os.environ.items() if k != BUNDLES_VARIABLE}
            env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"))
            airflow = Path(sys.executable).with_name("airflow")
            subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True, env=env)
            os.replace(home / "airflow.db", template)
    return template


@pytest.fixture(scope="session")
def airflow_db(migrated_db_template: Path) -> Path:
    """The metadata DB (a copy of the migrated one), and the example and test DAGs in the DAGs
    folder."""
    from tests.execution_api import build_for_the_newest_version_only

    build_for_the_newest_version_only()  # before any task runs: 3 s of CPU a process, not 9
    for source in DAG_FILES:
        (DAGS_FOLDER / source.stem).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, DAGS_FOLDER / source.stem / source.name)
    copy = _HOME / "airflow.db.copy"
    shutil.copy(migrated_db_template, copy)
    os.replace(copy, _HOME / "airflow.db")
    if "airflow.settings" in sys.modules and getattr(sys.modules["airflow.settings"], "engine", None):
        sys.modules["airflow.settings"].engine.dispose()  # no pooled connection to a file replaced
    if _airflow_before_3_2():
        # Airflow 3.1's dag.test() needs the DAGs serialized already.
        airflow = Path(sys.executable).with_name("airflow")
        env = os.environ.copy()
        subprocess.run([str(airflow), "dags", "reserialize"], check=True, capture_output=True, env=env)
    else:
        # 3.2+ serializes the bundle of the DAG it runs, found by the bundle its DagModel names;
        # a DAG not in the DB yet makes it walk the bundles until one holds it. So every bundle
        # is synced once here, as `airflow dags reserialize` does (in this process, which has
        # Airflow loaded already).
        from tests.bundle_sync import sync_unchanged_bundles_once

        sync_unchanged_bundles_once()  # dag.test() then re-syncs only a bundle that changed
        from airflow.dag_processing.bundles.manager import DagBundlesManager
        from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
        from airflow.utils.session import create_session

        manager = DagBundlesManager()
        with create_session() as session:
            manager.sync_bundles_to_db(session=session)
        for bundle in manager.get_all_dag_bundles():
            bundle.initialize()
            bag = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
            assert not bag.import_errors, bag.import_errors
            sync_bag_to_db(bag, bundle.name, bundle.version)
    return _HOME


def fresh_pg_database(dsn: str, name: str) -> str:
    """Drop and create the PostgreSQL database ``name`` on ``dsn``'s server; its DSN (a URI: it is
    an Airflow connection too)."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg2

    con = psycopg2.connect(dsn)
    con.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with con.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
            cur.execute(f"CREATE DATABASE {name}")
    finally:
        con.close()
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


@pytest.fixture(scope="session", autouse=True)
def pg_database_per_worker() -> Iterator[None]:
    """Give each pytest-xdist worker its own PostgreSQL database, so that tests running at the same
    time on two workers never drop each other's ``usage`` or ledger table."""
    dsn = os.environ.get("STRIPE_METER_TEST_PG_DSN")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not dsn or not worker:
        yield
        return
    # The DSN stays a URI: it is an Airflow connection too (AIRFLOW_CONN_USAGE_PG).
    os.environ["STRIPE_METER_TEST_PG_DSN"] = fresh_pg_database(dsn, f"stripe_meter_{worker}")
    try:
        yield
    finally:
        os.environ["STRIPE_METER_TEST_PG_DSN"] = dsn


#: The longest tests, by the worker that starts them. pytest-xdist's worksteal hands each worker
#: one contiguous share of the collection and lets idle workers steal from the end of another's
#: queue, so a test at the front of a share stays on its worker. Each lane's tests go to the front
#: of its own share: the long tests then run side by side from the start instead of one after
#: another on the first worker (all of them were in the first share before), and every test that
#: forks its DAG runs (``spawn_dag``) shares one worker's fork server, whose start is 9 s of CPU.
LANES = (
    ("tests/system/test_airflow_components.py::",),
    (
        "tests/operators/test_billing_histories.py::test_a_worker_killed",
        "tests/operators/test_billing_histories.py::test_two_runs_at_once",
        "tests/test_lineage.py::test_each_mapped_instance_emits_its_own_accounts_meter",
    ),
    (
        "tests/billing/test_histories_machine.py::",
        "tests/test_footprint.py::test_customer_days_past_every_bound",
        "tests/operators/test_billing_truth.py::test_an_outage_after_a_third_is_ridden_out",
    ),
)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Workers for ``-n auto``: two a core. Over half of each worker's time is spent waiting, not
    computing (the local server's simulated latency and rate limits, outages ridden out in real
    time, runs forked and killed: 248 s of CPU in 3 x 167 s of worker time, measured with a
    ``getrusage`` hook), so fewer workers leave cores idle (on 2 cores: 3 workers 185 s, 4 workers
    151 to 160 s)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, 2 * cores)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put each lane's tests at the front of a worker's share (see :data:`LANES`); with fewer
    workers than lanes, a worker takes several lanes. Every worker orders the same way."""
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    heads: list[list[pytest.Item]] = [[] for _ in range(workers)]
    rest: list[pytest.Item] = []
    for item in items:
        lane = next((i for i, prefixes in enumerate(LANES) if item.nodeid.startswith(prefixes)), None)
        (rest if lane is None else heads[lane % workers]).append(item)
    ordered: list[pytest.Item] = []
    left = len(items)
    for worker, head in enumerate(heads):
        share = left // (workers - worker)  # as worksteal splits the collection at the start
        left -= share
        ordered += head
        ordered += rest[: max(0, share - len(head))]
        del rest[: max(0, share - len(head))]
    items[:] = ordered + rest


@pytest.fixture
def secret_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The local Stripe server, accepting only :data:`SECRET_KEY`, spec checks on, SDK retries 1."""
    from airflow_provider_stripe_meter.testing import LocalStripeServer

    with LocalStripeServer(meters=["ai_tokens_used"], api_keys=[SECRET_KEY], validate_spec=True) as server:
        monkeypatch.setenv(
            "AIRFLOW_CONN_STRIPE_DEFAULT", server.connection_json(SECRET_KEY, max_network_retries=1)
        )
        yield server
        # What this provider sends must conform to the spec too.
        assert server.spec_violations == [], server.spec_violations
        assert server.request_violations == [], server.request_violations


def dag_bag(folder: str) -> Any:
    """Parse a DAGs folder (DagBag moved from airflow.models in Airflow 3.2)."""
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.1
        from airflow.models.dagbag import DagBag
    return DagBag(dag_folder=folder)


def _dag_file(dag_id: str) -> Path | None:
    """The file of the DAGs folder that names ``dag_id`` (parsing one file, not the folder, saves
    a second or so on every run)."""
    for path in sorted(DAGS_FOLDER.glob("*/*.py")):
        if f'"{dag_id}"' in path.read_text():
            return path
    return None


def run_dag(dag_id: str, **kwargs: Any) -> Any:
    """Run a DAG from the DAGs folder with ``dag.test()`` and return the finished DagRun."""
    path = _dag_file(dag_id)
    bag = dag_bag(str(path or DAGS_FOLDER))
    if bag.get_dag(dag_id) is None:
        bag = dag_bag(str(DAGS_FOLDER))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag(dag_id).test(**kwargs)


def xcoms(dag_run: Any, task_id: str) -> dict[str, Any]:
    """All XComs a task pushed in a run, by key; where the return value is a dict, its keys
    not pushed on their own too (the batch operator pushes only its headline keys, the whole
    result being its return value)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter(
            XComModel.dag_id == dag_run.dag_id,
            XComModel.run_id == dag_run.run_id,
            XComModel.task_id == task_id,
        )
        pushed = {row.key: XComModel.deserialize_value(row) for row in rows}
    returned = pushed.get("return_value")
    return {**returned, **pushed} if isinstance(returned, dict) else pushed


def task_states(dag_run: Any) -> dict[str, str]:
    """Task id to final state."""
    return {
        ti.task_id: str(ti.state.value if hasattr(ti.state, "value") else ti.state)
        for ti in dag_run.get_task_instances()
    }


def rendered_fields(dag_run: Any, task_id: str) -> dict[str, Any]:
    """The rendered template fields Airflow stored for a task."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(RenderedTaskInstanceFields)
            .filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id)
            .one()
        )
        return dict(row.rendered_fields)


# -- usage data shared by the operator and sensor tests ---------------------------------------


def today() -> Any:
    """Midnight UTC of the day the test runs (not of the day the module was imported)."""
    return pendulum.today("UTC")


def at(day_offset: int, seconds: int) -> str:
    """A ``used_at`` value: ``seconds`` after midnight UTC, ``day_offset`` days from today."""
    return today().add(days=day_offset).add(seconds=seconds).strftime("%Y-%m-%d %H:%M:%S")


def day(offset: int) -> str:
    """The ISO date ``offset`` days from today (UTC)."""
    return today().add(days=offset).to_date_string()


@pytest.fixture(autouse=True)
def ledger_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh SQLite database for the billing ledger behind the ``ledger_db`` connection."""
    path = tmp_path / "ledger.db"
    monkeypatch.setenv("AIRFLOW_CONN_LEDGER_DB", json.dumps({"conn_type": "sqlite", "host": str(path)}))
    return path


@pytest.fixture
def usage_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty SQLite ``usage`` table behind the ``usage_db`` connection."""
    path = tmp_path / "usage.db"
    monkeypatch.setenv("AIRFLOW_CONN_USAGE_DB", json.dumps({"conn_type": "sqlite", "host": str(path)}))
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE usage (customer_id TEXT, tokens INTEGER, used_at TEXT)")
    return path


@pytest.fixture
def usage_pg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fresh ``usage`` table on the PostgreSQL server named by STRIPE_METER_TEST_PG_DSN."""
    import os

    dsn = os.environ.get("STRIPE_METER_TEST_PG_DSN")
    if not dsn:
        pytest.skip("STRIPE_METER_TEST_PG_DSN not set: no PostgreSQL server (.ci/run starts one)")
    import psycopg2

    monkeypatch.setenv("AIRFLOW_CONN_USAGE_PG", dsn)
    con = psycopg2.connect(dsn)
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS usage")
        cur.execute("DROP TABLE IF EXISTS stripe_meter_ledger")
        cur.execute("CREATE TABLE usage (customer_id text, tokens bigint, used_at timestamptz)")
    yield con
    con.close()


def add_rows(path: Path, rows: list[Any]) -> Path:
    """Append ``(customer_id, tokens, used_at)`` rows to the usage table."""
    with sqlite3.connect(path) as con:
        con.executemany("INSERT INTO usage VALUES (?, ?, ?)", rows)
    return path


def add_window_rows(path: Path) -> Path:
    """Rows around Stripe's 35-day window: two too old, one inside it, one with a bad customer id."""
    return add_rows(
        path,
        [
            ("cus_old", 7, at(-38, 0)),
            ("cus_old", 8, at(-36, 0)),
            ("cus_new", 5, at(-30, 0)),
            ("user_9", 1, at(-1, 0)),
        ],
    )


def source_totals(path: Path, where: str = "1=1") -> dict[str, int]:
    """Tokens per customer in the usage table (rows matching ``where``)."""
    with sqlite3.connect(path) as con:
        query = f"SELECT customer_id, SUM(tokens) FROM usage WHERE {where} GROUP BY customer_id"
        return dict(con.execute(query))


def advance(server: Any, seconds: float) -> None:
    """Move the local server's clock on, as if ``seconds`` had passed (summaries catch up,
    identifiers older than its window are forgotten)."""
    clock = server.ledger.clock
    server.ledger.clock = lambda: clock() + seconds


class SharedClock:
    """One "now" for the operator (``utils.clock.SYSTEM``) and the local server: tests move both at once."""

    def __init__(self, offset: float = 0.0) -> None:
        import time

        self._time = time.time
        self.offset = offset
        self.fixed: float | None = None

    def __call__(self) -> float:
        return self.fixed if self.fixed is not None else self._time() + self.offset

    def set(self, moment: Any) -> None:
        """Stop the clock at ``moment`` (a pendulum DateTime or unix seconds)."""
        self.fixed = float(moment.timestamp() if hasattr(moment, "timestamp") else moment)

    def advance(self, seconds: float) -> None:
        """Move on by ``seconds`` (from the fixed moment, or by offsetting the real clock)."""
        if self.fixed is not None:
            self.fixed += seconds
        else:
            self.offset += seconds


def share_clock(
    monkeypatch: pytest.MonkeyPatch, server: Any, clock: SharedClock | None = None
) -> SharedClock:
    """Make the operator and ``server`` read the same clock (dag.test() runs tasks in this process)."""
    clock = clock or SharedClock()
    server.ledger.clock = clock
    from airflow_provider_stripe_meter.utils.clock import SYSTEM

    monkeypatch.setattr(SYSTEM, "source", clock)
    return clock


def spawn_dag(dag_id: str, run_conf: dict[str, Any] | None = None) -> Any:
    """Run a DAG with ``dag.test()`` in a process of its own (same Airflow home and connections),
    so a test can ``kill -9`` it at an instant of its choosing, or run two at once. The process
    is forked from one that has Airflow loaded already (:mod:`tests.forkserver`); what it returns
    has the ``pid``, ``wait()`` and ``poll()`` of a :class:`subprocess.Popen`."""
    from tests.forkserver import fork_server

    folder = _dag_file(dag_id) or DAGS_FOLDER
    return fork_server().spawn(dag_id, run_conf or {}, os.environ.copy(), str(folder))
