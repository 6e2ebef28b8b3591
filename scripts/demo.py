"""Run the example DAGs with real Airflow against the embedded Stripe server and say what happened.

Needs no Stripe account: a local server that follows Stripe's meter API stands in for Stripe.
Airflow runs with a throwaway home (SQLite metadata DB) under ``.airflow-demo/``, and the usage
table is a SQLite file there, filled with 40 days of made-up token usage.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".airflow-demo"
USAGE_DB = HOME / "usage.db"
CUSTOMERS = ["cus_demo_acme", "cus_demo_globex", "cus_demo_initech", "cus_demo_umbrella"]


#: Where the demo's own lines go (the terminal); Airflow's logs go to LOG_FILE instead.
_STORY = sys.stdout
LOG_FILE = HOME / "airflow.log"


def say(*parts: object) -> None:
    """One line of the demo's story, on the terminal."""
    _STORY.write(" ".join(str(p) for p in parts) + "\n")
    _STORY.flush()


def logs_to_file() -> None:
    """Send everything Airflow writes (stdout and stderr, its structured log lines) to LOG_FILE."""
    global _STORY
    _STORY = os.fdopen(os.dup(1), "w", buffering=1)
    log = open(LOG_FILE, "w")  # noqa: SIM115 - open for the life of the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)


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
            "AIRFLOW_CONN_USAGE_DB": json.dumps({"conn_type": "sqlite", "host": str(USAGE_DB)}),
        }
    )
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True)
    # Airflow 3.1's dag.test() needs the DAGs serialized already (3.2+ does it itself).
    subprocess.run([airflow, "dags", "reserialize"], check=True, capture_output=True)


def seed_usage(today) -> dict[str, int]:
    """Forty days of usage rows; returns yesterday's tokens per customer."""
    rng = random.Random(2026)
    rows = []
    for days_ago in range(1, 41):
        day = today.subtract(days=days_ago)
        for customer in CUSTOMERS:
            for _ in range(rng.randrange(20, 60)):
                moment = day.add(seconds=rng.randrange(86400))
                rows.append((customer, rng.randrange(100, 5_000), moment.strftime("%Y-%m-%d %H:%M:%S")))
    with sqlite3.connect(USAGE_DB) as con:
        con.execute("CREATE TABLE usage (customer_id TEXT, tokens INTEGER, used_at TEXT)")
        con.executemany("INSERT INTO usage VALUES (?, ?, ?)", rows)
        yesterday = today.subtract(days=1).strftime("%Y-%m-%d")
        return dict(
            con.execute(
                "SELECT customer_id, SUM(tokens) FROM usage WHERE date(used_at) = ? GROUP BY customer_id",
                (yesterday,),
            )
        )


def show(event) -> None:
    """Print one recorded event."""
    say(
        f"recorded: customer={event.customer_id} value={event.payload['value']} identifier={event.identifier}"
    )


def states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in dag_run.get_task_instances()}


def outcome(dag_run, task_id: str, key: str = "return_value") -> dict:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id, key=key)
            .one()
        )
        return XComModel.deserialize_value(row)


def branch_taken(dag_run, *candidates: str) -> str:
    task_state = states(dag_run)
    taken = [t for t in candidates if task_state.get(t) == "success"]
    return taken[0] if taken else "none"


def main() -> None:
    import pendulum

    prepare_airflow()
    logs_to_file()
    say(f"(Airflow's own log lines go to {LOG_FILE.relative_to(ROOT)})")
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.1
        from airflow.models.dagbag import DagBag

    from airflow_provider_stripe_meter.testing import LocalStripeServer

    today = pendulum.today("UTC")
    expected = seed_usage(today)
    bag = DagBag(dag_folder=str(HOME / "dags"))
    with LocalStripeServer(meters=["ai_tokens_used"]) as server:
        os.environ["AIRFLOW_CONN_STRIPE_DEFAULT"] = server.connection_json()
        say(f"Embedded Stripe meter server on {server.url} (stands in for api.stripe.com)")

        say("\n== example_stripe_meter_event: one templated event, then branch on success")
        run = bag.get_dag("example_stripe_meter_event").test(
            run_conf={"customer_id": "cus_demo_acme", "tokens": 1234}
        )
        for event in server.ledger.accepted("ai_tokens_used"):
            show(event)
        say(f"branch taken: {branch_taken(run, 'on_recorded', 'on_rejected')} (run state: {run.state})")

        daily = bag.get_dag("example_stripe_daily_usage")
        before = len(server.ledger.accepted())
        say(f"\n== example_stripe_daily_usage for {today.subtract(days=1).to_date_string()} (00:00 UTC run)")
        run = daily.test(logical_date=today)
        result = outcome(run, "bill")
        for event in server.ledger.accepted()[before:]:
            show(event)
        billed = {e.customer_id: int(e.payload["value"]) for e in server.ledger.accepted()[before:]}
        say(f"source table says {expected}; Stripe holds the same: {billed == expected}")
        say(
            f"rows={result['rows']} aggregates={result['aggregates']} sent={result['sent']} "
            f"-> branch taken: {branch_taken(run, 'all_billed', 'alert_billing_team')}"
        )

        say("\n== the same night run again (a cleared run or a retry)")
        first_night = len(server.ledger.accepted()) - before
        run = daily.test(logical_date=today)
        result = outcome(run, "bill")
        again = len(server.ledger.accepted()) - before
        say(
            f"sent={result['sent']} already_recorded={result['already_recorded']}; "
            f"events on the server: {again} ({'unchanged' if again == first_night else 'CHANGED'})"
        )

        frm, to = today.subtract(days=40).to_date_string(), today.to_date_string()
        say(f"\n== example_stripe_usage_backfill from {frm} to {to}: the 35-day window")
        run = bag.get_dag("example_stripe_usage_backfill").test(run_conf={"from_date": frm, "to_date": to})
        result = outcome(run, "bill_range")
        say(
            f"rows={result['rows']} aggregates={result['aggregates']} sent={result['sent']} "
            f"already_recorded={result['already_recorded']} skipped_too_old={result['skipped_too_old']} "
            f"(e.g. {result['samples']['skipped_too_old'][0]})"
        )
        say(f"branch taken: {branch_taken(run, 'all_billed', 'report_unbillable_usage')}")
        reconcile_late_rows(bag, server, today)
        say(
            "\n== example_stripe_reconcile_deferrable: the same check, deferred (dag.test() runs the "
            "trigger in-process; a deployment runs it in the triggerer)"
        )
        run = bag.get_dag("example_stripe_reconcile_deferrable").test(
            logical_date=today, run_conf={"settle_seconds": 0}
        )
        report = outcome(run, "reconcile")
        taken = branch_taken(run, "all_billed", "alert_billing_team")
        say(f"reconcile counts {report['counts']}; branch taken: {taken}")
        say(f"the task's 'Stripe meter' link: {outcome(run, 'reconcile', '_link_StripeMeterLink')}")
        total = sum(int(e.payload["value"]) for e in server.ledger.accepted())
        say(f"\nStripe now holds {len(server.ledger.accepted())} meter events, {total} tokens in all.")


def reconcile_late_rows(bag, server, today) -> None:
    """Late rows and a customer Stripe does not know: bill, reconcile, alert; then again."""
    yesterday = today.subtract(days=1)
    late = [
        ("cus_demo_acme", 500, yesterday.add(hours=23, minutes=50).strftime("%Y-%m-%d %H:%M:%S")),
        ("cus_demo_ghost", 42, yesterday.add(hours=12).strftime("%Y-%m-%d %H:%M:%S")),
    ]
    with sqlite3.connect(USAGE_DB) as con:
        con.executemany("INSERT INTO usage VALUES (?, ?, ?)", late)
    server.ledger.customers = set(CUSTOMERS)  # Stripe knows the four demo customers, not the ghost
    say("\n== late rows arrive for yesterday (+500 tokens for cus_demo_acme) and for cus_demo_ghost,")
    say("   a customer Stripe does not know: example_stripe_reconcile bills, reconciles, corrects")
    dag = bag.get_dag("example_stripe_reconcile")
    for attempt in (1, 2):
        events_before = len(server.ledger.events)
        counted_before = len(server.ledger.accepted())
        run = dag.test(logical_date=today, run_conf={"settle_seconds": 0})
        billed = outcome(run, "bill")
        received = len(server.ledger.events) - events_before
        counted = len(server.ledger.accepted()) - counted_before
        say(
            f"run {attempt}: bill sent {billed['sent']} customer-day(s) ({billed['actions']}); "
            f"Stripe received {received} event(s) and counts {counted} "
            f"(it drops events of a customer it does not know: the reconcile sensor finds them)"
        )
        report = outcome(run, "reconcile")
        say(f"  reconcile counts {report['counts']}")
        for line in report["lines"]:
            if line["status"] != "ok":
                say(
                    f"  {line['status']:<16} {line['day']} {line['customer_id']:<18} "
                    f"expected {line['expected']} recorded {line['recorded']} difference {line['difference']}"
                )
        task_state = states(run)
        taken = [
            t
            for t in ("top_up_late_usage", "alert_billing_team", "all_billed")
            if task_state.get(t) == "success"
        ]
        say(f"  branches taken: {', '.join(taken)}")
        if task_state.get("top_up_late_usage") == "success":
            top_up = outcome(run, "top_up_late_usage")
            say(
                f"  top-up: sent {top_up['sent']} event(s), {top_up['value_sent']} tokens: "
                f"{top_up['corrections']}"
            )
    acme = sum(
        v
        for (c, d), v in server.ledger.figures("ai_tokens_used").items()
        if c == "cus_demo_acme" and d == yesterday.to_date_string()
    )
    with sqlite3.connect(USAGE_DB) as con:
        source = con.execute(
            "SELECT SUM(tokens) FROM usage WHERE customer_id = 'cus_demo_acme' AND date(used_at) = ?",
            (yesterday.to_date_string(),),
        ).fetchone()[0]
    say(f"cus_demo_acme yesterday: source {source} tokens, Stripe {acme}: equal = {acme == source}")


if __name__ == "__main__":
    main()
