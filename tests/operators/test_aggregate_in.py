"""Where the batch operator aggregates ``sql``: in the database (asked for on SQLite, the default
elsewhere), the same result as on the worker; forced into a database that cannot, it fails
before anything is sent, without retries."""

from __future__ import annotations

import pytest

from tests.conftest import add_rows, at, run_dag, source_totals, task_states, xcoms

pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("airflow_db")]


def _usage(usage_db):
    rows = [(f"cus_{n % 9}", 3 + n % 17, at(-1 - n % 3, 97 * n)) for n in range(300)]
    rows += [("cus_0", 4, at(-1, 500)), ("cus_0", 11, at(-1, 500))]  # a tie in the latest second
    rows += [("user_9", 1, at(-1, 60)), ("cus_old", 8, at(-40, 0)), ("cus_excluded", 50, at(-1, 0))]
    # cus_soon: tomorrow 01:00, over Stripe's 5 minutes ahead whatever the hour the test runs at
    rows += [("cus_frac", "12.5", at(-1, 0)), ("cus_soon", 2, at(1, 3600))]
    return add_rows(usage_db, rows)


@pytest.mark.parametrize(
    "order", [("t_batch_in_database", "t_batch_on_worker")], ids=["database-then-worker"]
)
def test_sql_is_aggregated_in_the_database_and_gives_the_workers_result(secret_server, usage_db, order):
    _usage(usage_db)

    database = xcoms(run_dag(order[0]), "bill")

    assert database["aggregated_in"] == "database"
    assert database["database"]["statements"] >= 2  # the groups, the rows Python checks
    # Only the problem rows crossed to the worker: the bad customer, the fraction, the old and
    # the future row (one each), not the 300 good ones.
    assert database["database"]["rows_checked"] == 4
    expected = source_totals(
        usage_db,
        "customer_id LIKE 'cus_%' AND customer_id NOT IN ('cus_excluded', 'cus_old', 'cus_frac', 'cus_soon')",
    )
    assert secret_server.ledger.totals() == expected
    assert (database["invalid"], database["skipped_too_old"], database["skipped_future"]) == (2, 1, 1)
    # Rows named by their place in the query's result (cus_excluded is not in it).
    assert [s["row"] for s in database["samples"]["invalid"]] == [303, 305]

    # The same source on the worker, with the ledger as the database run left it: nothing to send,
    # and the same figures.
    worker = xcoms(run_dag(order[1]), "bill")

    assert worker["aggregated_in"] == "worker"
    assert worker["aggregated_because"] == "aggregate_in='worker'"
    assert (worker["sent"], worker["already_recorded"]) == (0, database["sent"])
    same = ("rows", "aggregates", "invalid", "skipped_too_old", "skipped_future", "samples", "success")
    assert {k: worker[k] for k in same} == {k: database[k] for k in same}
    assert worker["totals"]["ai_tokens_used"]["value"] == database["totals"]["ai_tokens_used"]["value"]
    assert secret_server.ledger.totals() == expected


def test_forced_into_a_database_that_cannot_fails_at_once_and_sends_nothing(secret_server, usage_db):
    _usage(usage_db)

    dag_run = run_dag("t_batch_database_refused")

    # A parameter error: no retry could fix it (retries=2 in the DAG), nothing was sent.
    assert task_states(dag_run)["bill"] == "failed"
    assert secret_server.stats["v1_meter_event"] == 0
    assert secret_server.ledger.totals() == {}


def test_a_rerun_beside_its_ledger_leaves_the_billed_days_in_the_database(secret_server, usage_db):
    # The ledger is in the usage's own database (no ledger_conn_id): a run after the worker's
    # bills nothing, reads back only the days its coverage holds, and reports what a re-run on
    # the worker reports.
    _usage(usage_db)
    first = xcoms(run_dag("t_batch_on_worker"), "bill")
    before = dict(secret_server.stats)

    database = xcoms(run_dag("t_batch_in_database"), "bill")

    asked = {k: v - before.get(k, 0) for k, v in secret_server.stats.items() if v != before.get(k, 0)}
    assert database["aggregated_in"] == "database"
    left = database["database"]["unchanged"]
    # Of the days before the one the run covers, every customer-day stayed in the database.
    assert left > 0
    assert database["database"]["groups"] + left == first["aggregates"]
    assert (database["sent"], database["events_sent"]) == (0, 0)
    assert database["already_recorded"] == first["sent"]
    before = dict(secret_server.stats)
    worker = xcoms(run_dag("t_batch_on_worker"), "bill")
    # The same requests as a re-run on the worker (the meter read; no customer, no summary).
    assert asked == {k: v - before.get(k, 0) for k, v in secret_server.stats.items() if v != before.get(k, 0)}
    assert "v1_summaries" not in asked
    assert _what(database) == _what(worker)


def _what(xcom: dict) -> dict:
    """What became of the usage: without how it was read, or seconds measured on the way."""
    how = {"aggregated_in", "aggregated_because", "database", "seconds", "return_value"}
    return {k: _what(v) if isinstance(v, dict) else v for k, v in xcom.items() if k not in how}
