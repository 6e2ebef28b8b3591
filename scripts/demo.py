"""Run the example DAGs with real Airflow against the embedded Stripe server and say what happened.

Needs no Stripe account: a local server that follows Stripe's meter API stands in for Stripe.
Airflow runs with a throwaway home (SQLite metadata DB) under ``.airflow-demo/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".airflow-demo"


def prepare_airflow() -> None:
    """Point Airflow at a fresh home whose DAGs folder holds the example DAGs."""
    shutil.rmtree(HOME, ignore_errors=True)
    (HOME / "dags").mkdir(parents=True)
    for dag_file in (ROOT / "example_dags").glob("*.py"):
        shutil.copy(dag_file, HOME / "dags" / dag_file.name)
    os.environ.update(
        {
            "AIRFLOW_HOME": str(HOME),
            "AIRFLOW__CORE__DAGS_FOLDER": str(HOME / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("DEMO_LOG_LEVEL", "WARNING"),
        }
    )
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True)


def states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in dag_run.get_task_instances()}


def run_single_event(server) -> None:
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(HOME / "dags")).get_dag("example_stripe_meter_event")
    print("\n== example_stripe_meter_event: one templated event, then branch on success")
    dag_run = dag.test(run_conf={"customer_id": "cus_demo_acme", "tokens": 1234})
    task_state = states(dag_run)
    for event in server.ledger.accepted("ai_tokens_used"):
        print(
            f"recorded: event_name={event.event_name} customer={event.customer_id} "
            f"value={event.payload['value']} identifier={event.identifier} timestamp={event.timestamp}"
        )
    branch = [t for t in ("on_recorded", "on_rejected") if task_state.get(t) == "success"]
    print(f"branch taken: {branch[0] if branch else 'none'} (run state: {dag_run.state})")


def main() -> None:
    prepare_airflow()
    from airflow_provider_stripe_meter.testing import LocalStripeServer

    with LocalStripeServer(meters=["ai_tokens_used"]) as server:
        os.environ["AIRFLOW_CONN_STRIPE_DEFAULT"] = server.connection_json()
        print(f"Embedded Stripe meter server on {server.url} (stands in for api.stripe.com)")
        run_single_event(server)


if __name__ == "__main__":
    main()
