"""What a restricted API key needs: one table, checked against what the package calls and the page.

:data:`ENDPOINTS` names, for every Stripe endpoint the package calls, the restricted-key
permission it needs, as Stripe's 403 names it. The tests hold it to three things:

* the code: every endpoint the hook names (its raw paths, and the paths of the stripe-python
  service methods it calls, read from the SDK itself) is in the table;
* the features: each one (single event, batch with and without billing periods, invoice check,
  reconcile sensor, top-up, cancel, test connection) runs against the local server with a
  restricted key granted exactly what ``docs/permissions.md`` lists for it, succeeds, and calls
  no endpoint outside the table;
* the page: it lists every permission of the table, by its Dashboard name and Stripe's code.

A key that lacks a permission a run needs fails before anything is sent, and says which.

.. seealso:: https://docs.stripe.com/keys/restricted-api-keys
"""

from __future__ import annotations

import inspect
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_stripe_meter.testing.server import (
    _ROUTES,
    PLATFORM_ACCOUNT,
    ROUTE_PERMISSIONS,
    LocalStripeServer,
)
from tests.conftest import at, day

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "permissions.md"
HOOK = ROOT / "airflow_provider_stripe_meter" / "hooks" / "stripe.py"
RESTRICTED_KEY = "rk_test_PERMISSIONCANARY_51c0ffee"
EVENT = "ai_tokens_used"
DAY = 86400

#: Every Stripe endpoint the package calls, and the restricted-key permission it needs (``None``:
#: none of the key's; the v2 stream authenticates with a meter event session's token).
ENDPOINTS: dict[tuple[str, str], str | None] = {
    ("GET", "/v1/billing/meters"): "rak_billing_meter_read",
    ("GET", "/v1/billing/meters/{id}"): "rak_billing_meter_read",
    ("GET", "/v1/billing/meters/{id}/event_summaries"): "rak_billing_meter_read",
    ("POST", "/v1/billing/meter_events"): "rak_billing_meter_event_write",
    ("POST", "/v2/billing/meter_event_session"): "rak_billing_meter_event_write",
    ("POST", "/v2/billing/meter_event_stream"): None,
    ("POST", "/v1/billing/meter_event_adjustments"): "rak_billing_meter_event_adjustment_write",
    ("GET", "/v2/core/events"): "rak_event_read",
    ("GET", "/v1/customers"): "rak_customer_read",
    ("GET", "/v1/customers/{id}"): "rak_customer_read",
    ("GET", "/v1/prices"): "rak_plan_read",
    ("GET", "/v1/subscriptions"): "rak_subscription_read",
    ("GET", "/v1/subscriptions/{id}"): "rak_subscription_read",
    ("GET", "/v1/events"): "rak_event_read",
    ("GET", "/v1/invoices"): "rak_invoice_read",
    ("GET", "/v1/invoices/{id}/lines"): "rak_invoice_read",
    ("POST", "/v1/invoices/create_preview"): "rak_invoice_write",
}

#: Each permission as the Dashboard's restricted-key page sets it (resource: level).
LABELS: dict[str, str] = {
    "rak_billing_meter_read": "Billing meters: Read",
    "rak_billing_meter_event_write": "Meter events: Write",
    "rak_billing_meter_event_adjustment_write": "Meter event adjustments: Write",
    "rak_customer_read": "Customers: Read",
    "rak_plan_read": "Prices: Read",
    "rak_subscription_read": "Subscriptions: Read",
    "rak_invoice_read": "Invoices: Read",
    "rak_invoice_write": "Invoices: Write",
    "rak_event_read": "Events: Read",
}

#: The page's row for each feature, by a phrase of its first cell.
FEATURE_ROWS: dict[str, str] = {
    "single": "`StripeMeterEventOperator`",
    "batch_off": 'billing_periods="off"',
    "batch_hold": 'billing_periods="hold"',
    "invoice_check": "`StripeMeterInvoiceCheckOperator`",
    "reconcile": "`StripeMeterReconcileSensor`",
    "top_up": "`StripeMeterTopUpOperator`",
    "cancel": "`StripeMeterEventCancelOperator`",
    "test_connection": "Test connection",
}


def sample_path(template: str) -> str:
    return template.replace("{id}", "x_1")


def route_name(method: str, template: str) -> str | None:
    """The local server's route for an endpoint (by a path of that shape)."""
    path = sample_path(template)
    return next(
        (name for meth, rx, _, name in _ROUTES if meth == method and rx.fullmatch(path)),
        None,
    )


#: The local server's route name of each endpoint of the table.
ROUTE_OF = {endpoint: route_name(*endpoint) for endpoint in ENDPOINTS}


def page_rows() -> dict[str, tuple[set[str], set[str]]]:
    """The page's feature table: per feature, the permissions it needs and the optional ones."""
    text = PAGE.read_text(encoding="utf-8")
    by_label = {label: code for code, label in LABELS.items()}
    rows: dict[str, tuple[set[str], set[str]]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not line.startswith("|"):
            continue
        feature = next((key for key, phrase in FEATURE_ROWS.items() if phrase in cells[0]), None)
        if feature is None or feature in rows:
            continue
        needed, optional = (
            {by_label[label.strip()] for label in cell.split(";") if label.strip() not in ("", "none")}
            for cell in cells[1:]
        )
        rows[feature] = (needed, optional)
    return rows


# -- the table, the code and the page -----------------------------------------------------------


def test_the_local_server_refuses_what_the_table_says_each_endpoint_needs():
    assert None not in ROUTE_OF.values(), ROUTE_OF
    for endpoint, permission in ENDPOINTS.items():
        assert ROUTE_PERMISSIONS[ROUTE_OF[endpoint]] == permission, endpoint
    # Every route of the server says what it needs (a new route must decide).
    assert {name for *_, name in _ROUTES} == set(ROUTE_PERMISSIONS)


def _sdk_endpoint(chain: str) -> tuple[str, str]:
    """The method and path a stripe-python service method requests, read from the SDK's source."""
    import stripe

    target: Any = stripe.StripeClient("sk_test_unused")
    for part in chain.split("."):
        target = getattr(target, part)
    [(method, path)] = set(re.findall(r'"(get|post|delete)",\s*"(/v[12]/[^"]+)"', inspect.getsource(target)))
    return method.upper(), path


def called_endpoints() -> set[tuple[str, str]]:
    """Every endpoint the hook names: raw requests' paths (all GETs) and the SDK services it calls."""
    source = HOOK.read_text(encoding="utf-8")
    # Raw requests are reads: a write through raw_request would need this parser to learn its method.
    # The one path not written out, a preview's ``lines.url``, is an ``/v1/invoices/{id}/lines``.
    assert set(re.findall(r'raw_request,\s*"(\w+)"', source)) == {"get"}
    raw = {("GET", re.sub(r"\{[^}]*\}", "{id}", path)) for path in re.findall(r'f?"(/v[12]/[^"]*)"', source)}
    sdk = {
        _sdk_endpoint(chain.removesuffix("_async"))
        for chain in re.findall(r"client\.(v[12](?:\.\w+)+)", source)
    }
    return raw | sdk


def test_every_endpoint_the_package_calls_is_in_the_table():
    called = called_endpoints()
    # The hook is the one place that talks to Stripe (the next test); these are its calls.
    assert {("POST", "/v1/billing/meter_events"), ("GET", "/v1/invoices/{id}/lines")} <= called
    assert called - set(ENDPOINTS) == set(), "call a new endpoint: add it to ENDPOINTS and the page"
    # And the table names nothing the package no longer calls.
    assert set(ENDPOINTS) - called == set()


def test_no_module_but_the_hook_calls_stripe():
    package = ROOT / "airflow_provider_stripe_meter"
    callers = {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "testing" not in path.parts
        and re.search(r"raw_request|\bclient\.v[12]\.", path.read_text(encoding="utf-8"))
    }
    assert callers == {"hooks/stripe.py"}


def test_the_page_lists_every_permission_by_its_dashboard_name_and_code():
    text = PAGE.read_text(encoding="utf-8")
    for code in {p for p in ENDPOINTS.values() if p}:
        assert LABELS[code] in text, LABELS[code]
        assert f"`{code}`" in text, code
    rows = page_rows()
    assert set(rows) == set(FEATURE_ROWS), rows
    # Every permission is needed by some feature, and the page's endpoints are the table's.
    assert set().union(*(needed | optional for needed, optional in rows.values())) == set(LABELS)
    for method, path in ENDPOINTS:
        assert f"`{method} {path}`" in text, (method, path)


def test_other_pages_link_to_the_permissions_page_instead_of_listing_permissions():
    for name in ("connection.md", "going-live.md", "reconcile.md", "invoices.md", "batch.md"):
        text = (ROOT / "docs" / name).read_text(encoding="utf-8")
        assert "permissions.md" in text, name
        # No page but this one lists the Dashboard's permissions.
        listed = [label for label in LABELS.values() if label.split(":")[0] + ": **" in text or label in text]
        assert listed == [], (name, listed)


# -- the features, against the local server with a restricted key ------------------------------


def context(task_id: str) -> dict[str, Any]:
    """What the operators read of an Airflow context when run in-process."""
    ti = SimpleNamespace(
        dag_id="permissions", task_id=task_id, run_id="manual__perm", map_index=-1, try_number=1
    )
    ti.xcom_push = lambda *args, **kwargs: None
    outlets: defaultdict[Any, Any] = defaultdict(
        lambda: SimpleNamespace(add=lambda *a, **k: None, extra=None)
    )
    return {"ti": ti, "outlet_events": outlets, "params": {}}


@pytest.fixture
def stripe_world(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalStripeServer]:
    """The local server: a meter, two customers on a metered price (periods 10 days in), one
    customer without a subscription, and the ``stripe_default`` connection on a restricted key."""
    import time

    with LocalStripeServer(
        meters=[EVENT],
        customers=["cus_a", "cus_b", "cus_c"],
        restricted_keys={RESTRICTED_KEY: ()},
        api_keys=[],
        validate_spec=True,
    ) as server:
        billing = server.ledger.billing
        price = billing.add_price(EVENT)
        anchor = int(time.time()) - 10 * DAY
        for customer in ("cus_a", "cus_b"):
            billing.subscribe(customer, price, anchor=anchor, created_at=anchor)
        monkeypatch.setenv(
            "AIRFLOW_CONN_STRIPE_DEFAULT", server.connection_json(RESTRICTED_KEY, max_network_retries=0)
        )
        yield server
        assert server.spec_violations == [], server.spec_violations


ROWS = [["cus_a", 5, at(-1, 3600)], ["cus_b", 7, at(-1, 7200)], ["cus_c", 2, at(-1, 9000)]]


def batch(billing_periods: str, rows: list[list[Any]] = ROWS, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("event_name", EVENT)
    from airflow_provider_stripe_meter.operators.meter_event_batch import StripeMeterEventBatchOperator

    op = StripeMeterEventBatchOperator(
        task_id="bill",
        rows=rows,
        ledger_conn_id="ledger_db",
        billing_periods=billing_periods,
        max_rps=500,
        **kwargs,
    )
    return op.execute(context("bill"))


def run_single(server: LocalStripeServer) -> None:
    from airflow_provider_stripe_meter.operators.meter_event import StripeMeterEventOperator

    op = StripeMeterEventOperator(task_id="one", event_name=EVENT, customer_id="cus_a", value=3)
    assert op.execute(context("one"))["success"] is True
    assert server.ledger.totals() == {"cus_a": 3}


def cancel_a_lost_row(server: LocalStripeServer, billing_periods: str) -> None:
    """A count meter whose source lost a row within Stripe's 24 hours: the batch cancels the day's
    newest event (an adjustment)."""
    server.ledger.add_meter("api_calls", formula="count")
    calls = [["cus_a", 1, at(-1, 60), "api_calls"], ["cus_a", 1, at(-1, 120), "api_calls"]]
    assert batch(billing_periods, calls, event_name=None)["events_sent"] == 2
    again = batch(billing_periods, calls[1:], event_name=None)
    assert (again["ledger"]["cancelled"], server.ledger.totals("api_calls")) == (1, {"cus_a": 1})


def run_batch_off(server: LocalStripeServer) -> None:
    first = batch("off", confirm="summaries")
    assert (first["success"], first["sent"]) == (True, 3)
    stream = batch("off", [["cus_a", 1, at(-2, 60)]], api="v2_stream")
    assert stream["success"] is True
    assert server.ledger.totals(EVENT) == {"cus_a": 6, "cus_b": 7, "cus_c": 2}
    cancel_a_lost_row(server, "off")


def run_batch_hold(server: LocalStripeServer) -> None:
    for _night in range(2):  # the second night reads the subscriptions' changes from events
        outcome = batch("hold")
        # cus_c has no subscription: asked about (Stripe knows it), its usage held, not sent.
        assert (outcome["success"], outcome["customer_unknown"]) == (False, 0)
        assert outcome["invoices"]["no_invoice"]["customer_days"] == 1, outcome["invoices"]
    assert server.ledger.totals(EVENT) == {"cus_a": 5, "cus_b": 7}
    cancel_a_lost_row(server, "hold")


def billed(server: LocalStripeServer, rows: list[list[Any]]) -> None:
    """What an earlier batch run sent, put straight into the server (with no key's permission)."""
    import pendulum

    for n, (customer, value, used_at) in enumerate(rows):
        server.ledger.record(
            event_name=EVENT,
            payload={"stripe_customer_id": customer, "value": str(value)},
            identifier=f"earlier-{n}",
            timestamp=int(pendulum.parse(used_at, tz="UTC").timestamp()),
            api="v1",
        )


def run_invoice_check(server: LocalStripeServer) -> None:
    from airflow_provider_stripe_meter.operators.invoice_check import StripeMeterInvoiceCheckOperator

    billed(server, ROWS)
    for task_id in ("check", "next_check"):  # the second reads the subscriptions' changes from events
        check = StripeMeterInvoiceCheckOperator(
            task_id=task_id, event_name=EVENT, rows=ROWS, ledger_conn_id="ledger_db"
        ).execute(context(task_id))
        # cus_a and cus_b are subscribed: their upcoming invoices bill what the source says.
        assert (check["success"], check["counts"]) == (True, {"ok": 2, "differs": 0})


def reconcile(rows: list[list[Any]]) -> dict[str, Any]:
    from airflow_provider_stripe_meter.sensors.meter_reconcile import StripeMeterReconcileSensor

    sensor = StripeMeterReconcileSensor(
        task_id="reconcile", event_name=EVENT, rows=rows, mode="poke", settle_timeout=0
    )
    done = sensor.poke(context("reconcile"))
    assert not isinstance(done, bool)
    return done.xcom_value


def run_reconcile(server: LocalStripeServer) -> None:
    billed(server, ROWS[:2])
    # cus_c's usage was never sent: the sensor finds it missing and reads Stripe's error reports.
    found = reconcile(ROWS)
    assert found["counts"]["missing"] == 1
    assert found["stripe_errors"] is not None


def run_top_up(server: LocalStripeServer) -> None:
    from airflow_provider_stripe_meter.operators.meter_event_correction import StripeMeterTopUpOperator

    line = {"customer_id": "cus_c", "day": day(-1), "expected": 2, "recorded": 0, "difference": 2}
    topped = StripeMeterTopUpOperator(
        task_id="top_up",
        event_name=EVENT,
        reconciliation=[{**line, "status": "missing"}],
        ledger_conn_id="ledger_db",
    ).execute(context("top_up"))
    assert (topped["success"], topped["sent"]) == (True, 1)
    assert server.ledger.totals() == {"cus_c": 2}


def run_cancel(server: LocalStripeServer) -> None:
    from airflow_provider_stripe_meter.operators.meter_event_correction import StripeMeterEventCancelOperator

    billed(server, [["cus_a", 4, at(0, 0)]])
    cancelled = StripeMeterEventCancelOperator(
        task_id="cancel", event_name=EVENT, identifiers="earlier-0"
    ).execute(context("cancel"))
    assert cancelled["success"] is True
    assert server.ledger.totals() == {}


def run_test_connection(server: LocalStripeServer) -> None:
    from airflow_provider_stripe_meter.hooks.stripe import StripeHook

    assert StripeHook().test_connection()[0] is True


FEATURES: dict[str, Callable[[LocalStripeServer], None]] = {
    "single": run_single,
    "batch_off": run_batch_off,
    "batch_hold": run_batch_hold,
    "invoice_check": run_invoice_check,
    "reconcile": run_reconcile,
    "top_up": run_top_up,
    "cancel": run_cancel,
    "test_connection": run_test_connection,
}


def routes_hit(before: Counter[str], after: Counter[str]) -> set[str]:
    return {name for name in ROUTE_PERMISSIONS if after[name] > before[name]}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_a_key_with_the_pages_permissions_runs_each_feature(stripe_world, feature):
    needed, optional = page_rows()[feature]
    stripe_world.restrict(RESTRICTED_KEY, needed | optional)
    before = Counter(stripe_world.stats)

    FEATURES[feature](stripe_world)

    assert stripe_world.stats["permission_denied"] == 0
    hit = routes_hit(before, stripe_world.stats)
    # Every endpoint the feature called is in the table, and needs a permission the page lists.
    assert hit <= set(ROUTE_OF.values()), hit - set(ROUTE_OF.values())
    used = {ROUTE_PERMISSIONS[name] for name in hit} - {None}
    assert used <= needed | optional, used - (needed | optional)
    # The page lists nothing the feature does not use.
    assert needed | optional <= used, (needed | optional) - used


def test_the_reconcile_sensor_without_events_read_still_compares(stripe_world):
    needed, optional = page_rows()["reconcile"]
    assert optional == {"rak_event_read"}
    stripe_world.restrict(RESTRICTED_KEY, needed)
    billed(stripe_world, ROWS[:2])

    found = reconcile(ROWS)

    assert found["counts"]["missing"] == 1
    assert found["stripe_errors"] is None  # the reports it may not read


# -- a permission missing: the run fails before anything is sent, naming it -------------------


@pytest.mark.parametrize(
    ("feature", "missing", "words"),
    [
        pytest.param("batch_hold", "rak_invoice_read", "Invoices", id="hold-invoices"),
        pytest.param("batch_hold", "rak_plan_read", "Prices", id="hold-prices"),
        pytest.param("batch_hold", "rak_subscription_read", "Subscriptions", id="hold-subscriptions"),
        pytest.param("batch_hold", "rak_customer_read", "Customers: Read", id="hold-customers"),
        pytest.param("batch_off", "rak_customer_read", "Customers: Read", id="off-customers"),
        pytest.param("single", "rak_customer_read", "Customers: Read", id="single-customers"),
    ],
)
def test_a_key_missing_a_permission_fails_before_anything_is_sent_naming_it(
    stripe_world, feature, missing, words
):
    from airflow_provider_stripe_meter.exceptions import StripeConfigurationError

    needed, optional = page_rows()[feature]
    assert missing in needed
    stripe_world.restrict(RESTRICTED_KEY, (needed | optional) - {missing})

    with pytest.raises(StripeConfigurationError) as failed:
        FEATURES[feature](stripe_world)

    message = str(failed.value)
    assert f"'{missing}' permission" in message  # Stripe's own words
    assert words in message  # and the Dashboard's
    assert failed.value.details["http_status"] == 403
    assert RESTRICTED_KEY not in message
    # Nothing reached Stripe: no meter event, by either API.
    assert stripe_world.ledger.events == []
    assert stripe_world.stats["v1_meter_event"] == stripe_world.stats["v2_session"] == 0


def test_a_key_without_adjustments_fails_at_the_cancel_and_the_next_run_cancels(stripe_world):
    from airflow_provider_stripe_meter.exceptions import StripeConfigurationError

    needed, _ = page_rows()["batch_off"]
    stripe_world.restrict(RESTRICTED_KEY, needed - {"rak_billing_meter_event_adjustment_write"})
    stripe_world.ledger.add_meter("api_calls", formula="count")
    calls = [["cus_a", 1, at(-1, 60), "api_calls"], ["cus_a", 1, at(-1, 120), "api_calls"]]
    assert batch("off", calls, event_name=None)["events_sent"] == 2

    # A row is deleted from the source: the run needs to cancel, and may not.
    with pytest.raises(StripeConfigurationError, match="rak_billing_meter_event_adjustment_write"):
        batch("off", calls[1:], event_name=None)
    assert stripe_world.ledger.totals("api_calls") == {"cus_a": 2}

    # With the permission, the next run settles the cancellation the failed one had started.
    stripe_world.restrict(RESTRICTED_KEY, needed)
    again = batch("off", calls[1:], event_name=None)
    assert (again["success"], again["ledger"]["settled"]) == (True, 1)
    assert stripe_world.ledger.totals("api_calls") == {"cus_a": 1}


def test_a_key_that_may_not_send_sends_nothing_and_the_next_run_sends_it_all(stripe_world):
    from airflow_provider_stripe_meter.exceptions import StripeConfigurationError

    needed, _ = page_rows()["batch_off"]
    stripe_world.restrict(RESTRICTED_KEY, needed - {"rak_billing_meter_event_write"})
    with pytest.raises(StripeConfigurationError, match="rak_billing_meter_event_write"):
        batch("off")
    assert stripe_world.ledger.events == []

    stripe_world.restrict(RESTRICTED_KEY, needed)
    assert batch("off")["success"] is True
    assert stripe_world.ledger.totals() == {"cus_a": 5, "cus_b": 7, "cus_c": 2}


def test_the_local_server_answers_a_missing_permission_as_stripe_does(stripe_world):
    import stripe

    stripe_world.restrict(RESTRICTED_KEY, {"rak_billing_meter_write"})
    client = stripe.StripeClient(
        RESTRICTED_KEY, base_addresses={"api": stripe_world.url}, max_network_retries=0
    )
    # Write includes Read.
    assert [m.event_name for m in client.v1.billing.meters.list()] == [EVENT]
    with pytest.raises(stripe.PermissionError) as refused:
        client.v1.invoices.list()
    assert refused.value.http_status == 403
    error = (refused.value.json_body or {})["error"]
    assert error == {
        "type": "invalid_request_error",
        "message": "The provided key 'rk_test_****ffee' does not have the required permissions for this "
        f"endpoint on account '{PLATFORM_ACCOUNT}'. Having the 'rak_invoice_read' permission would allow "
        "this request to continue.",
    }
    with pytest.raises(ValueError, match="rak_invoices_read"):
        stripe_world.restrict(RESTRICTED_KEY, {"rak_invoices_read"})
