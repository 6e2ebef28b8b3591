"""Stripe hook: owns the ``stripe`` connection, the ``StripeClient`` and every Stripe call."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import date, datetime, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from airflow_provider_stripe_meter.exceptions import (
    StripeAccountInvalidError,
    StripeAdjustmentTooLateError,
    StripeConfigurationError,
    StripeDuplicateIdentifierError,
    StripeMeterError,
    StripeMeterNotFoundError,
    StripeRequestRejectedError,
    StripeSessionExpiredError,
    StripeTransientError,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    import stripe

    from airflow_provider_stripe_meter.utils.rules import MeterEvent

DEFAULT_MAX_NETWORK_RETRIES = 3
DEFAULT_TIMEOUT_SECONDS = 30.0
DUPLICATE_IDENTIFIER_MESSAGE = "An event already exists with identifier"
#: v2 ``POST /v2/billing/meter_events`` names the duplicate with a code.
DUPLICATE_IDENTIFIER_CODES = frozenset({"duplicate_meter_event"})
_EXTRA_KEYS = (
    "stripe_version",
    "stripe_account",
    "max_network_retries",
    "timeout",
    "api_base",
    "meter_events_api_base",
    "summary_lag",
)
#: How long Stripe's meter event summaries may trail accepted events, unless the connection says.
DEFAULT_SUMMARY_LAG = 300.0


class StripeHook(BaseHook):
    """
    Talk to Stripe Billing's meter APIs with the API key of an Airflow ``stripe`` connection.

    The API key lives in the connection's password. Extras (each may be overridden by the
    argument of the same name): ``stripe_version``, ``stripe_account``, ``max_network_retries``,
    ``timeout``, ``api_base`` and ``meter_events_api_base``.

    .. seealso:: https://docs.stripe.com/api/billing/meter-event

    :param stripe_conn_id: Airflow connection of type ``stripe``.
    :param stripe_account: Connected account (``acct_...``) to act for, overriding the connection.
    :param stripe_version: Stripe API version to pin, overriding the connection.
    :param max_network_retries: SDK retries of connection errors, 409 and 5xx (default 3).
    :param timeout: Seconds before an HTTP request is abandoned (default 30).
    :param api_base: Base URL of a Stripe-compatible API server, overriding the connection.
    :param meter_events_api_base: Base URL for the v2 meter event stream, overriding the connection.
    """

    conn_name_attr = "stripe_conn_id"
    default_conn_name = "stripe_default"
    conn_type = "stripe"
    hook_name = "Stripe"

    def __init__(
        self,
        stripe_conn_id: str = default_conn_name,
        *,
        stripe_account: str | None = None,
        stripe_version: str | None = None,
        max_network_retries: int | None = None,
        timeout: float | None = None,
        api_base: str | None = None,
        meter_events_api_base: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.stripe_conn_id = stripe_conn_id
        self._meters: dict[str, list[dict[str, Any]]] | None = None
        # Only arguments given explicitly override the connection; no I/O here (runs at DAG parse).
        self._overrides = {
            key: value
            for key, value in {
                "stripe_account": stripe_account,
                "stripe_version": stripe_version,
                "max_network_retries": max_network_retries,
                "timeout": timeout,
                "api_base": api_base,
                "meter_events_api_base": meter_events_api_base,
            }.items()
            if value is not None
        }

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Return the connection form's custom behaviour, as declared in ``get_provider_info``."""
        from airflow_provider_stripe_meter.get_provider_info import get_provider_info

        [conn] = get_provider_info()["connection-types"]
        return {key.replace("-", "_"): value for key, value in conn["ui-field-behaviour"].items()}

    @cached_property
    def _settings(self) -> dict[str, Any]:
        """Read the connection once: the API key plus extras with argument overrides laid over."""
        conn = self.get_connection(self.stripe_conn_id)
        api_key = conn.password
        if not api_key:
            raise StripeConfigurationError(
                f"Connection {self.stripe_conn_id!r} has no API key (password); "
                "set it to a Stripe secret or restricted key (sk_... / rk_...)."
            )
        extras = {key: value for key, value in conn.extra_dejson.items() if key in _EXTRA_KEYS}
        settings = {
            key: value for key, value in {**extras, **self._overrides}.items() if value not in (None, "")
        }
        settings["api_key"] = api_key
        return settings

    @property
    def max_network_retries(self) -> int:
        """SDK-level retries for each request."""
        return int(self._settings.get("max_network_retries", DEFAULT_MAX_NETWORK_RETRIES))

    @property
    def summary_lag(self) -> float:
        """Seconds Stripe's summaries may trail accepted events (extra ``summary_lag``, default 300).

        Stripe aggregates meter events asynchronously, so its summaries are eventually
        consistent (https://docs.stripe.com/api/billing/meter-event-summary); the lag belongs to
        the endpoint, so the connection carries it.
        """
        return float(self._settings.get("summary_lag", DEFAULT_SUMMARY_LAG))

    @property
    def livemode(self) -> bool:
        """Whether the key is a live one (``sk_live_``/``rk_live_``): live limits apply."""
        return str(self._settings["api_key"]).startswith(("sk_live_", "rk_live_"))

    @property
    def stripe_account(self) -> str | None:
        """The connected account requests act for, if any."""
        return self._settings.get("stripe_account")

    def _new_client(
        self, api_key: str, http_client: Any = None, retries: int | None = None
    ) -> stripe.StripeClient:
        import stripe

        _quiet_sdk_logger()
        settings = self._settings
        base_addresses: dict[str, str] = {}
        if settings.get("api_base"):
            base_addresses["api"] = settings["api_base"]
        if settings.get("meter_events_api_base"):
            base_addresses["meter_events"] = settings["meter_events_api_base"]
        timeout = float(settings.get("timeout", DEFAULT_TIMEOUT_SECONDS))
        return stripe.StripeClient(
            api_key,
            stripe_account=settings.get("stripe_account"),
            stripe_version=settings.get("stripe_version"),
            base_addresses=base_addresses,  # type: ignore[arg-type]
            # None would mean zero retries in stripe-python; always pass a number.
            max_network_retries=self.max_network_retries if retries is None else retries,
            http_client=http_client or stripe.RequestsClient(timeout=timeout),
        )

    @cached_property
    def client(self) -> stripe.StripeClient:
        """The ``stripe.StripeClient`` for this connection, built once per hook."""
        return self._new_client(self._settings["api_key"])

    @cached_property
    def delivery_client(self) -> stripe.StripeClient:
        """A client without the SDK's retries, for calls a deliverer makes and retries itself.

        A batch paces, backs off and rides out outages in one place
        (:class:`~airflow_provider_stripe_meter.utils.delivery.Deliverer`); SDK retries inside
        its attempts would multiply them (3 x 8) and hide the failures its outage gate counts.
        """
        return self._new_client(self._settings["api_key"], retries=0)

    @cached_property
    def async_client(self) -> stripe.StripeClient:
        """A client for the SDK's ``*_async`` methods (``httpx``), for triggers on the event loop."""
        import stripe

        timeout = float(self._settings.get("timeout", DEFAULT_TIMEOUT_SECONDS))
        self._async_http = stripe.HTTPXClient(timeout=timeout)
        return self._new_client(self._settings["api_key"], http_client=self._async_http)

    async def aclose(self) -> None:
        """Close the asynchronous client's connections (a trigger's hook, when it is done)."""
        http = self.__dict__.get("_async_http")
        if http is not None:
            await http.close_async()

    def get_conn(self) -> stripe.StripeClient:
        """Return the ``stripe.StripeClient`` for this connection."""
        return self.client

    def session_client(self, authentication_token: str) -> stripe.StripeClient:
        """Return a client that authenticates with a v2 meter event session token.

        The stream is only ever driven by a deliverer, which retries: no SDK retries here.
        """
        return self._new_client(authentication_token, retries=0)

    # -- error translation -------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        key = self._settings.get("api_key") if "_settings" in self.__dict__ else None
        return text.replace(key, "***") if key else text

    def translate_error(self, err: Exception) -> StripeMeterError:
        """Translate a ``stripe.StripeError`` into this provider's exceptions, keeping the details."""
        import stripe

        if not isinstance(err, stripe.StripeError):
            return StripeMeterError(self._scrub(str(err)))
        error_obj = getattr(err, "error", None)
        message = self._scrub(
            str(getattr(err, "user_message", None) or getattr(error_obj, "message", None) or err)
        )
        headers = err.headers or {}
        details: dict[str, Any] = {
            "type": getattr(error_obj, "type", None) or type(err).__name__,
            # stripe-python leaves ``code`` unset on some classes (PermissionError); the body has it.
            "code": err.code or getattr(error_obj, "code", None),
            "message": message,
            "http_status": err.http_status,
            "request_id": err.request_id,
            "param": getattr(error_obj, "param", None),
        }
        should_retry = headers.get("stripe-should-retry") if hasattr(headers, "get") else None
        if should_retry is not None:
            details["should_retry"] = should_retry == "true"
        summary = f"Stripe {details['http_status'] or 'connection'} {details['type']}: {message}"
        if isinstance(err, stripe.TemporarySessionExpiredError):
            return StripeSessionExpiredError(summary, details)
        if isinstance(err, (stripe.RateLimitError, stripe.APIConnectionError)):
            return StripeTransientError(summary, details)
        if details["code"] == "account_invalid":
            # A platform bills many connected accounts: say which one this key cannot reach.
            details["account"] = self.stripe_account
            return StripeAccountInvalidError(
                f"Connection {self.stripe_conn_id!r} cannot act for connected account "
                f"{self.stripe_account!r}: {summary}",
                details,
            )
        if isinstance(err, (stripe.AuthenticationError, stripe.PermissionError)):
            return StripeConfigurationError(f"Connection {self.stripe_conn_id!r}: {summary}", details)
        status = err.http_status
        if status is None or status >= 500 or status in (409, 429):
            return StripeTransientError(summary, details)
        if _is_duplicate_identifier(details):
            return StripeDuplicateIdentifierError(summary, details)
        return StripeRequestRejectedError(summary, details)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import stripe

        try:
            return fn(*args, **kwargs)
        except stripe.StripeError as err:
            raise self.translate_error(err) from err

    # -- meter events ------------------------------------------------------------------------

    def create_meter_event(
        self,
        event: MeterEvent,
        *,
        customer_payload_key: str = "stripe_customer_id",
        value_payload_key: str = "value",
        retry: bool = True,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Record one meter event through ``POST /v1/billing/meter_events`` and return it as a dict.

        :param event: A validated event; its identifier should be set (derived from the billable
            fact) so that sending it again is refused instead of billed twice.
        :param customer_payload_key: The meter's ``customer_mapping.event_payload_key``.
        :param value_payload_key: The meter's ``value_settings.event_payload_key``.
        :param retry: Let the SDK retry network errors and 5xx (off when a deliverer retries).
        :param idempotency_key: Sent as ``Idempotency-Key``: a retry under the same key gets the
            first answer replayed, so a duplicate-identifier answer means another request (not
            this one) recorded the identifier
            (https://docs.stripe.com/api/idempotent_requests).
        :raises StripeDuplicateIdentifierError: Stripe already holds an event with this identifier.
        :raises StripeRequestRejectedError: Stripe refused the event.
        :raises StripeTransientError: rate limited or unreachable after the SDK's retries.
        """
        params: dict[str, Any] = {
            "event_name": event.event_name,
            # Stripe's payload values are strings, the value included.
            "payload": {customer_payload_key: event.customer_id, value_payload_key: str(event.value)},
        }
        if event.identifier is not None:
            params["identifier"] = event.identifier
        if event.timestamp is not None:
            params["timestamp"] = event.timestamp
        client = self.client if retry else self.delivery_client
        options = {"idempotency_key": idempotency_key} if idempotency_key else None
        created = self._call(client.v1.billing.meter_events.create, params, options)
        return created.to_dict()

    def cancel_meter_event(self, event_name: str, identifier: str) -> dict[str, Any]:
        """Cancel one event by identifier (Stripe allows it within 24 hours of receipt).

        :raises StripeAdjustmentTooLateError: the event was received more than 24 hours ago.
        """
        try:
            adjustment = self._call(
                self.client.v1.billing.meter_event_adjustments.create,
                {"event_name": event_name, "type": "cancel", "cancel": {"identifier": identifier}},
            )
        except StripeRequestRejectedError as err:
            if "24 hours" in str(err.details.get("message", "")):
                raise StripeAdjustmentTooLateError(
                    f"Cannot cancel meter event {identifier!r}: Stripe cancels events only within 24 hours "
                    "of receiving them. Record a correcting event instead.",
                    err.details,
                ) from err
            raise
        return adjustment.to_dict()

    def meters_by_event_name(self) -> dict[str, list[dict[str, Any]]]:
        """Every meter, grouped by event name; listed once per hook (the meters list has no filter)."""
        if self._meters is None:
            grouped: dict[str, list[dict[str, Any]]] = {}
            for meter in self.iter_meters():
                grouped.setdefault(meter["event_name"], []).append(meter)
            self._meters = grouped
        return self._meters

    def known_meter_id(self, event_name: str) -> str | None:
        """The id of ``event_name``'s active meter if this hook has listed the meters already, else ``None``.

        Never lists them: for links and reports written after the work is done.
        """
        for meter in (self._meters or {}).get(event_name, []):
            if meter.get("status") == "active":
                return meter["id"]
        return None

    def active_meter(self, event_name: str) -> dict[str, Any]:
        """Return the active meter for ``event_name``.

        :raises StripeMeterNotFoundError: none is active; the message lists the meters that exist.
        """
        meters = self.meters_by_event_name()
        for meter in meters.get(event_name, []):
            if meter.get("status") == "active":
                return meter
        active = sorted(
            name for name, group in meters.items() if any(m.get("status") == "active" for m in group)
        )
        inactive = sorted(name for name, group in meters.items() if name not in active)
        reason = (
            f"its meter {meters[event_name][0]['id']} is {meters[event_name][0].get('status')}"
            if event_name in meters
            else "no meter has that event name"
        )
        raise StripeMeterNotFoundError(
            f"No active Stripe meter for event_name {event_name!r} ({reason}); events sent to it would "
            f"never be billed. Active meters: {', '.join(active) or 'none'}"
            + (f"; inactive: {', '.join(inactive)}" if inactive else "")
            + ". Fix the event name, create or reactivate the meter, or set preflight=False.",
            {
                "type": "meter_not_found",
                "event_name": event_name,
                "active_meters": active,
                "inactive_meters": inactive,
            },
        )

    def payload_keys(
        self,
        event_name: str,
        *,
        preflight: bool = True,
        customer_key: str | None = None,
        value_key: str | None = None,
    ) -> tuple[str, str]:
        """The payload keys to send: given ones first, then the meter's (preflight), then Stripe's defaults.

        :raises StripeMeterNotFoundError: with ``preflight``, when no active meter has ``event_name``.
        """
        if preflight:
            meter = self.active_meter(event_name)
            customer_key = customer_key or meter["customer_mapping"]["event_payload_key"]
            value_key = value_key or meter["value_settings"]["event_payload_key"]
        return customer_key or "stripe_customer_id", value_key or "value"

    def iter_meters(self, status: str | None = None) -> Iterator[dict[str, Any]]:
        """Yield every billing meter, following pagination."""
        params: dict[str, Any] = {"limit": 100}
        if status:
            params["status"] = status
        page = self._call(self.client.v1.billing.meters.list, params)
        for meter in self._call(lambda: list(page.auto_paging_iter())):
            yield meter.to_dict()

    def retrieve_meter(self, meter_id: str) -> dict[str, Any]:
        """Read one meter afresh (not the cached list): its status now, for a closing check.

        .. seealso:: https://docs.stripe.com/api/billing/meter/retrieve
        """
        return self._call(self.client.v1.billing.meters.retrieve, meter_id).to_dict()

    def meter_error_reports(self, meter_id: str, since: float, *, samples: int = 10) -> dict[str, Any]:
        """What Stripe's asynchronous validation dropped for a meter since ``since`` (unix seconds).

        Stripe answers 200 to an event for an unknown customer or an inactive meter and drops it
        later; each validation window that dropped something is reported as a
        ``v1.billing.meter.error_report_triggered`` event, listed for 30 days. Returns the
        reports read, the errors per code, and up to ``samples`` sample errors (code, message,
        the event's identifier): a bounded summary at any number of errors.

        .. seealso:: https://docs.stripe.com/api/v2/core/events/list
        .. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api#error-handling
        """
        from airflow_provider_stripe_meter.utils.days import rfc3339

        params: dict[str, Any] = {
            "object_id": meter_id,
            "types": ["v1.billing.meter.error_report_triggered"],
            # Stripe keeps events 30 days; asking for more is refused.
            "created": {"gte": rfc3339(int(max(since, time.time() - 30 * 86400 + 60)))},
        }
        page = self._call(self.client.v2.core.events.list, params)
        codes: dict[str, int] = {}
        found: list[dict[str, Any]] = []
        reports = 0
        for event in self._call(lambda: list(page.auto_paging_iter())):
            reports += 1
            reason = ((event.to_dict().get("data") or {}).get("reason")) or {}
            for kind in reason.get("error_types") or []:
                code = str(kind.get("code"))
                codes[code] = codes.get(code, 0) + int(kind.get("error_count") or 0)
                for sample in kind.get("sample_errors") or []:
                    if len(found) < samples:
                        found.append(
                            {
                                "code": code,
                                "message": self._scrub(str(sample.get("error_message") or "")),
                                "identifier": (sample.get("request") or {}).get("identifier"),
                            }
                        )
        return {"reports": reports, "error_count": sum(codes.values()), "codes": codes, "samples": found}

    def metered_prices(self, meter_ids: set[str] | None) -> list[dict[str, Any]]:
        """The account's recurring prices metered on one of ``meter_ids`` (``None``: on any meter),
        archived ones too.

        An archived price (``active=false``) can no longer be added to a subscription, but keeps
        billing the subscriptions already on it (a grandfathered plan), so it is listed with the
        active ones.

        .. seealso:: https://docs.stripe.com/api/prices/list
        .. seealso:: https://docs.stripe.com/products-prices/manage-prices#archive-price
        """
        listed = self._list_json("/v1/prices", {"type": "recurring", "recurring": {"usage_type": "metered"}})
        return [
            p
            for p in listed
            if (p.get("recurring") or {}).get("usage_type") == "metered"
            and (meter_ids is None or (p.get("recurring") or {}).get("meter") in meter_ids)
        ]

    def subscriptions_of(self, price_ids: Sequence[str], since: int) -> list[dict[str, Any]]:
        """Every subscription on ``price_ids`` (any status) whose current period ends after ``since``,
        items embedded: one request per 100.

        .. seealso:: https://docs.stripe.com/api/subscriptions/list
        """
        found: dict[str, dict[str, Any]] = {}
        for price in price_ids:
            params = {"price": price, "status": "all", "current_period_end": {"gte": since}}
            for subscription in self._list_json("/v1/subscriptions", params):
                found[str(subscription["id"])] = subscription
        return list(found.values())

    def subscription_changes(
        self, since: int, *, cuts: Sequence[int] = (), parallel: int = 4
    ) -> list[dict[str, Any]]:
        """The subscriptions created, updated (a renewal too) or deleted after ``since``, each as
        its newest event shows it: about one request per 100 events (Stripe keeps 30 days).

        Pages of one listing follow one another, so a night's thousands of renewals are listed
        in time ranges, up to ``parallel`` at once, split at ``cuts`` (instants after
        ``since``): where the renewals expected are evenly shared, as they cluster where the
        anchors do. A range that turns out to hold many more pages than the others (a burst of
        changes nobody expected) is halved, once at least eight pages remain in it and a
        worker is spare.

        .. seealso:: https://docs.stripe.com/api/events/list
        .. seealso:: https://docs.stripe.com/api/pagination
        """
        from concurrent.futures import Future, ThreadPoolExecutor

        types = [
            "customer.subscription.created",
            "customer.subscription.updated",
            "customer.subscription.deleted",
        ]
        found: dict[str, dict[str, Any]] = {}
        lock = threading.Lock()
        busy = [0]
        futures: list[Future[None]] = []

        def walk(lo: int, hi: int | None) -> None:
            """Every event created in ``(lo, hi]`` (``hi`` ``None``: up to now and later)."""
            after: str | None = None
            try:
                while True:
                    params: dict[str, Any] = {
                        "types": types,
                        "created": {"gt": lo, **({"lte": hi} if hi is not None else {})},
                        "limit": 100,
                        **({"starting_after": after} if after else {}),
                    }
                    page = self._call(self.client.raw_request, "get", "/v1/events", **params).data
                    data = page.get("data") or []
                    with lock:
                        for event in data:
                            found[str(event["id"])] = event
                    if not page.get("has_more") or not data:
                        return
                    # Newest first: what is left of the range is (lo, oldest], the events of the
                    # second ``oldest`` partly seen already (they are kept once, by id).
                    newest, oldest = int(data[0]["created"]), int(data[-1]["created"])
                    left = (oldest - lo) * len(data) / max(1, newest - oldest) / 100
                    with lock:
                        spare = busy[0] < parallel
                    if spare and newest > oldest and left >= 8:
                        mid = lo + (oldest - lo) // 2
                        start(lo, mid)
                        lo, hi, after = mid, oldest, None
                    else:
                        after = str(data[-1]["id"])
            finally:
                with lock:
                    busy[0] -= 1

        with ThreadPoolExecutor(max_workers=parallel) as pool:

            def start(lo: int, hi: int | None) -> None:
                with lock:
                    busy[0] += 1
                    futures.append(pool.submit(walk, lo, hi))

            bounds = [since, *sorted({c for c in cuts if c > since})]
            for lo, hi in zip(bounds, [*bounds[1:], None], strict=True):
                start(lo, hi)
            done = 0
            while done < len(futures):  # a walker adds its split before it ends
                futures[done].result()
                done += 1
        events = sorted(found.values(), key=lambda e: (int(e["created"]), str(e["id"])), reverse=True)
        newest_of: dict[str, dict[str, Any]] = {}
        for event in events:  # newest first
            subscription = (event.get("data") or {}).get("object") or {}
            if subscription.get("id") and subscription["id"] not in newest_of:
                newest_of[subscription["id"]] = _items_with_periods(subscription)
        # An event rendered at a version that has the periods on neither the subscription nor its
        # items: the subscription is read as the pinned version shows it (one request each).
        for sub_id, subscription in newest_of.items():
            if not _has_item_periods(subscription):
                newest_of[sub_id] = self._call(
                    self.client.raw_request, "get", f"/v1/subscriptions/{sub_id}"
                ).data
        return list(newest_of.values())

    def check_invoices_readable(self) -> None:
        """One draft invoice listed (or none): raises when the key may not read invoices, so a run
        that will need its drafts fails before it sends anything.

        .. seealso:: https://docs.stripe.com/keys#limit-access
        """
        self._call(self.client.raw_request, "get", "/v1/invoices", status="draft", limit=1)

    def check_events_readable(self) -> None:
        """One event listed (or none): raises when the key may not read events, which every run
        after a meter's first needs (its subscriptions are brought up to date from them).

        .. seealso:: https://docs.stripe.com/api/events/list
        """
        self._call(self.client.raw_request, "get", "/v1/events", limit=1)

    def draft_invoices(
        self, created_from: int | None = None, created_to: int | None = None
    ) -> list[dict[str, Any]]:
        """Every draft invoice of the account created in ``[created_from, created_to)`` (either
        open-ended), newest first, each with every line (:meth:`invoices_created`).

        .. seealso:: https://docs.stripe.com/api/invoices/list
        """
        return list(self.invoices_created(created_from, created_to, "draft"))

    def invoices_created(
        self, created_from: int | None, created_to: int | None, status: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """The invoices created in ``[created_from, created_to)`` (either open-ended) of
        ``status`` (``None``: any), newest first, a page at a time, as plain JSON with **every**
        line: an invoice embeds only its first lines (``lines.has_more``); the rest are read from
        ``GET /v1/invoices/{id}/lines``.

        .. seealso:: https://docs.stripe.com/api/invoices/list
        .. seealso:: https://docs.stripe.com/api/invoices/invoice_lines
        """
        created: dict[str, int] = {}
        if created_from is not None:
            created["gte"] = int(created_from)
        if created_to is not None:
            created["lt"] = int(created_to)
        params: dict[str, Any] = {
            **({"status": status} if status else {}),
            **({"created": created} if created else {}),
        }
        for invoice in self._pages("/v1/invoices", params):
            lines = invoice.get("lines") or {}
            if lines.get("has_more") and invoice.get("id"):
                data = list(lines.get("data") or [])
                after = str(data[-1]["id"]) if data else None
                rest = self._list_json(f"/v1/invoices/{invoice['id']}/lines", {}, after=after)
                invoice["lines"] = {**lines, "data": data + rest, "has_more": False}
            yield invoice

    def _list_json(
        self, path: str, params: dict[str, Any], *, after: str | None = None
    ) -> list[dict[str, Any]]:
        """Every object of a v1 list endpoint, 100 a page, as plain JSON.

        Plain JSON, not the SDK's objects: building ``StripeObject`` trees costs about 0.6 ms an
        object, a minute for the subscriptions of 100,000 customers.

        .. seealso:: https://docs.stripe.com/api/pagination
        """
        return list(self._pages(path, params, after=after))

    def _pages(
        self, path: str, params: dict[str, Any], *, after: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """The objects of a v1 list endpoint, 100 a page, yielded as each page arrives."""
        while True:
            page_params = {**params, "limit": 100, **({"starting_after": after} if after else {})}
            page = self._call(self.client.raw_request, "get", path, **page_params).data
            data = page.get("data") or []
            yield from data
            if not page.get("has_more") or not data:
                return
            after = data[-1]["id"]

    def invoice_preview(self, subscription: str) -> dict[str, Any] | None:
        """The subscription's upcoming invoice as it stands (``None``: it has none, having ended).

        Lines past the first ones the preview embeds are read from its ``lines.url`` (a preview's
        id starts with ``upcoming_in``); where Stripe does not serve them, the preview keeps the
        lines it embeds and says so (``lines.has_more`` stays true).

        .. seealso:: https://docs.stripe.com/api/invoices/create_preview
        """
        try:
            preview: dict[str, Any] = self._call(
                self.client.v1.invoices.create_preview, {"subscription": subscription}
            ).to_dict()
        except StripeRequestRejectedError as err:
            if (err.details or {}).get("code") == "invoice_upcoming_none":
                return None
            raise
        lines = preview.get("lines") or {}
        data = list(lines.get("data") or [])
        if lines.get("has_more") and lines.get("url") and data:
            try:
                rest = self._list_json(str(lines["url"]), {}, after=str(data[-1]["id"]))
            except StripeRequestRejectedError:
                return preview
            preview["lines"] = {**lines, "data": data + rest, "has_more": False}
        return preview

    def customer_exists(self, customer_id: str, *, retry: bool = True) -> bool:
        """Whether Stripe knows ``customer_id``: ``False`` for a missing customer (404
        ``resource_missing``) and for a deleted one (``deleted: true``), whose meter events
        Stripe would take and drop.

        .. seealso:: https://docs.stripe.com/api/customers/retrieve
        """
        from urllib.parse import quote

        client = self.client if retry else self.delivery_client
        path = f"/v1/customers/{quote(customer_id, safe='')}"
        try:
            # Plain JSON: a deleted customer comes back as {"id", "object", "deleted": true}.
            found = self._call(client.raw_request, "get", path).data
        except StripeRequestRejectedError as err:
            if err.details.get("http_status") == 404 and err.details.get("code") == "resource_missing":
                return False
            raise
        return not found.get("deleted")

    def customers_known(self, customers: Sequence[str], *, max_rps: float | None = 20.0) -> set[str]:
        """Which of ``customers`` Stripe knows, one ``GET /v1/customers/{id}`` each, paced at
        ``max_rps`` and backed off on 429 like every read.

        .. seealso:: https://docs.stripe.com/api/customers/retrieve
        """
        known: set[str] = set()

        def read(customer: str) -> None:
            if self.customer_exists(customer, retry=False):
                known.add(customer)

        self._read_each(customers, read, "ask Stripe about", "customers_unavailable", max_rps=max_rps)
        return known

    def customer_ids(self) -> set[str]:
        """The id of every customer of the account (``GET /v1/customers``, 100 a page; deleted
        customers are not listed).

        .. seealso:: https://docs.stripe.com/api/customers/list
        """
        return {str(c["id"]) for c in self._list_json("/v1/customers", {}) if not c.get("deleted")}

    def usage_between(self, meter_id: str, customer_id: str, start_time: int, end_time: int) -> int | None:
        """The meter's figure for one customer over ``[start_time, end_time)`` (minute-aligned).

        ``None`` when Stripe does not know the customer (404 with ``param=customer``).
        """
        summaries = self._summaries_or_unknown(meter_id, customer_id, start_time, end_time, None)
        return (
            None
            if summaries is None
            else sum(round(float(x.get("aggregated_value") or 0)) for x in summaries)
        )

    def _summaries_or_unknown(
        self,
        meter_id: str,
        customer_id: str,
        start_time: int,
        end_time: int,
        window: str | None,
        retry: bool = True,
    ) -> list[dict[str, Any]] | None:
        """:meth:`list_event_summaries`, or ``None`` when Stripe does not know the customer (404)."""
        try:
            return self.list_event_summaries(meter_id, customer_id, start_time, end_time, window, retry=retry)
        except StripeRequestRejectedError as err:
            if err.details.get("http_status") == 404 and err.details.get("param") == "customer":
                return None
            raise

    def list_event_summaries(
        self,
        meter_id: str,
        customer_id: str,
        start_time: int,
        end_time: int,
        value_grouping_window: str | None = "day",
        *,
        retry: bool = True,
    ) -> list[dict[str, Any]]:
        """Return a meter's aggregated usage for one customer, window by window (``retry``: SDK retries)."""
        params: dict[str, Any] = {
            "customer": customer_id,
            "start_time": start_time,
            "end_time": end_time,
            "limit": 100,
        }
        if value_grouping_window:
            params["value_grouping_window"] = value_grouping_window
        client = self.client if retry else self.delivery_client
        page = self._call(client.v1.billing.meters.event_summaries.list, meter_id, params)
        return [summary.to_dict() for summary in self._call(lambda: list(page.auto_paging_iter()))]

    def recorded_per_day(
        self,
        meter_id: str,
        customers: Sequence[str],
        first: date,
        last: date,
        *,
        max_rps: float | None = 20.0,
        concurrency: int | None = None,
    ) -> tuple[dict[tuple[str, date], int], set[str]]:
        """What Stripe recorded per (customer, UTC day) from ``first`` to ``last``, one request a customer.

        Reads ``event_summaries`` with ``value_grouping_window=day`` (the meter's own formula
        applied per day), paced at ``max_rps``. Days with nothing recorded are absent. Returns
        the figures and the customers Stripe does not know (404 with ``param=customer``).

        .. seealso:: https://docs.stripe.com/api/billing/meter-event-summary/list
        """
        start, end = _day_span(first, last)
        found: dict[str, list[dict[str, Any]] | None] = {}

        def read(customer: str) -> None:
            found[customer] = self._summaries_or_unknown(meter_id, customer, start, end, "day", retry=False)

        self._read_each(
            customers,
            read,
            "read Stripe's meter summaries for",
            "summaries_unavailable",
            max_rps=max_rps,
            concurrency=concurrency,
        )
        return _per_day(found)

    def _read_each(
        self,
        customers: Sequence[str],
        read: Callable[[str], None],
        what: str,
        kind_of_failure: str,
        *,
        max_rps: float | None,
        concurrency: int | None = None,
    ) -> None:
        """``read`` each customer (one request each, without the SDK's retries): paced at
        ``max_rps``, backed off on 429 and ridden through outages exactly like sends; raises
        when some could not be read."""
        from airflow_provider_stripe_meter.utils.delivery import Deliverer

        def one(batch: list[str]) -> None:
            [customer] = batch
            read(customer)  # the deliverer around this retries and backs off: one retry layer

        report = Deliverer(
            one,
            key=lambda customer: customer,
            describe=lambda customer: {"customer_id": customer},
            max_rps=max_rps,
            concurrency=concurrency,
        ).run(list(customers))
        if report.rejected or report.failed:
            kind = "rejected" if report.rejected else "failed"
            example = report.samples.get(kind, [{}])[0]
            error = StripeRequestRejectedError if report.rejected else StripeTransientError
            raise error(
                f"Could not {what} {report.rejected + report.failed} of {len(customers)} customers "
                f"(e.g. {example})",
                example.get("error") or {"type": kind_of_failure},
            )

    async def arecorded_per_day(
        self,
        meter_id: str,
        customers: Sequence[str],
        first: date,
        last: date,
        *,
        max_rps: float | None = 20.0,
        concurrency: int = 8,
    ) -> tuple[dict[tuple[str, date], int], set[str]]:
        """:meth:`recorded_per_day` on an event loop (a trigger's): same requests, same answer.

        Requests start at most ``max_rps`` a second, ``concurrency`` at a time, through the
        SDK's asynchronous client (``httpx``). A 429, 5xx or network failure that outlasts the
        SDK's own retries raises :class:`StripeTransientError`; the caller polls again later.
        """
        import asyncio

        start, end = _day_span(first, last)
        found: dict[str, list[dict[str, Any]] | None] = {}
        slots = asyncio.Semaphore(max(1, concurrency))
        spacing = 1.0 / max_rps if max_rps else 0.0
        loop = asyncio.get_running_loop()
        next_start = loop.time()

        async def read(customer: str) -> None:
            nonlocal next_start
            async with slots:
                # Space request starts evenly: the same pacing the threaded reads keep.
                now = loop.time()
                turn = max(next_start, now)
                next_start = turn + spacing
                await asyncio.sleep(turn - now)
                try:
                    found[customer] = await self._alist_event_summaries(meter_id, customer, start, end)
                except StripeRequestRejectedError as err:
                    if err.details.get("http_status") == 404 and err.details.get("param") == "customer":
                        found[customer] = None
                        return
                    raise

        await asyncio.gather(*(read(customer) for customer in customers))
        return _per_day(found)

    async def _alist_event_summaries(
        self, meter_id: str, customer_id: str, start_time: int, end_time: int
    ) -> list[dict[str, Any]]:
        import stripe

        params: Any = {
            "customer": customer_id,
            "start_time": start_time,
            "end_time": end_time,
            "limit": 100,
            "value_grouping_window": "day",
        }
        try:
            page = await self.async_client.v1.billing.meters.event_summaries.list_async(meter_id, params)
            return [summary.to_dict() async for summary in page.auto_paging_iter()]
        except stripe.StripeError as err:
            raise self.translate_error(err) from err

    def create_meter_event_session(self) -> dict[str, Any]:
        """Open a v2 meter event session: a token for the high-throughput stream (15 minutes)."""
        session = self._call(self.client.v2.billing.meter_event_session.create)
        return {"authentication_token": session.authentication_token, "expires_at": session.expires_at}

    def send_meter_event_stream(
        self, session_client: stripe.StripeClient, events: Sequence[dict[str, Any]]
    ) -> None:
        """Send up to 100 events through ``POST /v2/billing/meter_event_stream`` with a session client."""
        self._call(session_client.v2.billing.meter_event_stream.create, {"events": list(events)})

    def meter_event_stream(self, renew_before: float = 60.0) -> MeterEventStream:
        """Return a sender for the v2 high-throughput stream that manages its session tokens."""
        return MeterEventStream(self, renew_before=renew_before)

    def test_connection(self) -> tuple[bool, str]:
        """Make one cheap authenticated call (list one meter) and report the outcome."""
        try:
            self._call(self.client.v1.billing.meters.list, {"limit": 1})
        except Exception as err:
            return False, self._scrub(str(err))
        return True, "Connection to Stripe works: the API key may list billing meters."


def _day_span(first: date, last: date) -> tuple[int, int]:
    """Unix seconds from the start of UTC day ``first`` to the end of UTC day ``last``."""
    from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY

    start = int(datetime(first.year, first.month, first.day, tzinfo=timezone.utc).timestamp())
    return start, start + ((last - first).days + 1) * SECONDS_PER_DAY


def _per_day(
    found: dict[str, list[dict[str, Any]] | None],
) -> tuple[dict[tuple[str, date], int], set[str]]:
    """Daily summaries per customer (``None``: unknown customer) as figures per (customer, day)."""
    recorded: dict[tuple[str, date], int] = {}
    unknown: set[str] = set()
    for customer, summaries in found.items():
        if summaries is None:
            unknown.add(customer)
            continue
        for summary in summaries:
            value = summary["aggregated_value"]
            if value:
                day = datetime.fromtimestamp(summary["start_time"], timezone.utc).date()
                # Summaries are numbers (floats in JSON); meter values are whole numbers.
                recorded[(customer, day)] = recorded.get((customer, day), 0) + round(value)
    return recorded, unknown


def _has_item_periods(subscription: dict[str, Any]) -> bool:
    items = (subscription.get("items") or {}).get("data") or []
    return all(
        i.get("current_period_start") is not None and i.get("current_period_end") is not None for i in items
    )


def _items_with_periods(subscription: dict[str, Any]) -> dict[str, Any]:
    """A subscription from an event, its billing period on each item, as the pinned version has it.

    An event renders its object at the event's own ``api_version`` (the account's default when it
    happened), not at the version a request pins. Before 2025-03-31.basil the period lived on the
    subscription (``current_period_start``/``_end``) and no item carried one; since then it lives on
    each item and the subscription has none. An older rendering is moved to the items (every item
    of a subscription shared its period then).

    .. seealso:: https://docs.stripe.com/api/events/object#event_object-api_version
    .. seealso:: https://docs.stripe.com/changelog/basil/2025-03-31/deprecate-subscription-current-period-start-and-end
    """
    if _has_item_periods(subscription):
        return subscription
    start, end = subscription.get("current_period_start"), subscription.get("current_period_end")
    if start is None or end is None:
        return subscription  # neither shape: read again at the pinned version
    items = (subscription.get("items") or {}).get("data") or []
    moved = [
        {
            **i,
            "current_period_start": i.get("current_period_start") or start,
            "current_period_end": i.get("current_period_end") or end,
        }
        for i in items
    ]
    return {**subscription, "items": {**(subscription.get("items") or {}), "data": moved}}


def _is_duplicate_identifier(details: dict[str, Any]) -> bool:
    """Whether a 400 says "an event with this identifier exists" (already recorded).

    Stripe's v1 answer carries ``param=identifier`` and ``Stripe-Should-Retry: false``; v2 carries
    the code ``duplicate_meter_event``. The English message is the last resort, for answers
    that lack both. Another identifier problem (too long, empty) has ``param=identifier`` too,
    but is retryable-neutral and never says the event exists.
    """
    if details.get("code") in DUPLICATE_IDENTIFIER_CODES:
        return True
    message = str(details.get("message") or "")
    if details.get("param") == "identifier" and (
        details.get("should_retry") is False or "already exists" in message
    ):
        return True
    return DUPLICATE_IDENTIFIER_MESSAGE in message


def _quiet_sdk_logger() -> None:
    # stripe-python logs two INFO lines per request; a batch of thousands would drown the task
    # log, which reports progress itself. A level set explicitly by the user is left alone.
    sdk_logger = logging.getLogger("stripe")
    if sdk_logger.level == logging.NOTSET:
        sdk_logger.setLevel(logging.WARNING)


class MeterEventStream:
    """Send batches through ``/v2/billing/meter_event_stream``, renewing the session as needed.

    Sessions last 15 minutes. One is shared by every thread; it is renewed ``renew_before``
    seconds before it expires, and at once when Stripe answers that it has expired.

    .. seealso:: https://docs.stripe.com/api/v2/billing-meter-stream
    """

    def __init__(self, hook: StripeHook, *, renew_before: float = 60.0) -> None:
        self.hook = hook
        self.renew_before = renew_before
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self._client: stripe.StripeClient | None = None

    def _current(self) -> tuple[str, stripe.StripeClient]:
        with self._lock:
            if (
                self._client is None
                or self._token is None
                or time.time() >= self._expires_at - self.renew_before
            ):
                session = self.hook.create_meter_event_session()
                self._token = session["authentication_token"]
                self._expires_at = _to_epoch(session["expires_at"])
                self._client = self.hook.session_client(self._token)
            return self._token, self._client

    def _expire(self, token: str) -> None:
        with self._lock:
            if self._token == token:
                self._client = None

    def send(self, events: Sequence[dict[str, Any]]) -> None:
        """Send up to 100 events; validation happens later on Stripe's side (duplicates dropped)."""
        token, client = self._current()
        try:
            self.hook.send_meter_event_stream(client, events)
        except StripeSessionExpiredError:
            self._expire(token)
            _, client = self._current()
            self.hook.send_meter_event_stream(client, events)


def _to_epoch(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
