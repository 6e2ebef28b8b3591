"""Stripe hook: owns the ``stripe`` connection, the ``StripeClient`` and every Stripe call.

One Stripe call per method (a list method follows its pages), its errors translated in one
place (:meth:`StripeHook.translate_error`). What is asked of many customers at once is paced in
:mod:`~airflow_provider_stripe_meter.utils.paced_reads`, the subscription events are walked in
:mod:`~airflow_provider_stripe_meter.billing.subscription_events`, and the v2 stream's session
is kept in :mod:`~airflow_provider_stripe_meter.utils.stream_session`, all through these calls.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
        from airflow_provider_stripe_meter.utils.clock import SYSTEM
        from airflow_provider_stripe_meter.utils.days import SECONDS_PER_DAY, rfc3339

        params: dict[str, Any] = {
            "object_id": meter_id,
            "types": ["v1.billing.meter.error_report_triggered"],
            # Stripe keeps events 30 days; asking for more is refused.
            "created": {"gte": rfc3339(int(max(since, SYSTEM.now() - 30 * SECONDS_PER_DAY + 60)))},
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

    def events_page(
        self, types: Sequence[str], after: int, until: int | None, starting_after: str | None = None
    ) -> dict[str, Any]:
        """One page (100, newest first) of the events of ``types`` created in ``(after, until]``
        (``until`` ``None``: up to now), from ``starting_after`` on, as plain JSON.

        .. seealso:: https://docs.stripe.com/api/events/list
        """
        params: dict[str, Any] = {
            "types": list(types),
            "created": {"gt": after, **({"lte": until} if until is not None else {})},
            "limit": 100,
            **({"starting_after": starting_after} if starting_after else {}),
        }
        return self._call(self.client.raw_request, "get", "/v1/events", **params).data

    def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]:
        """One subscription as the pinned API version shows it, as plain JSON.

        .. seealso:: https://docs.stripe.com/api/subscriptions/retrieve
        """
        return self._call(self.client.raw_request, "get", f"/v1/subscriptions/{subscription_id}").data

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
        summaries = self.summaries_or_unknown(meter_id, customer_id, start_time, end_time, None)
        return (
            None
            if summaries is None
            else sum(round(float(x.get("aggregated_value") or 0)) for x in summaries)
        )

    def summaries_or_unknown(
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
            if _unknown_customer(err):
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

    async def asummaries_or_unknown(
        self, meter_id: str, customer_id: str, start_time: int, end_time: int
    ) -> list[dict[str, Any]] | None:
        """A meter's daily summaries for one customer through the SDK's asynchronous client (a
        trigger's event loop), or ``None`` when Stripe does not know the customer (404)."""
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
            translated = self.translate_error(err)
            if _unknown_customer(translated):
                return None
            raise translated from err

    def create_meter_event_session(self) -> dict[str, Any]:
        """Open a v2 meter event session: a token for the high-throughput stream (15 minutes)."""
        session = self._call(self.client.v2.billing.meter_event_session.create)
        return {"authentication_token": session.authentication_token, "expires_at": session.expires_at}

    def send_meter_event_stream(
        self, session_client: stripe.StripeClient, events: Sequence[dict[str, Any]]
    ) -> None:
        """Send up to 100 events through ``POST /v2/billing/meter_event_stream`` with a session client."""
        self._call(session_client.v2.billing.meter_event_stream.create, {"events": list(events)})

    def test_connection(self) -> tuple[bool, str]:
        """Make one cheap authenticated call (list one meter) and report the outcome."""
        try:
            self._call(self.client.v1.billing.meters.list, {"limit": 1})
        except Exception as err:
            return False, self._scrub(str(err))
        return True, "Connection to Stripe works: the API key may list billing meters."


def _unknown_customer(err: StripeMeterError) -> bool:
    """Whether Stripe refused a read because it does not know the customer (404, ``param=customer``)."""
    return (
        isinstance(err, StripeRequestRejectedError)
        and err.details.get("http_status") == 404
        and err.details.get("param") == "customer"
    )


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
