"""The example DAGs under real Airflow components, as a team's first deployment runs them.

An api-server, scheduler, dag-processor and triggerer (LocalExecutor) in processes of their own,
with a throwaway Airflow home, against the local Stripe server in this process. The test talks to
Airflow only through its public REST API: it unpauses the nightly DAG (the scheduler starts its
scheduled run), triggers it by hand with no logical date, waits for the Asset-scheduled DAG the
billing run feeds, runs the deferrable reconcile DAG through the triggerer, and reads the task's
"Stripe meter" link, then checks what reached Stripe.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_stripe_meter.testing import LocalStripeServer
from tests.conftest import BUNDLES_VARIABLE, ROOT, SECRET_KEY, add_rows, at, day

pytestmark = [pytest.mark.system]
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
# Seconds for the whole story; each wait below is bounded by it. A run takes about 75 s on an
# idle 2-core machine and up to 3 minutes on a loaded one.
DEADLINE = 300.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to every process of ``proc``'s session (it leads its own process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


class Airflow:
    """The components, their environment, and a small client of the public REST API."""

    def __init__(self, home: Path, env: dict[str, str], port: int) -> None:
        self.home, self.env, self.base = home, env, f"http://127.0.0.1:{port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.token = ""
        self.deadline = time.monotonic() + DEADLINE

    def start(self, migrated_db: Path) -> None:
        airflow = str(Path(sys.executable).with_name("airflow"))
        # The metadata DB as `airflow db migrate` leaves a new one (made once for the whole run).
        shutil.copy(migrated_db, self.home / "airflow.db")
        for name in COMPONENTS:
            log = open(self.home / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            args = [airflow, name] + (["--port", self.base.rsplit(":", 1)[1]] if name == "api-server" else [])
            # Each component in a session of its own: stop() ends it with every process it started
            # (log servers, workers), so nothing outlives the test.
            self.procs.append(
                subprocess.Popen(
                    args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        self.token = self.wait(
            lambda: json.loads(self._open("GET", "/auth/token"))["access_token"], "api-server"
        )
        # The api-server answers its REST API before it has built the Execution API that tasks
        # report to: it builds it on the first request there, and serves nothing else meanwhile
        # (7 s on an idle 2-core machine, over 30 s on a loaded one). A task whose first call
        # lands in that pause gives up, and the scheduler marks it failed although it never ran
        # ("task state changed externally"). So the Execution API is built here, before any DAG
        # is unpaused, as a deployment's health check of the api-server would.
        self.wait(lambda: self._open("GET", "/execution/health", timeout=60), "the Execution API")

    def stop(self) -> None:
        # The test is over: a component still shutting down after 5 s (one waited 30 s for its
        # own timeouts) is killed rather than waited for.
        for proc in self.procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            _signal_group(proc, signal.SIGKILL)  # whatever the component left running

    def _open(self, method: str, path: str, body: Any = None, timeout: float = 60) -> bytes:
        # A long timeout rather than a retry: a POST that timed out may still have created its
        # DAG run, and an api-server on a loaded machine can take seconds to answer.
        request = urllib.request.Request(
            self.base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {self.token}"} if self.token else {}),
            },
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return json.loads(self._open(method, "/api/v2" + path, body) or b"null")

    def wait(self, probe: Any, what: str, interval: float = 0.5) -> Any:
        """Call ``probe`` until it returns something truthy (errors count as not yet)."""
        last: Any = None
        while time.monotonic() < self.deadline:
            try:
                found = probe()
            except Exception as err:  # a component still starting answers with errors
                last = err
            else:
                if found:
                    return found
            time.sleep(interval)
        logs = {n: (self.home / f"{n}.log").read_text(errors="replace")[-3000:] for n in COMPONENTS}
        raise AssertionError(f"timed out waiting for {what} (last: {last!r}); logs: {logs}")

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns?order_by=-run_after")["dag_runs"]

    def finished(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        run = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
        return run if run["state"] in ("success", "failed") else None

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        tis = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti["state"] for ti in tis}


@pytest.fixture
def airflow(tmp_path: Path, usage_db: Path, migrated_db_template: Path) -> Any:
    server = LocalStripeServer(
        meters=["ai_tokens_used", "support_minutes"], api_keys=[SECRET_KEY], validate_spec=True
    ).start()
    home = tmp_path / "airflow"
    (home / "dags").mkdir(parents=True)
    for dag_file in (ROOT / "example_dags").glob("*.py"):
        shutil.copy(dag_file, home / "dags" / dag_file.name)
    # The metadata DB is one SQLite file that four components write: a write waits up to 60 s
    # for another component's lock rather than SQLite's default 5 s, after which the api-server
    # answers 500 ("database is locked") on a loaded machine. Airflow imports the connect
    # arguments from $AIRFLOW_HOME/config, which it puts on sys.path.
    (home / "config").mkdir()
    (home / "config" / "system_test_sqlite.py").write_text('CONNECT_ARGS = {"timeout": 60}\n')
    port = _free_port()
    env = {
        # The components read the DAGs folder as one bundle, as a first deployment does.
        **{k: v for k, v in os.environ.items() if k != BUNDLES_VARIABLE},
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        # One signing secret for every component: the api-server checks the tokens tasks carry.
        "AIRFLOW__API_AUTH__JWT_SECRET": "system-test-only-jwt-secret",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "system_test_sqlite.CONNECT_ARGS",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": "system_test_sqlite.CONNECT_ARGS",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
        # A task (and the triggerer) gives each Execution API call 5 s, 5 tries in all: an
        # api-server busy for longer on a loaded machine (one call here waited 33 s) ends the
        # task without its state recorded, and the scheduler then fails it. Airflow's advice for
        # high load is a longer timeout:
        # https://airflow.apache.org/docs/apache-airflow/stable/configurations-ref.html#execution-api-timeout
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
        # One task at a time. A deferrable task's worker reports "success" when it hands over to
        # the triggerer; if the trigger fires (it does at once here) and the scheduler queues the
        # resumed task before that report is read, the scheduler takes the report for the resumed
        # task's end and fails it (Airflow 3.3 bug, apache/airflow#66374 and #72716). With one
        # executor slot, the slot is free again only once the report is read, so the resumed task
        # is queued after it, whatever the load.
        "AIRFLOW__CORE__PARALLELISM": "1",
        # A worker notices its task process has exited within 1 s instead of 5 s: with one slot,
        # each task starts only when the previous one is reaped.
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        # Less needless work on 2 cores: the DAG files parsed once (they do not change during
        # the test) rather than every 30 s.
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
        "AIRFLOW_CONN_STRIPE_DEFAULT": server.connection_json(SECRET_KEY, max_network_retries=1),
    }
    runner = Airflow(home, env, port)
    try:
        runner.start(migrated_db_template)
        yield runner, server
    finally:
        runner.stop()
        server.stop()
    assert server.spec_violations == [], server.spec_violations


def test_the_examples_under_a_scheduler_triggerer_and_api_server(airflow, usage_db):
    runner, server = airflow
    rows = [(f"cus_{c}", 100 * c + d, at(-d, 3_600 * c + 17)) for c in range(1, 6) for d in (1, 2, 3)]
    add_rows(usage_db, rows)
    runner.wait(
        lambda: len(runner.api("GET", "/dags?dag_id_pattern=example_stripe")["dags"]) >= 6, "the DAGs"
    )

    # The nightly DAG: unpaused, the scheduler runs its latest interval (yesterday), and the
    # Asset it updates schedules the downstream DAG.
    runner.api("PATCH", "/dags/example_stripe_after_billing", {"is_paused": False})
    runner.api("PATCH", "/dags/example_stripe_daily_usage", {"is_paused": False})
    scheduled = runner.wait(lambda: runner.runs("example_stripe_daily_usage"), "the scheduled run")[0]
    assert scheduled["run_type"] == "scheduled"
    scheduled = runner.wait(
        lambda: runner.finished("example_stripe_daily_usage", scheduled["dag_run_id"]), "it"
    )
    assert scheduled["state"] == "success"
    states = runner.task_states("example_stripe_daily_usage", scheduled["dag_run_id"])
    assert (states["bill"], states["all_billed"], states["alert_billing_team"]) == (
        "success",
        "success",
        "skipped",
    )
    yesterday = {(c, day(-1)): v for c, v, used_at in rows if used_at[:10] == day(-1)}
    assert server.ledger.figures("ai_tokens_used") == yesterday

    after = runner.wait(lambda: runner.runs("example_stripe_after_billing"), "the Asset-triggered run")[0]
    assert after["run_type"] == "asset_triggered"
    assert (
        runner.wait(lambda: runner.finished("example_stripe_after_billing", after["dag_run_id"]), "it")[
            "state"
        ]
        == "success"
    )

    # "Bill now": the Trigger button's run (no logical date) bills yesterday again: nothing new.
    manual = runner.api("POST", "/dags/example_stripe_daily_usage/dagRuns", {"logical_date": None})
    manual = runner.wait(
        lambda: runner.finished("example_stripe_daily_usage", manual["dag_run_id"]), "manual"
    )
    assert (manual["state"], manual["logical_date"]) == ("success", None)
    assert len(server.ledger.accepted()) == len(yesterday)

    # The task's link to its meter, as the UI's Details tab shows it.
    links = runner.api(
        "GET", f"/dags/example_stripe_daily_usage/dagRuns/{scheduled['dag_run_id']}/taskInstances/bill/links"
    )
    meter_id = server.ledger.meter_for("ai_tokens_used").id
    assert links["extra_links"]["Stripe meter"] == f"https://dashboard.stripe.com/test/meters/{meter_id}"

    # The reconcile DAG by hand bills the three days before today and checks them (reschedule mode).
    checked = trigger(runner, "example_stripe_reconcile", {"settle_seconds": 0})
    states = runner.task_states("example_stripe_reconcile", checked["dag_run_id"])
    assert (checked["state"], states["all_billed"], states["alert_billing_team"]) == (
        "success",
        "success",
        "skipped",
    )
    assert server.ledger.figures("ai_tokens_used") == {(c, used_at[:10]): v for c, v, used_at in rows}

    # The deferrable one waits in the triggerer, whose log of the trigger holds its report.
    run = trigger(runner, "example_stripe_reconcile_deferrable", {"settle_seconds": 0})
    states = runner.task_states("example_stripe_reconcile_deferrable", run["dag_run_id"])
    assert (run["state"], states["reconcile"], states["all_billed"]) == ("success", "success", "success")
    folder = (
        runner.home / "logs" / "dag_id=example_stripe_reconcile_deferrable" / f"run_id={run['dag_run_id']}"
    )
    [trigger_log] = (folder / "task_id=reconcile").glob("attempt=1.log.trigger.*.log")
    fired = [line for line in trigger_log.read_text().splitlines() if "Trigger fired event" in line]
    assert len(fired) == 1
    assert "'ok': 15, 'missing': 0, 'short': 0, 'over': 0, 'customer_unknown': 0" in fired[0]


def trigger(runner: Airflow, dag_id: str, conf: dict[str, Any]) -> dict[str, Any]:
    """Unpause ``dag_id``, trigger it as the UI's button does (no logical date), wait for the end."""
    runner.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
    run = runner.api("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
    return runner.wait(lambda: runner.finished(dag_id, run["dag_run_id"]), f"{dag_id}'s run")
