"""What lands in Airflow's metadata database stays small at any number of customers.

XCom values and trigger arguments are rows of the metadata database: counts, totals and bounded
samples go there; the full per-customer tables go to the ``report_path`` the user names.
Real Airflow (``dag.test()``), the real stripe SDK and the local server.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict

import pendulum
import pytest

from airflow_provider_stripe_meter.billing.meters import MeterSpec
from airflow_provider_stripe_meter.billing.plans import ledger_identifier
from airflow_provider_stripe_meter.ledger.entries import ACCEPTED, Entry
from airflow_provider_stripe_meter.ledger.store import SqlLedger
from airflow_provider_stripe_meter.testing import LocalStripeServer
from airflow_provider_stripe_meter.triggers.meter_reconcile import StripeMeterReconcileTrigger
from tests.conftest import SECRET_KEY, add_rows, at, day, run_dag, share_clock, task_states, today, xcoms

pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("airflow_db")]
MB = 1_000_000


@pytest.fixture
def server(monkeypatch):
    with LocalStripeServer(meters=["ai_tokens_used"], api_keys=[SECRET_KEY]) as server:
        monkeypatch.setenv(
            "AIRFLOW_CONN_STRIPE_DEFAULT", server.connection_json(SECRET_KEY, max_network_retries=1)
        )
        yield server


@pytest.fixture
def trigger_kwargs(monkeypatch) -> list[dict]:
    """The arguments of every reconcile trigger deferred to, as the metadata database stores them."""
    seen: list[dict] = []
    serialize = StripeMeterReconcileTrigger.serialize

    def recording(self):
        classpath, kwargs = serialize(self)
        seen.append(kwargs)
        return classpath, kwargs

    monkeypatch.setattr(StripeMeterReconcileTrigger, "serialize", recording)
    return seen


def xcom_bytes(dag_run) -> dict[str, int]:
    """Per task, the bytes of every XCom it pushed in the run (every key, ``return_value`` too)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    sizes: dict[str, int] = defaultdict(int)
    with create_session() as session:
        for row in session.query(XComModel).filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id):
            sizes[row.task_id] += len(json.dumps(XComModel.deserialize_value(row)))
    return dict(sizes)


def source_figures(path) -> dict[tuple[str, str], int]:
    with sqlite3.connect(path) as con:
        query = "SELECT customer_id, date(used_at), SUM(tokens) FROM usage GROUP BY 1, 2"
        return {(c, d): v for c, d, v in con.execute(query)}


def test_customer_days_past_every_bound_leave_small_rows_in_airflow_and_full_tables_in_storage(
    server, usage_db, tmp_path, trigger_kwargs, monkeypatch
):
    # Past every bound the results keep: 1,000 plan and reconciliation lines, 5,000 customer-days
    # inline in a trigger's arguments, 5,000 customer-days a slice (5,500 here, 1,100 a day).
    customers, days = 1_100, 5
    # Yesterday goes out on the v2 stream; the days before it were billed by earlier runs,
    # and the ledger leaves them alone without a look at Stripe.
    share_clock(monkeypatch, server).set(today().add(hours=12))
    rows = [
        (f"cus_{c:05d}", 1 + (c * 7 + d) % 97, at(-d, 3600 + c))
        for c in range(customers)
        for d in range(1, days + 1)
    ]
    add_rows(usage_db, rows)
    # What the earlier nights sent: in Stripe, and in the ledger (beside the usage, sql_conn_id).
    meter = server.ledger.meter_for("ai_tokens_used")
    spec = MeterSpec("ai_tokens_used", meter.id)
    store = SqlLedger(lambda: sqlite3.connect(usage_db))
    entries = []
    for customer, value, used_at in rows:
        if not used_at.startswith(day(-1)):
            moment = pendulum.parse(used_at, tz="UTC")
            identifier = ledger_identifier(spec, customer, moment.date(), 1)
            server.ledger.record(
                event_name="ai_tokens_used",
                payload={"stripe_customer_id": customer, "value": str(value)},
                identifier=identifier,
                timestamp=int(moment.timestamp()),
                api="v1",
            )
            stamp = int(moment.timestamp())
            entries.append(
                Entry(
                    "platform",
                    meter.id,
                    "ai_tokens_used",
                    customer,
                    moment.date(),
                    1,
                    identifier,
                    value,
                    stamp,
                    stamp,
                    ACCEPTED,
                    "earlier",
                    "earlier",
                    0.0,
                    0.0,
                )
            )
    store.insert(entries)
    store.close()

    dag_run = run_dag("t_footprint", run_conf={"reports": str(tmp_path)})

    assert task_states(dag_run) == {"bill": "success", "reconcile": "success"}
    assert server.ledger.figures("ai_tokens_used") == source_figures(usage_db)
    sizes = xcom_bytes(dag_run)
    assert set(sizes) == {"bill", "reconcile"}
    assert all(size < MB for size in sizes.values()), sizes
    [kwargs] = trigger_kwargs
    assert len(json.dumps(kwargs)) < MB
    assert kwargs["expectation"] is None  # too large for the row: handed over through storage
    # The full tables are where the user named them, a line per customer-day.
    with open(tmp_path / "bill.jsonl") as bill_table:
        billed = [json.loads(line) for line in bill_table]
    assert len(billed) == customers * days
    outcomes = Counter(line["outcome"] for line in billed)
    assert outcomes == {"sent": customers, "already_recorded": customers * (days - 1)}
    with open(tmp_path / "reconcile.jsonl") as reconcile_table:
        checked = [json.loads(line) for line in reconcile_table]
    assert len(checked) == customers * days
    assert {line["status"] for line in checked} == {"ok"}


def _bounded_rows(usage_db):
    """Twelve customer-days billed, then eight more that Stripe has not seen."""
    add_rows(usage_db, [(f"cus_{c}", 10 + c, at(-1, 60 * c)) for c in range(12)])
    run_dag("t_bill_day", run_conf={"day": day(-1)})
    add_rows(usage_db, [(f"cus_{c}", 5, at(-2, 60 * c)) for c in range(8)])


def test_a_reconciliation_keeps_the_differences_first_and_the_top_up_reads_the_full_table(
    server, usage_db, tmp_path
):
    _bounded_rows(usage_db)

    dag_run = run_dag("t_reconcile_bounded", run_conf={"reports": str(tmp_path)})

    for task_id in ("reconcile", "reconcile_deferred"):
        report = xcoms(dag_run, task_id)["return_value"]
        assert (report["counts"]["missing"], report["counts"]["ok"]) == (8, 12)
        assert (report["lines_total"], report["lines_truncated"]) == (20, True)
        assert [line["status"] for line in report["lines"]] == ["missing"] * 5  # differences first
        assert report["lines_uri"] == f"file://{tmp_path}/{task_id}.jsonl"
        with open(tmp_path / f"{task_id}.jsonl") as table:
            assert len(table.readlines()) == 20
    # The top-up read all eight missing days from the table, not the five kept in XCom.
    top_up = xcoms(dag_run, "top_up")["return_value"]
    assert (top_up["success"], top_up["sent"], top_up["partial_reconciliation"]) == (True, 8, False)
    assert server.ledger.figures("ai_tokens_used") == source_figures(usage_db)


def test_a_truncated_reconciliation_without_a_table_corrects_what_it_kept_and_is_not_a_success(server):
    line = {"customer_id": "cus_1", "day": day(-1), "expected": 5, "recorded": 0, "difference": 5}
    report = {"lines": [{**line, "status": "missing"}], "lines_truncated": True, "lines_uri": None}

    dag_run = run_dag("t_top_up_given", run_conf={"report": report})

    outcome = xcoms(dag_run, "top_up")["return_value"]
    assert (outcome["sent"], outcome["partial_reconciliation"], outcome["success"]) == (1, True, False)
    assert server.ledger.figures("ai_tokens_used") == {("cus_1", day(-1)): 5}


def test_a_deferred_sensor_with_too_much_for_the_trigger_and_no_storage_waits_on_the_worker(
    server, usage_db, trigger_kwargs, monkeypatch
):
    from airflow_provider_stripe_meter.sensors import meter_reconcile

    monkeypatch.setattr(meter_reconcile, "INLINE_EXPECTATION", 3)
    add_rows(usage_db, [(f"cus_{c}", 10 + c, at(-1, 60 * c)) for c in range(4)])
    run_dag("t_bill_day", run_conf={"day": day(-1)})

    dag_run = run_dag("t_reconcile_deferred")

    assert task_states(dag_run) == {"reconcile": "success"}
    assert trigger_kwargs == []  # never deferred: the expectation would not fit the trigger's row
    assert xcoms(dag_run, "reconcile")["counts"]["ok"] == 4


def stripe_meter_variables() -> list[str]:
    """Every Airflow Variable the provider could have written (``stripe_meter.*``)."""
    from airflow.models import Variable
    from airflow.utils.session import create_session

    with create_session() as session:
        return [row.key for row in session.query(Variable).filter(Variable.key.like("stripe_meter.%"))]


def test_usage_billed_late_for_many_customers_is_remembered_in_the_ledger_not_in_airflow(
    server, monkeypatch, ledger_db
):
    clock = share_clock(monkeypatch, server)
    customers = 1_200
    rows = [[f"cus_{c:05d}", 100 + c, at(-40, 600), "ai_tokens_used"] for c in range(customers)]
    server.ledger.customers = {c for c, *_ in rows}  # the account's customers, listed on the first run

    outcome = xcoms(run_dag("t_truth_rows_late", run_conf={"rows": rows}), "bill")

    assert (outcome["success"], outcome["billed_late"]) == (True, customers)
    assert server.ledger.totals("ai_tokens_used") == {c: v for c, v, *_ in rows}
    # One ledger row per customer-day, in the team's database; nothing in Airflow's.
    assert stripe_meter_variables() == []
    with sqlite3.connect(ledger_db) as con:
        assert con.execute("SELECT state, count(*) FROM stripe_meter_ledger GROUP BY 1").fetchall() == [
            ("accepted", customers)
        ]
    # Days on, Stripe long past its identifier window: nothing is billed again.
    clock.advance(3 * 86_400)
    later = xcoms(run_dag("t_truth_rows_late", run_conf={"rows": rows}), "bill")
    assert (later["billed_late"], later["billed_late_before"], later["summary_requests"]) == (0, customers, 0)
    assert server.ledger.totals("ai_tokens_used") == {c: v for c, v, *_ in rows}
