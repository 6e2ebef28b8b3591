"""The local server answers with objects exactly as stripe-python 16.1.0 types them, and the
package reads and sends only what those types and params declare.

stripe-python's typed classes are generated from Stripe's OpenAPI spec for the version it pins
(2026-10-28.endive): a field annotated without ``Optional`` is always sent, and Stripe sends no
field the class does not declare (docs.stripe.com/api/versioning, docs.stripe.com/upgrades). The
checker here walks a JSON object against such a class, nested classes, ``ListObject[...]``,
``ExpandableField[...]`` (an id or the object) and lists included.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import sys
import types
import typing
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import pytest
import stripe
from stripe._list_object import ListObject
from stripe._stripe_object import StripeObject, UntypedStripeObject
from stripe.billing import Meter, MeterEvent, MeterEventAdjustment, MeterEventSummary
from stripe.params._price_list_params import PriceListParamsRecurring
from stripe.params.v2.core._event_list_params import EventListParams as V2EventListParams

from airflow_provider_stripe_meter.testing import DEFAULT_API_KEY, LocalStripeServer

DAY = 86400
FIXTURES = Path("/work/shared/stripe-openapi/fixtures-billing.json")

# -- the checker ---------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _imported_names(module: types.ModuleType) -> dict[str, Any]:
    """Every name ``module`` imports, those behind ``if TYPE_CHECKING:`` too (stripe's modules
    import the classes they annotate with only there, so ``get_type_hints`` alone cannot resolve them)."""
    names: dict[str, Any] = {}
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            try:
                source = importlib.import_module(node.module)
            except ImportError:
                continue
            for alias in node.names:
                if hasattr(source, alias.name):
                    names[alias.asname or alias.name] = getattr(source, alias.name)
    return names


def hints(cls: type) -> dict[str, Any]:
    """The fields ``cls`` declares (its bases' too), annotations resolved; ClassVars and privates left out."""
    if cls not in _HINTS:
        out: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            if "__annotations__" not in vars(klass) or klass in (StripeObject, object, dict):
                continue
            module = sys.modules[klass.__module__]
            globalns = {**vars(module), **_imported_names(module)}
            localns = dict(vars(klass))
            # Only this class's own annotations (get_type_hints would walk the bases in this namespace).
            own = type("Own", (), {"__annotations__": dict(vars(klass)["__annotations__"])})
            resolved = typing.get_type_hints(own, globalns=globalns, localns=localns)
            for name in vars(klass)["__annotations__"]:
                hint = resolved[name]
                if not name.startswith("_") and typing.get_origin(hint) is not ClassVar:
                    out[name] = hint
        _HINTS[cls] = out
    return _HINTS[cls]


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) is Union and type(None) in typing.get_args(hint)


def _is_object_type(hint: Any) -> bool:
    base = typing.get_origin(hint) or hint
    return _stripe_class(base) or base is dict


def _stripe_class(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, StripeObject)


def check(value: Any, hint: Any, path: str) -> list[str]:
    """What is wrong with ``value`` as a ``hint`` at ``path`` (empty: nothing)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return []
    if value is None:
        return [] if _optional(hint) or hint is type(None) else [f"{path}: null, not Optional"]
    if origin is Union:  # Optional[X], ExpandableField[X] = Union[str, X], Union[A, B]
        choices = [choice for choice in args if choice is not type(None)]
        found = [check(value, choice, path) for choice in choices]
        if any(not problems for problems in found):
            return []
        # Report against the choice of the value's own kind (an object against the class, not ``str``).
        alike = [
            p
            for choice, p in zip(choices, found, strict=True)
            if _is_object_type(choice) == isinstance(value, dict)
        ]
        return min(alike or found, key=len)
    if origin is Literal:
        return [] if value in args else [f"{path}: {value!r} is not one of {list(args)}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: not a list"]
        return [p for i, item in enumerate(value) for p in check(item, args[0], f"{path}[{i}]")]
    base = origin or hint
    if origin is dict or (_stripe_class(base) and issubclass(base, UntypedStripeObject)):
        return [] if isinstance(value, dict) else [f"{path}: not an object"]
    if _stripe_class(base) and issubclass(base, ListObject):
        if not isinstance(value, dict) or value.get("object") != "list":
            return [f"{path}: not a list object"]
        # ``object`` is always "list"; ``total_count`` is sent where Stripe counts (an expanded
        # list), but ListObject declares neither.
        return _fields(value, {**hints(ListObject), "data": list[args[0]]}, path, "ListObject", {"object"})
    if _stripe_class(base):
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not a {base.__qualname__}"]
        return _fields(value, hints(base), path, base.__qualname__, set())
    kinds: dict[Any, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    if base is Decimal:  # decimals travel as strings
        return [] if isinstance(value, str) else [f"{path}: {value!r} is not a decimal string"]
    if base in kinds:
        ok = isinstance(value, kinds[base]) and (base is bool or not isinstance(value, bool))
        return [] if ok else [f"{path}: {value!r} is not {base.__name__}"]
    return [f"{path}: cannot check {hint!r}"]


def _fields(
    value: dict[str, Any], fields: dict[str, Any], path: str, owner: str, extra: set[str]
) -> list[str]:
    problems = [
        f"{path}.{key}: not declared by stripe {owner}"
        for key in value
        if key not in fields and key not in extra
    ]
    for key, hint in fields.items():
        if key in value:
            problems.extend(check(value[key], hint, f"{path}.{key}"))
        elif not _optional(hint):
            problems.append(f"{path}.{key}: missing, declared always present by stripe {owner}")
    return problems


def assert_shape(value: Any, cls: Any, path: str) -> None:
    """Fail with every difference between ``value`` and stripe-python's ``cls``."""
    problems = check(value, cls, path)
    assert not problems, "\n".join(problems)


def resolve(cls: Any, dotted: str) -> Any:
    """The type of ``dotted`` (``parent.subscription_details.subscription``) in ``cls``.

    :raises KeyError: a part of it is not declared.
    """
    hint = cls
    for part in dotted.split("."):
        hint = _class_of(hint)
        hint = hints(hint)[part]
    return hint


def _class_of(hint: Any) -> Any:
    """The Stripe class inside ``Optional``, ``ExpandableField``, ``ListObject`` or ``List``."""
    while True:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is Union:
            hint = next(a for a in args if a is not type(None) and a is not str)
        elif origin is list:
            hint = args[0]
        elif _stripe_class(origin) and issubclass(origin, ListObject):
            return type("ListOf", (ListObject,), {"__annotations__": {"data": list[args[0]]}})
        else:
            return hint


# -- the checker itself --------------------------------------------------------------------


def test_checker_finds_removed_and_missing_fields():
    fixtures = json.loads(FIXTURES.read_text())["resources"]
    # Stripe's example invoice still shows ``subscription``, gone since 2025-03-31.basil.
    assert check(fixtures["invoice"], stripe.Invoice, "invoice") == [
        "invoice.subscription: not declared by stripe Invoice"
    ]
    for name, cls in [
        ("price", stripe.Price),
        ("subscription", stripe.Subscription),
        ("subscription_item", stripe.SubscriptionItem),
        ("line_item", stripe.InvoiceLineItem),
        ("billing.meter", Meter),
        ("billing.meter_event_summary", MeterEventSummary),
    ]:
        assert check(fixtures[name], cls, name) == []
    line = dict(fixtures["line_item"], period={"start": 1})
    assert check(line, stripe.InvoiceLineItem, "line") == [
        "line.period.end: missing, declared always present by stripe InvoiceLineItem.Period"
    ]
    sub = json.loads(json.dumps(fixtures["subscription"]))
    sub["customer"] = {"id": "cus_1"}  # expanded: checked as a Customer
    sub["items"]["data"][0]["price"]["recurring"]["interval_count"] = "1"
    assert sorted(check(sub, stripe.Subscription, "sub")) == [
        "sub.customer.created: missing, declared always present by stripe Customer",
        "sub.customer.livemode: missing, declared always present by stripe Customer",
        "sub.customer.object: missing, declared always present by stripe Customer",
        "sub.items.data[0].price.recurring.interval_count: '1' is not int",
    ]


# -- what the package reads and sends ------------------------------------------------------

#: Every field the package reads from a Stripe object (hooks/stripe.py, billing/*.py,
#: operators/*.py, sensors/*.py, ledger/subscriptions.py), each once.
READS: dict[Any, list[str]] = {
    stripe.Invoice: [
        "id",
        "customer",
        "status",
        "auto_advance",
        "automatically_finalizes_at",
        "billing_reason",
        "created",
        "period_start",
        "period_end",
        "parent.type",
        "parent.subscription_details.subscription",
        "lines.data",
        "lines.has_more",
        "lines.url",
    ],
    stripe.InvoiceLineItem: [
        "id",
        "period.start",
        "period.end",
        "pricing.price_details.price",
        "parent.subscription_item_details.subscription",
        "quantity",
    ],
    stripe.Event: ["id", "created", "type", "api_version", "data.object"],
    stripe.Subscription: [
        "id",
        "customer",
        "billing_cycle_anchor",
        "start_date",
        "ended_at",
        "cancel_at",
        "created",
        "status",
        "items.data",
    ],
    stripe.SubscriptionItem: ["id", "price", "current_period_start", "current_period_end"],
    stripe.Price: [
        "id",
        "active",
        "type",
        "recurring.meter",
        "recurring.usage_type",
        "recurring.interval",
        "recurring.interval_count",
    ],
    # A deleted customer: stripe-python 16.1.0 has no DeletedCustomer class; ``deleted`` is on Customer.
    stripe.Customer: ["id", "deleted"],
    Meter: [
        "id",
        "event_name",
        "status",
        "customer_mapping.event_payload_key",
        "value_settings.event_payload_key",
        "default_aggregation.formula",
        "event_time_window",
        "status_transitions.deactivated_at",
    ],
    MeterEventSummary: ["aggregated_value", "start_time"],
    MeterEvent: ["identifier", "timestamp", "created"],
    stripe.v2.billing.MeterEventSession: ["authentication_token", "expires_at"],
}

#: Read only from events rendered at an account's default version older than 2025-03-31.basil:
#: the pinned class must NOT declare them (so nothing reads them from a current object).
OLD_API_READS: dict[Any, list[str]] = {stripe.Subscription: ["current_period_start", "current_period_end"]}

#: Every request parameter the package sends, by the params TypedDict of its endpoint (raw GETs
#: like /v1/events and /v1/invoices by the matching ``*ListParams``).
SENDS: dict[Any, list[str]] = {
    stripe.params.InvoiceListParams: ["status", "created", "limit", "starting_after"],
    stripe.params.InvoiceListLinesParams: ["limit", "starting_after"],
    stripe.params.InvoiceCreatePreviewParams: ["customer", "subscription"],
    # No ``active``: archived prices keep billing the subscriptions already on them.
    stripe.params.PriceListParams: ["type", "recurring", "limit", "starting_after"],
    PriceListParamsRecurring: ["usage_type"],
    stripe.params.EventListParams: ["types", "created", "limit", "starting_after"],
    # current_period_end (a filter) still exists at 2026-10-28.endive.
    stripe.params.SubscriptionListParams: [
        "price",
        "status",
        "current_period_end",
        "limit",
        "starting_after",
    ],
    stripe.params.CustomerListParams: ["limit", "starting_after"],
    stripe.params.billing.MeterEventCreateParams: ["event_name", "payload", "identifier", "timestamp"],
    stripe.params.billing.MeterEventAdjustmentCreateParams: ["event_name", "type", "cancel"],
    stripe.params.billing.MeterListParams: ["limit", "status"],
    stripe.params.billing.MeterListEventSummariesParams: [
        "customer",
        "start_time",
        "end_time",
        "value_grouping_window",
        "limit",
    ],
    V2EventListParams: ["object_id", "types", "created"],
}


@pytest.mark.parametrize(
    ("cls", "dotted"),
    [(c, f) for c, fs in READS.items() for f in fs],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_every_field_the_package_reads_is_declared(cls, dotted):
    resolve(cls, dotted)


@pytest.mark.parametrize(("cls", "dotted"), [(c, f) for c, fs in OLD_API_READS.items() for f in fs])
def test_fields_read_only_from_old_versions_are_gone_from_the_pinned_class(cls, dotted):
    with pytest.raises(KeyError):
        resolve(cls, dotted)


@pytest.mark.parametrize(
    ("params", "name"),
    [(p, n) for p, ns in SENDS.items() for n in ns],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_every_parameter_the_package_sends_is_declared(params, name):
    assert name in params.__required_keys__ | params.__optional_keys__


def test_the_tables_list_each_field_once():
    for table in (READS, SENDS):
        for fields in table.values():
            assert len(fields) == len(set(fields))


# -- the server's answers ------------------------------------------------------------------


def client(server: LocalStripeServer) -> stripe.StripeClient:
    return stripe.StripeClient(
        DEFAULT_API_KEY, base_addresses={"api": server.url, "meter_events": server.url}, max_network_retries=0
    )


def get(c: stripe.StripeClient, path: str, **params: Any) -> Any:
    """The JSON Stripe would send (raw: nothing the SDK adds or drops)."""
    return json.loads(c.raw_request("get", path, **params).body)


def post(c: stripe.StripeClient, path: str, **params: Any) -> Any:
    return json.loads(c.raw_request("post", path, **params).body)


def assert_list(page: dict[str, Any], cls: Any, path: str) -> None:
    assert page["data"], f"{path}: nothing listed"
    assert_shape(page, ListObject[cls], path)


def test_meter_endpoints_answer_as_stripe_types_them(stripe_server):
    c = client(stripe_server)
    now = stripe_server.ledger.clock()
    meter = post(
        c,
        "/v1/billing/meters",
        display_name="Calls",
        event_name="api_calls",
        default_aggregation={"formula": "sum"},
    )
    assert_shape(meter, Meter, "meter")
    assert_shape(get(c, f"/v1/billing/meters/{meter['id']}"), Meter, "meter")
    assert_list(get(c, "/v1/billing/meters"), Meter, "meters")
    event = post(
        c,
        "/v1/billing/meter_events",
        event_name="ai_tokens_used",
        payload={"stripe_customer_id": "cus_1", "value": "5"},
        identifier="contract-1",
        timestamp=int(now) - 3600,
    )
    assert_shape(event, MeterEvent, "meter_event")
    adjustment = post(
        c,
        "/v1/billing/meter_event_adjustments",
        event_name="ai_tokens_used",
        type="cancel",
        cancel={"identifier": "contract-1"},
    )
    assert_shape(adjustment, MeterEventAdjustment, "adjustment")
    tokens = stripe_server.ledger.meter_for("ai_tokens_used")
    start = int(now) // DAY * DAY - DAY
    summaries = get(
        c,
        f"/v1/billing/meters/{tokens.id}/event_summaries",
        customer="cus_1",
        start_time=start,
        end_time=start + 2 * DAY,
        value_grouping_window="day",
    )
    assert_list(summaries, MeterEventSummary, "summaries")


@pytest.fixture
def billed(stripe_server):
    """Three subscriptions, one canceled, a month of usage, and the clock a little after a renewal."""
    billing = stripe_server.ledger.billing
    now = int(stripe_server.ledger.clock())
    price = billing.add_price("ai_tokens_used")
    subs = [
        billing.subscribe(
            f"cus_c{i}", price, anchor=now - 600 - i * 60, start=now - 40 * DAY, created_at=now - DAY
        )
        for i in range(3)
    ]
    billing.cancel(subs[2], now - 300)
    for i in range(3):
        stripe_server.ledger.record(
            event_name="ai_tokens_used",
            payload={"stripe_customer_id": f"cus_c{i}", "value": "7"},
            identifier=f"use-{i}",
            timestamp=now - 2 * DAY,
            api="v1",
        )
    return stripe_server, subs


#: Each billing endpoint the package reads, called on :func:`billed`: (what it answers, its class).
BILLING_CALLS: dict[str, Any] = {
    "prices": lambda c, subs: (get(c, "/v1/prices"), ListObject[stripe.Price]),
    "subscriptions": lambda c, subs: (
        get(c, "/v1/subscriptions", status="all"),
        ListObject[stripe.Subscription],
    ),
    "draft invoices": lambda c, subs: (get(c, "/v1/invoices", status="draft"), ListObject[stripe.Invoice]),
    "invoices": lambda c, subs: (get(c, "/v1/invoices"), ListObject[stripe.Invoice]),
    "preview": lambda c, subs: (
        post(c, "/v1/invoices/create_preview", subscription=subs[0].id),
        stripe.Invoice,
    ),
    "events": lambda c, subs: (get(c, "/v1/events", limit=100), ListObject[stripe.Event]),
    "event objects": lambda c, subs: (
        [e["data"]["object"] for e in get(c, "/v1/events", limit=100)["data"]],
        list[stripe.Subscription],
    ),
}


@pytest.mark.parametrize("call", list(BILLING_CALLS))
def test_billing_endpoints_answer_as_stripe_types_them(billed, call):
    server, subs = billed
    found, cls = BILLING_CALLS[call](client(server), subs)
    assert found["data"] if isinstance(found, dict) and "data" in found else found, f"{call}: nothing"
    assert_shape(found, cls, call)


def test_the_sdk_reads_an_invoice_s_subscription_where_stripe_puts_it(billed):
    server, subs = billed
    invoice = client(server).v1.invoices.list({"status": "draft"}).data[0]
    assert invoice.parent.subscription_details.subscription in {s.id for s in subs}
    assert "subscription" not in invoice


def test_every_kind_of_draft_lines_and_items_answer_as_stripe_types_them(billed):
    server, subs = billed
    billing = server.ledger.billing
    c = client(server)
    subs[0].other_lines = 10
    now = int(server.ledger.clock())
    end = subs[1].billing_cycle_anchor
    billing.set_auto_advance(subs[1], end, False)
    billing.add_draft("cus_c0")
    billing.add_draft("cus_c1", billing_reason="subscription_update", subscription=subs[1])
    billing.add_draft(
        "cus_c0", billing_reason="subscription_threshold", subscription=subs[0].id, created=now - 5
    )
    billing.archive(subs[0].price)
    billing.set_account_api_version("2024-06-20", since=None)
    drafts = get(c, "/v1/invoices", status="draft", limit=100)
    assert_list(drafts, stripe.Invoice, "drafts")
    assert {i["billing_reason"] for i in drafts["data"]} == {
        "subscription_cycle",
        "manual",
        "subscription_update",
        "subscription_threshold",
    }
    for invoice in drafts["data"]:
        assert_shape(get(c, f"/v1/invoices/{invoice['id']}"), stripe.Invoice, "invoice")
        assert_list(get(c, f"/v1/invoices/{invoice['id']}/lines"), stripe.InvoiceLineItem, "lines")
    preview = post(c, "/v1/invoices/create_preview", subscription=subs[0].id)
    assert_shape(preview, stripe.Invoice, "preview")
    assert_list(get(c, preview["lines"]["url"], limit=3), stripe.InvoiceLineItem, "preview lines")
    assert_list(get(c, "/v1/prices", active="false"), stripe.Price, "archived prices")
    assert_list(get(c, "/v1/subscription_items", subscription=subs[0].id), stripe.SubscriptionItem, "items")
    # At a version before basil, the periods are on the subscription, not on its items.
    events = get(c, "/v1/events", limit=100)
    assert_list(events, stripe.Event, "events")
    for event in events["data"]:
        old = dict(event["data"]["object"])
        assert event["api_version"] == "2024-06-20"
        period = (old.pop("current_period_start"), old.pop("current_period_end"))
        for item in old["items"]["data"]:
            assert "current_period_start" not in item
            item.update(current_period_start=period[0], current_period_end=period[1])
        assert_shape(old, stripe.Subscription, "old event object")
