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
    with LocalStripeServer(meters=["ai_tokens_used", "support_minutes"]) as server:
        os.environ["AIRFLOW_CONN_STRIPE_DEFAULT"] = server.connection_json()
        say(f"Embedded Stripe meter server on {server.url} (stands in for api.stripe.com)")

        say("\n== 1. example_stripe_meter_event: one support call's minutes, then branch on success")
        run = bag.get_dag("example_stripe_meter_event").test(
            run_conf={"customer_id": "cus_demo_acme", "minutes": 45}
        )
        for event in server.ledger.accepted("support_minutes"):
            show(event)
        say(f"branch taken: {branch_taken(run, 'on_recorded', 'on_rejected')} (run state: {run.state})")

        daily = bag.get_dag("example_stripe_daily_usage")
        before = len(server.ledger.accepted())
        say(
            "\n== 2. example_stripe_daily_usage: the 00:00 UTC run bills "
            f"{today.subtract(days=1).to_date_string()}, one event per customer (tokens summed per UTC day)"
        )
        run = daily.test(logical_date=today)
        result = outcome(run, "bill")
        for event in server.ledger.accepted()[before:]:
            show(event)
        billed = {e.customer_id: int(e.payload["value"]) for e in server.ledger.accepted()[before:]}
        say(
            f"tokens per customer in the usage table: {expected}; Stripe holds the same: {billed == expected}"
        )
        say(
            f"{result['rows']} rows read -> {result['aggregates']} customer-days, {result['sent']} sent; "
            f"branch taken: {branch_taken(run, 'all_billed', 'alert_billing_team')}"
        )

        say("\n== 3. the same night again (a cleared run or a retry): the ledger says it is billed")
        first_night = len(server.ledger.accepted()) - before
        run = daily.test(logical_date=today)
        result = outcome(run, "bill")
        again = len(server.ledger.accepted()) - before
        say(
            f"customer-days sent {result['sent']}, already in the ledger {result['already_recorded']}; "
            f"events in Stripe for the night: {again} ({'unchanged' if again == first_night else 'CHANGED'})"
        )

        frm, to = today.subtract(days=40).to_date_string(), today.to_date_string()
        say(
            f"\n== 4. example_stripe_usage_backfill from {frm} to {to}: 40 days, of which Stripe takes "
            "the last 35"
        )
        run = bag.get_dag("example_stripe_usage_backfill").test(run_conf={"from_date": frm, "to_date": to})
        result = outcome(run, "bill_range")
        say(
            f"{result['rows']:,} rows read -> {result['aggregates']} customer-days: {result['sent']} sent, "
            f"{result['already_recorded']} already in the ledger (the night billed in 2); "
            f"{result['skipped_too_old']} rows older than 35 days skipped and reported, "
            f"e.g. {result['samples']['skipped_too_old'][0]}"
        )
        say(f"branch taken: {branch_taken(run, 'all_billed', 'report_unbillable_usage')} (the skipped rows)")
        reconcile_late_rows(bag, server, today)
        say(
            "\n== 6. example_stripe_reconcile_deferrable: the same check with deferrable=True: it waits "
            "in Airflow's triggerer, a small background service, holding no worker (dag.test() runs "
            "the trigger in-process)"
        )
        run = bag.get_dag("example_stripe_reconcile_deferrable").test(
            logical_date=today, run_conf={"settle_seconds": 0}
        )
        report = outcome(run, "reconcile")
        taken = branch_taken(run, "all_billed", "alert_billing_team")
        say(f"reconcile: customer-days per status {report['counts']}; branch taken: {taken}")
        say(f"the task's 'Stripe meter' link: {outcome(run, 'reconcile', '_link_StripeMeterLink')}")
        tokens = server.ledger.accepted("ai_tokens_used")
        say(
            f"\nStripe now holds {len(tokens)} ai_tokens_used events "
            f"({sum(int(e.payload['value']) for e in tokens):,} tokens) and "
            f"{len(server.ledger.accepted('support_minutes'))} support_minutes event."
        )
        close_periods(bag, server, today)


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
    say("\n== 5. late rows arrive for yesterday: +500 tokens for cus_demo_acme, and 42 for cus_demo_ghost,")
    say("   a customer Stripe does not know. example_stripe_reconcile runs on two nights: its batch")
    say("   bills the late rows itself (so its top-up branch has nothing to do), then its reconcile")
    say("   check compares Stripe with the usage table (between checks it gives its worker back)")
    dag = bag.get_dag("example_stripe_reconcile")
    for attempt in (1, 2):
        events_before = len(server.ledger.events)
        counted_before = len(server.ledger.accepted())
        run = dag.test(logical_date=today, run_conf={"settle_seconds": 0})
        billed = outcome(run, "bill")
        received = len(server.ledger.events) - events_before
        counted = len(server.ledger.accepted()) - counted_before
        why = (
            "the ghost's usage is held, not sent (Stripe would answer 200 and drop it), and the check "
            "names the customer"
            if attempt == 1
            else "the ghost's usage is held again; it is sent by the first night after the customer exists"
        )
        say(
            f"night {attempt}: the batch sent {billed['sent']} customer-day(s); Stripe received {received} "
            f"event(s) and counts {counted}: {why}"
        )
        report = outcome(run, "reconcile")
        say(f"  reconcile: customer-days per status {report['counts']}")
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
        say(f"  branch taken: {', '.join(taken)}")
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


def close_periods(bag, server, today) -> None:
    """Subscriptions arrive: bill each customer's usage into its billing periods, check the invoices."""
    yesterday = today.subtract(days=1)
    boundary = yesterday.add(hours=14, minutes=37, seconds=12)
    billing = server.ledger.billing
    billing.grace = 72 * 3600
    price = billing.add_price("ai_tokens_used")
    for customer in CUSTOMERS:
        # Started the day before yesterday; the first (prorated) period ends yesterday at 14:37:12
        # UTC, and monthly periods follow from there.
        billing.subscribe(
            customer,
            price,
            anchor=int(boundary.timestamp()),
            start=int(yesterday.subtract(days=1).timestamp()),
        )
    say(
        f"\n== 7. example_stripe_close_periods: subscriptions arrive; each customer's first period ends "
        f"{boundary.strftime('%Y-%m-%d %H:%M:%S')} UTC, inside the day billed in 2"
    )
    say("   (the account's grace period is 72 h, so that period's draft invoice is still open)")
    run = bag.get_dag("example_stripe_close_periods").test()
    billed, check = outcome(run, "bill"), outcome(run, "check_invoices")
    invoices = billed["invoices"]
    say(
        f"yesterday is now billed in two parts: usage before 14:37:12 is billed on the invoice that closes "
        f"then, usage after it on the next one ({billed['events_sent']} events sent, net of what the ledger "
        f"shows Stripe already holds). Not sent: cus_demo_ghost's usage, as Stripe "
        f"does not know the customer and no invoice would bill it (held, in customer-days: no "
        f"subscription {invoices['no_invoice']['customer_days']}, unknown customer "
        f"{billed['customer_unknown']})"
    )
    figures = billing.invoice_quantities()
    start = yesterday.subtract(days=1)
    with sqlite3.connect(USAGE_DB) as con:
        for customer in CUSTOMERS[:2]:
            source = con.execute(
                "SELECT SUM(tokens) FROM usage WHERE customer_id = ? AND used_at >= ? AND used_at < ?",
                (customer, start.strftime("%Y-%m-%d %H:%M:%S"), boundary.strftime("%Y-%m-%d %H:%M:%S")),
            ).fetchone()[0]
            mine = {(s, e): q for (c, s, e), (q, status) in figures.items() if c == customer}
            closing = next(q for (_, end), q in mine.items() if end == int(boundary.timestamp()))
            say(
                f"  {customer}: usage table from {start.strftime('%Y-%m-%d %H:%M')} to the period's end: "
                f"{source} tokens; its closing invoice (a draft) bills {closing}"
            )
    say(
        f"invoice check: {check['counts']} (draft and upcoming invoices against the source); branch "
        f"taken: {branch_taken(run, 'invoices_match', 'alert_billing_team')} (the ghost's usage is held)"
    )


if __name__ == "__main__":
    main()
