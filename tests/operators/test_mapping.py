"""Dynamic task mapping and Connect platforms: one DAG bills many connected accounts or meters.

Real Airflow (``dag.test()``), the real stripe SDK and the account-scoped local server: each
connected account has meters, customers, events and idempotency keys of its own, and an
account the key cannot reach is answered 403 ``account_invalid``, as Stripe does.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from datetime import datetime, timezone

import pytest

from airflow_provider_stripe_meter.testing import LocalStripeServer
from tests.conftest import SECRET_KEY, add_rows, at, run_dag, share_clock

pytestmark = [pytest.mark.airflow, pytest.mark.usefixtures("airflow_db")]
DAY = 86400
ACCOUNTS = ("acct_1North", "acct_1South", "acct_1West")


@pytest.fixture
def platform(monkeypatch):
    """The local server with three connected accounts, each with its own ``ai_tokens_used`` meter."""
    with LocalStripeServer(
        meters=["ai_tokens_used"], accounts=ACCOUNTS, api_keys=[SECRET_KEY], identifier_window=DAY
    ) as server:
        monkeypatch.setenv(
            "AIRFLOW_CONN_STRIPE_DEFAULT", server.connection_json(SECRET_KEY, max_network_retries=1)
        )
        yield server


@pytest.fixture
def connect_usage(usage_db):
    """The platform's usage table: one row per use, with the connected account it belongs to."""
    with sqlite3.connect(usage_db) as con:
        con.execute(
            "CREATE TABLE connect_usage (account TEXT, customer_id TEXT, tokens INTEGER, used_at TEXT)"
        )
    return usage_db


def add_account_rows(path, rows):
    with sqlite3.connect(path) as con:
        con.executemany("INSERT INTO connect_usage VALUES (?, ?, ?, ?)", rows)


def source_per_account(path) -> dict[str, dict[tuple[str, str], int]]:
    """Per account, the source's figure per (customer, UTC day): what Stripe must hold."""
    out: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)
    with sqlite3.connect(path) as con:
        query = "SELECT account, customer_id, date(used_at), SUM(tokens) FROM connect_usage GROUP BY 1, 2, 3"
        for account, customer, day, tokens in con.execute(query):
            out[account][(customer, day)] = tokens
    return dict(out)


def mapped_states(dag_run, task_id: str) -> dict[str, str]:
    """Each mapped instance's final state, by its rendered map index (the account)."""
    return {
        ti.rendered_map_index or str(ti.map_index): str(getattr(ti.state, "value", ti.state))
        for ti in dag_run.get_task_instances()
        if ti.task_id == task_id
    }


def mapped_xcoms(dag_run, task_id: str) -> dict[int, dict]:
    """The XComs of each mapped instance, by map index (with the keys of a dict return value not
    pushed on their own, as :func:`tests.conftest.xcoms`)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    out: dict[int, dict] = defaultdict(dict)
    with create_session() as session:
        for row in session.query(XComModel).filter_by(
            dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id
        ):
            out[row.map_index][row.key] = XComModel.deserialize_value(row)
    for pushed in out.values():
        returned = pushed.get("return_value")
        if isinstance(returned, dict):
            pushed.update({k: v for k, v in returned.items() if k not in pushed})
    return dict(out)


def rows_for(accounts, day_offset: int, start: int = 0) -> list[tuple[str, str, int, str]]:
    """Usage of three customers per account on one day; values differ per account."""
    return [
        (account, f"cus_{c}", 10 * (a + 1) + c + n, at(day_offset, 600 * (start + n)))
        for a, account in enumerate(accounts)
        for c in range(3)
        for n in range(4)
    ]


def test_a_mapped_batch_bills_each_connected_account_its_own_rows_and_nothing_on_the_platform(
    platform, connect_usage, monkeypatch
):
    clock = share_clock(monkeypatch, platform)
    add_account_rows(connect_usage, rows_for(ACCOUNTS, -2) + rows_for(ACCOUNTS, -1))

    first = run_dag("t_mapped_accounts")
    assert mapped_states(first, "bill") == dict.fromkeys(ACCOUNTS, "success")
    source = source_per_account(connect_usage)
    for account in ACCOUNTS:
        assert platform.account(account).figures("ai_tokens_used") == source[account], account
    assert platform.ledger.accepted() == []
    meter_ids = {platform.account(a).meter_for("ai_tokens_used").id for a in ACCOUNTS}
    assert len(meter_ids) == 3  # the same event name is a different meter on each account
    outcomes = [x["return_value"] for x in mapped_xcoms(first, "bill").values()]
    assert sorted(o["sent"] for o in outcomes) == [6, 6, 6]

    # Two days later (past Stripe's 24-hour identifier window) with late rows for every account:
    # each account's marks and look-ups are its own, and only the late rows are sent.
    clock.advance(2 * DAY + 3600)
    late = [(a, "cus_late", 7, at(-1, 80_000)) for a in ACCOUNTS]
    late += [(a, "cus_0", 5, at(-2, 80_000)) for a in ACCOUNTS]
    add_account_rows(connect_usage, late)
    again = run_dag("t_mapped_accounts")
    assert mapped_states(again, "bill") == dict.fromkeys(ACCOUNTS, "success")
    source = source_per_account(connect_usage)
    for account in ACCOUNTS:
        assert platform.account(account).figures("ai_tokens_used") == source[account], account
    assert platform.ledger.accepted() == []
    outcomes = [x["return_value"] for x in mapped_xcoms(again, "bill").values()]
    assert sorted(o["sent"] for o in outcomes) == [2, 2, 2]


def test_an_account_the_key_cannot_reach_is_reported_by_name_and_the_others_are_billed(
    platform, connect_usage, monkeypatch
):
    share_clock(monkeypatch, platform)
    add_account_rows(connect_usage, rows_for((*ACCOUNTS, "acct_1Revoked"), -1))

    dag_run = run_dag("t_mapped_accounts")

    states = mapped_states(dag_run, "bill")
    assert states == {**dict.fromkeys(ACCOUNTS, "success"), "acct_1Revoked": "failed"}
    source = source_per_account(connect_usage)
    for account in ACCOUNTS:
        assert platform.account(account).figures("ai_tokens_used") == source[account], account
    assert platform.ledger.accepted() == []


def test_the_hook_names_the_account_stripe_refuses(platform, monkeypatch):
    from airflow_provider_stripe_meter.exceptions import StripeAccountInvalidError, StripeConfigurationError
    from airflow_provider_stripe_meter.hooks.stripe import StripeHook

    hook = StripeHook(stripe_account="acct_1Revoked")
    with pytest.raises(StripeAccountInvalidError) as caught:
        hook.active_meter("ai_tokens_used")
    assert "acct_1Revoked" in str(caught.value)
    assert caught.value.details["account"] == "acct_1Revoked"
    assert (caught.value.details["http_status"], caught.value.details["code"]) == (403, "account_invalid")
    assert isinstance(caught.value, StripeConfigurationError)  # no retry is spent on it
    assert SECRET_KEY not in str(caught.value)


def test_each_mapped_instance_updates_its_own_accounts_meter_asset(platform, connect_usage, monkeypatch):
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    share_clock(monkeypatch, platform)
    add_account_rows(connect_usage, rows_for(ACCOUNTS, -1))

    dag_run = run_dag("t_mapped_accounts")

    with create_session() as session:
        events = (
            session.query(AssetModel.uri, AssetEvent.extra)
            .join(AssetEvent, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetEvent.source_run_id == dag_run.run_id)
            .all()
        )
    by_uri = {uri: dict(extra) for uri, extra in events}
    # Each instance also links to its own account's meter in Stripe's dashboard.
    links = sorted(x["_link_StripeMeterLink"] for x in mapped_xcoms(dag_run, "bill").values())
    assert links == [
        f"https://dashboard.stripe.com/{a}/test/meters/{platform.account(a).meter_for('ai_tokens_used').id}"
        for a in ACCOUNTS
    ]
    assert set(by_uri) == {f"stripe://{a}/meters/ai_tokens_used" for a in ACCOUNTS}
    source = source_per_account(connect_usage)
    for account in ACCOUNTS:
        extra = by_uri[f"stripe://{account}/meters/ai_tokens_used"]
        assert (extra["success"], extra["sent"]) == (True, 3)
        assert extra["totals"]["ai_tokens_used"]["value"] == sum(source[account].values())


def test_the_reconcile_sensor_maps_over_accounts(platform, connect_usage, monkeypatch):
    share_clock(monkeypatch, platform)
    add_account_rows(connect_usage, rows_for(ACCOUNTS, -1))
    run_dag("t_mapped_accounts")
    # One account is short of one late row: only its sensor reports it.
    add_account_rows(connect_usage, [("acct_1South", "cus_1", 9, at(-1, 70_000))])

    dag_run = run_dag("t_mapped_reconcile")

    reports = {i: x["return_value"] for i, x in mapped_xcoms(dag_run, "reconcile").items()}
    assert [reports[i]["success"] for i in range(3)] == [True, False, True]
    assert reports[1]["counts"]["short"] == 1
    assert [reports[i]["meter_id"] for i in range(3)] == [
        platform.account(a).meter_for("ai_tokens_used").id for a in ACCOUNTS
    ]


def test_a_batch_mapped_over_two_meters_bills_each(platform, usage_db, monkeypatch):
    share_clock(monkeypatch, platform)
    platform.ledger.add_meter("api_calls", formula="count")
    add_rows(usage_db, [(f"cus_{n % 3}", 10 + n, at(-1, 300 * n)) for n in range(12)])

    dag_run = run_dag("t_mapped_meters")

    assert set(mapped_states(dag_run, "bill").values()) == {"success"}
    tokens: dict[tuple[str, str], int] = defaultdict(int)
    calls: dict[tuple[str, str], int] = defaultdict(int)
    day = datetime.fromtimestamp(at_seconds(-1), timezone.utc).date().isoformat()
    for n in range(12):
        tokens[(f"cus_{n % 3}", day)] += 10 + n
        calls[(f"cus_{n % 3}", day)] += 1
    assert platform.ledger.figures("ai_tokens_used") == dict(tokens)
    assert platform.ledger.figures("api_calls") == dict(calls)


def at_seconds(day_offset: int) -> float:
    return datetime.strptime(at(day_offset, 0), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()


def test_every_operator_and_the_sensor_take_any_argument_in_partial():
    from airflow.sdk import DAG

    from airflow_provider_stripe_meter.operators.meter_event import StripeMeterEventOperator
    from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator
    from airflow_provider_stripe_meter.operators.meter_event_correction import (
        StripeMeterEventCancelOperator,
        StripeMeterTopUpOperator,
    )
    from airflow_provider_stripe_meter.sensors.meter_reconcile import StripeMeterReconcileSensor

    source = {"sql": "SELECT 1", "sql_conn_id": "db", "parameters": {"a": 1}, "chunk_size": 10}
    with DAG("t_partial", schedule=None) as dag:
        StripeMeterEventBatchOperator.partial(task_id="a", event_name="e", **source).expand(
            stripe_account=["acct_1", "acct_2"]
        )
        StripeMeterEventBatchOperator.partial(task_id="b", rows=[["cus_1", 1, 1]]).expand(
            event_name=["x", "y"]
        )
        StripeMeterEventBatchOperator.partial(task_id="c", event_name="e").expand_kwargs(
            [{"stripe_account": "acct_1", **source}]
        )
        StripeMeterReconcileSensor.partial(task_id="d", event_name="e", **source).expand(
            stripe_account=["acct_1"]
        )
        StripeMeterTopUpOperator.partial(task_id="e", event_name="e").expand(reconciliation=[[]])
        StripeMeterEventCancelOperator.partial(task_id="f", event_name="e").expand(identifiers=[["id"]])
        StripeMeterEventOperator.partial(task_id="g", event_name="e", value=1).expand(
            customer_id=["cus_1", "cus_2"]
        )
        StripeMeterEventBatchOperator.partial(task_id="h", event_name="e").expand(
            rows=[[["cus_1", 1, 1]], [["cus_2", 2, 2]]]
        )
    assert len(dag.tasks) == 8
    # A mapped task's meter is known only per instance: its outlet is the meters' alias.
    assert [type(o).__name__ for o in dag.get_task("a").partial_kwargs["outlets"]] == ["AssetAlias"]
    with pytest.raises(TypeError, match="no_such_argument"):
        StripeMeterEventBatchOperator.partial(task_id="z", event_name="e", no_such_argument=1)


def test_the_connect_example_bills_each_account_its_last_whole_day_when_triggered_by_hand(
    platform, usage_db, monkeypatch
):
    share_clock(monkeypatch, platform)
    rows = rows_for(ACCOUNTS, -1) + rows_for(ACCOUNTS, -2)  # the day before is not in the window
    with sqlite3.connect(usage_db) as con:
        con.execute(
            "CREATE TABLE platform_usage (account TEXT, customer_id TEXT, tokens INTEGER, used_at TEXT)"
        )
        con.executemany("INSERT INTO platform_usage VALUES (?, ?, ?, ?)", rows)

    dag_run = run_dag("example_stripe_connect_platform", logical_date=None)

    assert mapped_states(dag_run, "bill") == dict.fromkeys(ACCOUNTS, "success")
    yesterday = at(-1, 0)[:10]
    for account in ACCOUNTS:
        wanted: dict[tuple[str, str], int] = defaultdict(int)
        for row_account, customer, tokens, used_at in rows:
            if row_account == account and used_at.startswith(yesterday):
                wanted[(customer, yesterday)] += tokens
        assert platform.account(account).figures("ai_tokens_used") == dict(wanted), account
    assert platform.ledger.accepted() == []
