"""A local Stripe billing-meter server on 127.0.0.1, for tests, demos and benchmarks.

The real ``stripe`` SDK talks to it over HTTP (point ``base_addresses`` / the connection's
``api_base`` and ``meter_events_api_base`` at :attr:`LocalStripeServer.url`). It implements the
meter endpoints of Stripe's OpenAPI spec (v1 events, meters, summaries, adjustments; v2 session,
stream, events, adjustments) with Stripe's rules, plus knobs Stripe does not offer: latency, a
rate limit answered with 429, and injected 5xx failures, some after the write has landed.

Use it as a context manager::

    with LocalStripeServer(meters=["ai_tokens_used"]) as server:
        os.environ["AIRFLOW_CONN_STRIPE_DEFAULT"] = server.connection_json()
        ...
        assert server.ledger.totals("ai_tokens_used") == {"cus_123": 42}

or from the command line: ``python -m airflow_provider_stripe_meter.testing --meter ai_tokens_used``.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from operator import attrgetter
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

from airflow_provider_stripe_meter.testing.billing import EVENT_RETENTION, EVENT_TYPES, MAX_EVENT_TYPES
from airflow_provider_stripe_meter.testing.forms import decode_form
from airflow_provider_stripe_meter.testing.ledger import (
    MeterLedger,
    StripeApiError,
    parse_rfc3339,
)
from airflow_provider_stripe_meter.utils.days import rfc3339

DEFAULT_API_KEY = "sk_test_local_meter_server"
#: The account a key belongs to, as a permission error names it (connected accounts have their own).
PLATFORM_ACCOUNT = "acct_1LocalPlatform"
_DAY = 86400


@dataclass
class _Fault:
    remaining: int
    status: int
    after_write: bool
    path_prefix: str


class _TokenBucket:
    """Allows ``rate`` requests a second with a burst of ``burst``; thread-safe."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False


class LocalStripeServer:
    """Serve Stripe's meter endpoints on 127.0.0.1 from a :class:`MeterLedger`.

    :param meters: Event names to create active ``sum`` meters for.
    :param customers: Customers Stripe knows (``None``: every ``cus_...``).
    :param api_keys: Secret keys accepted (Bearer or Basic auth).
    :param latency: Seconds each request takes before it is answered.
    :param rate_limit: Requests per second on the API host before 429 (``None``: unlimited).
    :param stream_rate_limit: Requests per second on the v2 stream before 429.
    :param one_request_per_customer_meter: Answer 429 when a second request for the same
        customer and meter arrives while one is in flight, as live mode does.
    :param validate_spec: Check every request and response body against the OpenAPI spec and
        list mismatches in :attr:`spec_violations` and :attr:`request_violations` (slower; tests).
    :param session_ttl: Lifetime of v2 meter event sessions, seconds.
    :param identifier_window: Seconds a used identifier is refused (``None``: forever).
    :param summary_lag: Seconds before an accepted event shows in event summaries.
    :param clock: "Now" for Stripe's time rules (tests move it).
    :param accounts: Connected accounts (``acct_...``) the key may act for, as Connect platforms
        do with the ``Stripe-Account`` header. Each has meters, customers, events, sessions and
        idempotency keys of its own (:meth:`account` gives its ledger; :meth:`add_account` adds
        one); an account not listed is answered 403 ``account_invalid``, as Stripe does.
    :param restricted_keys: Restricted keys accepted (``rk_...``), each with the permissions it
        was granted, named as Stripe's errors name them (``rak_invoice_read``,
        ``rak_billing_meter_event_write``: :data:`ROUTE_PERMISSIONS`). A write permission
        includes the read one, as on the Dashboard. A request that needs another permission is
        answered 403 naming it, as Stripe does (https://docs.stripe.com/keys/restricted-api-keys).
    """

    def __init__(
        self,
        *,
        meters: Iterable[str] = (),
        customers: Iterable[str] | None = None,
        api_keys: Iterable[str] = (DEFAULT_API_KEY,),
        latency: float = 0.0,
        rate_limit: float | None = None,
        stream_rate_limit: float | None = None,
        one_request_per_customer_meter: bool = True,
        validate_spec: bool = False,
        session_ttl: float = 900.0,
        identifier_window: float | None = None,
        summary_lag: float = 0.0,
        clock: Callable[[], float] | None = None,
        accounts: Iterable[str] = (),
        restricted_keys: Mapping[str, Iterable[str]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        #: Seconds added to the wall clock when no ``clock`` is given (``POST /_local/clock``).
        self.clock_offset = 0.0
        if clock is None:
            clock = lambda: time.time() + self.clock_offset  # noqa: E731
        #: What Stripe holds for the key's own (platform) account.
        self.ledger = MeterLedger(
            customers=customers, identifier_window=identifier_window, summary_lag=summary_lag, clock=clock
        )
        meters = tuple(meters)
        for name in meters:
            self.ledger.add_meter(name)
        self.api_keys = set(api_keys)
        self.latency = latency
        self.rate_limit = rate_limit
        self.stream_rate_limit = stream_rate_limit
        self.one_request_per_customer_meter = one_request_per_customer_meter
        self.validate_spec = validate_spec
        self.session_ttl = session_ttl
        self.stats: Counter[str] = Counter()
        #: Responses of this server that broke the spec (a bug here).
        self.spec_violations: list[str] = []
        #: Requests that broke the spec (a bug in the client, or a test sending bad input on purpose).
        self.request_violations: list[str] = []
        #: Recent requests as (method, path, headers without Authorization), for assertions.
        self.request_log: deque[tuple[str, str, dict[str, str]]] = deque(maxlen=1000)
        self._host, self._port = host, port
        self._faults: list[_Fault] = []
        #: (fraction, path prefix, random source) of answers lost after the write (:meth:`lose_answers`).
        self._lossy: tuple[float, str, Any] | None = None
        self._outage: tuple[float, int, str] | None = None
        self._outage_plan: tuple[int, float, int, str] | None = None
        #: Outages that began (knob: :meth:`outage`).
        self.outages_started = 0
        self._lock = threading.Lock()
        #: Restricted keys and the permissions each was granted (a key may be added while running).
        self.restricted_keys: dict[str, frozenset[str]] = {}
        for key, granted in (restricted_keys or {}).items():
            self.restrict(key, granted)
        self._in_flight: set[tuple[str, str]] = set()
        self._idempotency: dict[str, tuple[str, int, dict[str, Any]]] = {}
        self._buckets: dict[str, _TokenBucket] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        #: What Stripe holds for each connected account, by ``acct_...`` id.
        self.accounts: dict[str, MeterLedger] = {}
        for account in accounts:
            self.add_account(account, meters=meters, customers=customers)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> LocalStripeServer:
        """Start serving in a background thread."""
        handler = type("_BoundHandler", (_Handler,), {"server_state": self})
        httpd = ThreadingHTTPServer((self._host, self._port), handler)
        httpd.daemon_threads = True
        httpd.request_queue_size = 256
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="local-stripe", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> LocalStripeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL for both the API and the meter-events hosts."""
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def connection_json(self, api_key: str = DEFAULT_API_KEY, **extra: Any) -> str:
        """An ``AIRFLOW_CONN_<ID>`` value for a ``stripe`` connection pointing here."""
        return json.dumps(
            {
                "conn_type": "stripe",
                "password": api_key,
                "extra": {
                    "api_base": self.url,
                    "meter_events_api_base": self.url,
                    # This server's summaries trail its events by exactly this; a little more
                    # covers the time between an answer and the journal's note of it.
                    "summary_lag": self.ledger.summary_lag + 0.5 if self.ledger.summary_lag else 0,
                    **extra,
                },
            }
        )

    def add_account(
        self, account: str, *, meters: Iterable[str] = (), customers: Iterable[str] | None = None
    ) -> MeterLedger:
        """Add a connected account the key can act for, with ``sum`` meters of its own; its ledger.

        Its meters get ids of their own (the same event name is a different meter on each
        account), and it shares the platform's clock, identifier window and summary lag.
        """
        if not account.startswith("acct_"):
            raise ValueError(f"a connected account id starts with acct_, got {account!r}")
        platform = self.ledger
        ledger = MeterLedger(
            customers=customers,
            identifier_window=platform.identifier_window,
            summary_lag=platform.summary_lag,
            # Read through the platform's ledger, so a test that moves its clock moves every account's.
            clock=lambda: platform.clock(),
        )
        for name in meters:
            ledger.add_meter(name)
        with self._lock:
            self.accounts[account] = ledger
        return ledger

    def restrict(self, api_key: str, permissions: Iterable[str]) -> None:
        """Accept ``api_key`` as a restricted key granted ``permissions`` (``rak_..._read|write``)."""
        granted = frozenset(permissions)
        unknown = sorted(granted - _KNOWN_PERMISSIONS)
        if unknown:
            raise ValueError(
                f"restricted key permissions must be among {sorted(_KNOWN_PERMISSIONS)}, got {unknown}"
            )
        with self._lock:
            self.restricted_keys[api_key] = granted

    def account(self, account: str | None) -> MeterLedger:
        """The ledger of ``account`` (``None``: the platform's own)."""
        return self.ledger if account is None else self.accounts[account]

    def _session_ledger(self, token: str) -> MeterLedger:
        """The ledger a v2 stream session token belongs to (sessions are opened per account)."""
        for ledger in (self.ledger, *self.accounts.values()):
            if token in ledger.sessions:
                return ledger
        return self.ledger

    def count(self, name: str) -> None:
        """Add one to a counter in :attr:`stats` (thread-safe)."""
        with self._lock:
            self.stats[name] += 1

    # -- knobs -----------------------------------------------------------------------------

    def inject_failures(
        self, count: int, *, status: int = 500, after_write: bool = False, path_prefix: str = "/"
    ) -> None:
        """Answer the next ``count`` matching requests with ``status``.

        With ``after_write`` the request is carried out first and its answer lost, as when a
        connection drops after Stripe committed the write.
        """
        with self._lock:
            self._faults.append(_Fault(count, status, after_write, path_prefix))

    def lose_answers(self, fraction: float, *, path_prefix: str = "/", seed: int = 0) -> None:
        """From now on, carry out each matching request and lose its answer with probability ``fraction``.

        As on a flaky network: the write lands, the client sees a 500 and retries; a retry under
        the same ``Idempotency-Key`` gets the saved answer replayed, as on Stripe. ``0`` stops it.
        """
        import random

        with self._lock:
            self._lossy = (fraction, path_prefix, random.Random(seed)) if fraction else None

    def outage(
        self, seconds: float, *, status: int = 503, path_prefix: str = "/", after_requests: int = 0
    ) -> None:
        """Answer every matching request with ``status`` for ``seconds``, writing nothing.

        Stands for Stripe (or the network to it) being down: unlike :meth:`inject_failures`, it
        lasts a time, not a number of requests, whatever the client does meanwhile. With
        ``after_requests`` it starts once that many more matching requests have been served, so
        a test can cut Stripe off in the middle of a run.
        """
        with self._lock:
            self._outage = None
            self._outage_plan = (after_requests, seconds, status, path_prefix)
            self.outages_started = 0

    def _in_outage(self, path: str) -> int | None:
        with self._lock:
            plan = self._outage_plan
            if plan is not None and path.startswith(plan[3]):
                after, seconds, status, prefix = plan
                if after > 0:
                    self._outage_plan = (after - 1, seconds, status, prefix)
                    return None
                self._outage_plan = None
                self._outage = (time.monotonic() + seconds, status, prefix)
                self.outages_started += 1
            if self._outage is None:
                return None
            until, status, prefix = self._outage
            if time.monotonic() >= until:
                self._outage = None
                return None
        return status if path.startswith(prefix) else None

    def set_rate_limit(self, rate: float | None, *, stream: bool = False, burst: float | None = None) -> None:
        """Change the API (or stream) rate limit while running."""
        with self._lock:
            if stream:
                self.stream_rate_limit = rate
            else:
                self.rate_limit = rate
            self._buckets.pop("stream" if stream else "api", None)
            if rate is not None and burst is not None:
                self._buckets["stream" if stream else "api"] = _TokenBucket(rate, burst)

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            lossy = self._lossy
            if lossy and path.startswith(lossy[1]) and lossy[2].random() < lossy[0]:
                return _Fault(1, 500, True, lossy[1])
            for fault in self._faults:
                if fault.remaining > 0 and path.startswith(fault.path_prefix):
                    fault.remaining -= 1
                    return _Fault(1, fault.status, fault.after_write, fault.path_prefix)
            return None

    def _allow(self, host_kind: str) -> bool:
        rate = self.stream_rate_limit if host_kind == "stream" else self.rate_limit
        if rate is None:
            return True
        with self._lock:
            bucket = self._buckets.get(host_kind)
            if bucket is None:
                bucket = self._buckets[host_kind] = _TokenBucket(rate)
        return bucket.take()


_ROUTES: list[tuple[str, re.Pattern[str], str, str]] = [
    ("POST", re.compile(r"/v1/billing/meter_events"), "/v1/billing/meter_events", "v1_meter_event"),
    (
        "POST",
        re.compile(r"/v1/billing/meter_event_adjustments"),
        "/v1/billing/meter_event_adjustments",
        "v1_adjust",
    ),
    ("GET", re.compile(r"/v1/billing/meters"), "/v1/billing/meters", "v1_list_meters"),
    ("POST", re.compile(r"/v1/billing/meters"), "/v1/billing/meters", "v1_create_meter"),
    ("GET", re.compile(r"/v1/billing/meters/(?P<id>[^/]+)"), "/v1/billing/meters/{id}", "v1_get_meter"),
    (
        "GET",
        re.compile(r"/v1/billing/meters/(?P<id>[^/]+)/event_summaries"),
        "/v1/billing/meters/{id}/event_summaries",
        "v1_summaries",
    ),
    ("POST", re.compile(r"/v2/billing/meter_event_session"), "/v2/billing/meter_event_session", "v2_session"),
    ("POST", re.compile(r"/v2/billing/meter_event_stream"), "/v2/billing/meter_event_stream", "v2_stream"),
    ("POST", re.compile(r"/v2/billing/meter_events"), "/v2/billing/meter_events", "v2_meter_event"),
    (
        "POST",
        re.compile(r"/v2/billing/meter_event_adjustments"),
        "/v2/billing/meter_event_adjustments",
        "v2_adjust",
    ),
    ("GET", re.compile(r"/v2/core/events"), "", "v2_events"),
    # Billing: metered prices, subscriptions (their items' periods), invoices and previews.
    ("GET", re.compile(r"/v1/prices"), "", "v1_prices"),
    ("GET", re.compile(r"/v1/subscriptions"), "", "v1_subscriptions"),
    ("GET", re.compile(r"/v1/subscriptions/(?P<id>[^/]+)"), "", "v1_subscription"),
    ("GET", re.compile(r"/v1/invoices"), "", "v1_invoices"),
    ("GET", re.compile(r"/v1/events"), "", "v1_events"),
    ("POST", re.compile(r"/v1/invoices/create_preview"), "", "v1_invoice_preview"),
    ("GET", re.compile(r"/v1/invoices/(?P<id>[^/]+)/lines"), "", "v1_invoice_lines"),
    ("GET", re.compile(r"/v1/invoices/(?P<id>[^/]+)"), "", "v1_invoice"),
    ("GET", re.compile(r"/v1/subscription_items"), "", "v1_subscription_items"),
    # Customers: whether Stripe knows the customers usage is billed for.
    ("GET", re.compile(r"/v1/customers"), "", "v1_customers"),
    ("GET", re.compile(r"/v1/customers/(?P<id>[^/]+)"), "", "v1_customer"),
    # Not Stripe's: what this server holds, for benchmarks and people driving it from another process.
    ("GET", re.compile(r"/_local/summary"), "", "local_summary"),
    ("POST", re.compile(r"/_local/clock"), "", "local_clock"),
]

#: The permission a restricted key needs for each route, by route name, as Stripe's 403 names it
#: (the Dashboard's restricted-key page sets the same ones: "Invoices: Read" is ``rak_invoice_read``,
#: "Prices" keeps the API's old name, ``rak_plan_read``). ``None``: no permission of the key (the v2
#: stream authenticates with a session's token; ``_local`` routes are this server's own).
#: docs/permissions.md lists them per feature; tests/test_permissions.py checks both agree.
ROUTE_PERMISSIONS: dict[str, str | None] = {
    "v1_meter_event": "rak_billing_meter_event_write",
    "v1_adjust": "rak_billing_meter_event_adjustment_write",
    "v1_list_meters": "rak_billing_meter_read",
    "v1_create_meter": "rak_billing_meter_write",
    "v1_get_meter": "rak_billing_meter_read",
    "v1_summaries": "rak_billing_meter_read",
    "v2_session": "rak_billing_meter_event_write",
    "v2_stream": None,
    "v2_meter_event": "rak_billing_meter_event_write",
    "v2_adjust": "rak_billing_meter_event_adjustment_write",
    "v2_events": "rak_event_read",
    "v1_prices": "rak_plan_read",
    "v1_subscriptions": "rak_subscription_read",
    "v1_subscription": "rak_subscription_read",
    "v1_invoices": "rak_invoice_read",
    "v1_events": "rak_event_read",
    "v1_invoice_preview": "rak_invoice_write",
    "v1_invoice_lines": "rak_invoice_read",
    "v1_invoice": "rak_invoice_read",
    "v1_subscription_items": "rak_subscription_read",
    "v1_customers": "rak_customer_read",
    "v1_customer": "rak_customer_read",
    "local_summary": None,
    "local_clock": None,
}
_KNOWN_PERMISSIONS = frozenset(
    name
    for permission in ROUTE_PERMISSIONS.values()
    if permission
    for name in (permission, permission.removesuffix("_write") + "_read")
)


def _grants(granted: frozenset[str], needed: str) -> bool:
    """Whether a restricted key granted ``granted`` may do what ``needed`` allows (Write includes Read)."""
    return needed in granted or (
        needed.endswith("_read") and needed.removesuffix("_read") + "_write" in granted
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: LocalStripeServer
    #: The ledger of the account this request acts for (``Stripe-Account``, or the session's).
    ledger: MeterLedger
    #: The ``Stripe-Account`` this request acts for ("" for the platform).
    account: str

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without TCP_NODELAY, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every keep-alive response, which Stripe does not.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        # Silent: request lines would fill test output, and must never carry credentials anywhere.
        return

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    # -- plumbing --------------------------------------------------------------------------

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Request-Id", f"req_{secrets.token_hex(7)}")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: StripeApiError, v2: bool) -> None:
        self._send(err.status, _error_body(err, v2), _error_headers(err))

    def _credentials(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[len("Bearer ") :].strip()
        if auth.startswith("Basic "):
            try:
                return base64.b64decode(auth[len("Basic ") :]).decode().split(":", 1)[0]
            except (ValueError, UnicodeDecodeError):
                return None
        return None

    def _serve(self, method: str) -> None:
        state = self.server_state
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body_bytes = self.rfile.read(length) if length else b""
        if len(body_bytes) < length:
            # The client went away mid-request (a worker killed with SIGKILL): like Stripe, act on
            # nothing of a request that never fully arrived.
            state.count("truncated_requests")
            self.close_connection = True
            return
        raw = body_bytes.decode()
        route = next(
            (
                (tmpl, name, m)
                for meth, rx, tmpl, name in _ROUTES
                if meth == method and (m := rx.fullmatch(split.path))
            ),
            None,
        )
        v2 = split.path.startswith("/v2/")
        state.count("requests")
        state.request_log.append(
            (method, self.path, {k: v for k, v in self.headers.items() if k.lower() != "authorization"})
        )
        if route is None:
            self._send_error(
                StripeApiError(
                    404, f"Unrecognized request URL ({method}: {split.path}).", code="resource_missing"
                ),
                v2,
            )
            return
        template, name, match = route
        state.count(name)
        host_kind = "stream" if name == "v2_stream" else "api"
        down = state._in_outage(split.path)
        if down is not None:
            state.count("outage_rejected")
            self._send(down, {"error": {"type": "api_error", "message": "Service unavailable (outage)."}})
            return

        try:
            self._authenticate(name)
            self._choose_account(name)
            self._authorize(name)
        except StripeApiError as err:
            self._send_error(err, v2)
            return
        if not state._allow(host_kind):
            state.count("rate_limited")
            self._send_error(
                StripeApiError(
                    429,
                    "Too many requests. Back off and retry.",
                    type="invalid_request_error",
                    code="rate_limit",
                ),
                v2,
            )
            return

        try:
            body = self._parse_body(raw, method, v2)
        except StripeApiError as err:
            self._send_error(err, v2)
            return
        if state.validate_spec and template:
            self._check_request(method, template, body, split.query)

        key = self.headers.get("Idempotency-Key") if method == "POST" else None
        # Idempotency keys belong to the account the request acts for, as on Stripe.
        scoped_key = f"{self.account}:{key}"
        if key:
            with state._lock:
                seen = state._idempotency.get(scoped_key)
            if seen is not None:
                fingerprint, status, payload = seen
                if fingerprint != raw:
                    refused = StripeApiError(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters they were "
                        f"first used with. Try using a key other than '{key}' if you meant to execute a "
                        "different request.",
                        type="idempotency_error",
                    )
                    self._send_error(refused, v2)
                    return
                state.count("idempotent_replays")
                if state._take_fault(split.path) is not None:
                    # The network loses a replayed answer as readily as a first one.
                    state.count("injected_failures")
                    lost = {"error": {"type": "api_error", "message": "Injected failure (replay lost)."}}
                    self._send(500, lost)
                    return
                self._send(status, payload, {"Idempotent-Replayed": "true"})
                return

        lock_key = self._customer_meter_key(name, body)
        if lock_key is not None:
            with state._lock:
                busy = lock_key in state._in_flight
                if not busy:
                    state._in_flight.add(lock_key)
            if busy:
                state.count("concurrent_rejected")
                self._send_error(
                    StripeApiError(
                        429,
                        "Too many concurrent requests for this customer and meter; send them one at a time.",
                        code="rate_limit",
                    ),
                    v2,
                )
                return
        try:
            if state.latency:
                time.sleep(state.latency)
            fault = state._take_fault(split.path)
            if fault is not None and not fault.after_write:
                state.count("injected_failures")
                self._send(
                    fault.status,
                    {"error": {"type": "api_error", "message": "Injected failure (before write)."}},
                )
                return
            try:
                status, payload = 200, getattr(self, "_h_" + name)(body, match, split.query)
            except StripeApiError as err:
                status, payload, payload_headers = err.status, _error_body(err, v2), _error_headers(err)
                if "already exists with identifier" in err.message:
                    state.count("duplicates_rejected")
            else:
                payload_headers = {}
            if state.validate_spec and template:
                self._check_response(method, template, status, payload)
            if key and status < 500:
                # Stripe saves the result of a request that ran under an idempotency key, also when
                # its answer is then lost on the way: a retry under the same key gets it replayed.
                with state._lock:
                    state._idempotency[scoped_key] = (raw, status, payload)
            if fault is not None:
                # The write landed; its answer is lost. A retry without the same key runs again
                # and meets the duplicate-identifier rule.
                state.count("injected_failures")
                self._send(
                    fault.status,
                    {"error": {"type": "api_error", "message": "Injected failure (after write)."}},
                )
                return
            self._send(status, payload, payload_headers)
        finally:
            if lock_key is not None:
                with state._lock:
                    state._in_flight.discard(lock_key)

    def _choose_account(self, name: str) -> None:
        """Act for the ``Stripe-Account`` header's account; 403 ``account_invalid`` for one unknown."""
        state = self.server_state
        if name == "v2_stream":
            # The session token was issued for one account; the stream host needs no header.
            self.account, self.ledger = "", state._session_ledger(self._credentials() or "")
            return
        account = (self.headers.get("Stripe-Account") or "").strip()
        with state._lock:
            ledger = state.accounts.get(account) if account else state.ledger
        if ledger is None:
            raise StripeApiError(
                403,
                f"The provided key '{_shown(self._credentials())}' does not have access to account "
                f"'{account}' (or that account does not exist). Application access may have been revoked.",
                type="invalid_request_error",
                code="account_invalid",
            )
        self.account, self.ledger = account, ledger

    def _authenticate(self, name: str) -> None:
        state = self.server_state
        credential = self._credentials()
        if name == "v2_stream":
            status = state._session_ledger(credential or "").session_state(credential or "")
            if status == "expired":
                raise _V2Error(
                    401,
                    "The meter event session has expired. Create a new session.",
                    type="temporary_session_expired",
                    code="billing_meter_event_session_expired",
                )
            if status == "unknown":
                raise StripeApiError(401, "Invalid meter event session token.", type="authentication_error")
            return
        if credential not in state.api_keys and credential not in state.restricted_keys:
            raise StripeApiError(
                401, f"Invalid API Key provided: {_shown(credential)}", type="authentication_error"
            )

    def _authorize(self, name: str) -> None:
        """Refuse a restricted key a permission it was not granted: 403, naming the permission.

        Stripe answers ``invalid_request_error`` with HTTP 403 (stripe-python raises
        ``stripe.PermissionError``) and no code; the message names the key (masked), the account
        and the permission that would let the request through.
        """
        state = self.server_state
        needed = ROUTE_PERMISSIONS.get(name)
        credential = self._credentials() or ""
        granted = state.restricted_keys.get(credential)
        if needed is None or granted is None or _grants(granted, needed):
            return
        state.count("permission_denied")
        raise StripeApiError(
            403,
            f"The provided key '{_shown(credential)}' does not have the required permissions for this "
            f"endpoint on account '{self.account or PLATFORM_ACCOUNT}'. Having the '{needed}' permission "
            "would allow this request to continue.",
            type="invalid_request_error",
        )

    def _parse_body(self, raw: str, method: str, v2: bool) -> Any:
        if method == "GET" or not raw:
            return {}
        if v2:
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                raise StripeApiError(400, "Request body is not valid JSON.") from None
        return decode_form(raw)

    def _customer_meter_key(self, name: str, body: Any) -> tuple[str, str] | None:
        state = self.server_state
        if not state.one_request_per_customer_meter or name not in ("v1_meter_event", "v2_meter_event"):
            return None
        if not isinstance(body, dict) or not isinstance(body.get("payload"), dict):
            return None
        meter = self.ledger.meter_for(str(body.get("event_name")))
        customer_key = meter.customer_key if meter else "stripe_customer_id"
        customer = str(body["payload"].get(customer_key))
        return (f"{self.account}:{customer}", str(body.get("event_name")))

    def _check_request(self, method: str, template: str, body: Any, query: str) -> None:
        from airflow_provider_stripe_meter.testing import spec

        found = spec.request_schema(method, template)
        if found is None or method == "GET":
            return
        content_type, schema = found
        instance = spec.coerce_form(body, schema) if "form" in content_type else body
        for problem in spec.validate(instance, schema):
            self.server_state.request_violations.append(f"request {method} {template}: {problem}")

    def _check_response(self, method: str, template: str, status: int, payload: Any) -> None:
        from airflow_provider_stripe_meter.testing import spec

        for problem in spec.validate(payload, spec.response_schema(method, template, status)):
            self.server_state.spec_violations.append(f"response {status} {method} {template}: {problem}")

    # -- endpoints -------------------------------------------------------------------------

    def _h_local_clock(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        """Set the clock's offset from the wall clock (``offset``, seconds): a benchmark lists
        subscriptions as they were a day ago, then bills tonight, on one server."""
        self.server_state.clock_offset = float((body or {}).get("offset") or 0)
        # Stripe's events are stored as they happen: work them out now, not on the next list.
        self.ledger.billing.event_moments(0)
        return {"now": int(self.ledger.clock())}

    def _h_local_summary(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        state = self.server_state
        events = self.ledger.accepted()
        with state._lock:
            stats = dict(state.stats)
        return {
            "events": len(events),
            "unique_identifiers": len({e.identifier for e in events}),
            "value": sum(int(e.payload.get("value", 0)) for e in events),
            "error_reports": len(self.ledger.error_reports),
            "stats": stats,
            # The server's own CPU time: what a benchmark on one machine pays for rendering
            # Stripe's objects, which Stripe renders on its own machines.
            "cpu_seconds": time.process_time(),
        }

    def _h_v1_meter_event(self, body: dict[str, Any], match: re.Match[str], query: str) -> dict[str, Any]:
        allowed = {"event_name", "payload", "identifier", "timestamp", "expand"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise StripeApiError(
                400, f"Received unknown parameter: {unknown[0]}", code="parameter_unknown", param=unknown[0]
            )
        for required in ("event_name", "payload"):
            if required not in body:
                raise StripeApiError(
                    400, f"Missing required param: {required}.", code="parameter_missing", param=required
                )
        timestamp = body.get("timestamp")
        if timestamp is not None:
            if not re.fullmatch(r"-?\d+", str(timestamp)):
                raise StripeApiError(
                    400, f"Invalid integer: {timestamp}", code="parameter_invalid_integer", param="timestamp"
                )
            timestamp = int(timestamp)
        if not isinstance(body["payload"], dict):
            raise StripeApiError(400, "Invalid object", code="parameter_invalid_object", param="payload")
        event = self.ledger.record(
            event_name=body["event_name"],
            payload=body["payload"],
            identifier=body.get("identifier"),
            timestamp=timestamp,
            api="v1",
        )
        assert event is not None
        return event.as_v1()

    def _adjust(self, body: dict[str, Any]) -> Any:
        if body.get("type") != "cancel":
            raise StripeApiError(400, "type must be `cancel`.", code="parameter_invalid", param="type")
        identifier = (body.get("cancel") or {}).get("identifier")
        if not identifier or not body.get("event_name"):
            raise StripeApiError(
                400, "event_name and cancel[identifier] are required.", code="parameter_missing"
            )
        return self.ledger.cancel(body["event_name"], identifier)

    def _h_v1_adjust(self, body: dict[str, Any], match: re.Match[str], query: str) -> dict[str, Any]:
        event = self._adjust(body)
        return {
            "object": "billing.meter_event_adjustment",
            "cancel": {"identifier": event.identifier},
            "event_name": event.event_name,
            "livemode": False,
            "status": "complete",
            "type": "cancel",
        }

    def _h_v2_adjust(self, body: dict[str, Any], match: re.Match[str], query: str) -> dict[str, Any]:
        event = self._adjust(body)
        return {
            "id": f"mtradj_test_{secrets.token_hex(8)}",
            "object": "v2.billing.meter_event_adjustment",
            "cancel": {"identifier": event.identifier},
            "created": rfc3339(self.ledger.clock()),
            "event_name": event.event_name,
            "livemode": False,
            "status": "complete",
            "type": "cancel",
        }

    def _h_v1_list_meters(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        params = dict(parse_qsl(query))
        meters = [m.as_object() for m in self.ledger.meters.values()]
        if params.get("status"):
            meters = [m for m in meters if m["status"] == params["status"]]
        return _paginate(meters, params, "/v1/billing/meters")

    def _h_v1_create_meter(self, body: dict[str, Any], match: re.Match[str], query: str) -> dict[str, Any]:
        for required in ("default_aggregation", "display_name", "event_name"):
            if required not in body:
                raise StripeApiError(
                    400, f"Missing required param: {required}.", code="parameter_missing", param=required
                )
        meter = self.ledger.add_meter(
            body["event_name"],
            formula=body["default_aggregation"].get("formula", "sum"),
            display_name=body["display_name"],
            customer_key=(body.get("customer_mapping") or {}).get("event_payload_key", "stripe_customer_id"),
            value_key=(body.get("value_settings") or {}).get("event_payload_key", "value"),
            event_time_window=body.get("event_time_window") or None,
        )
        return meter.as_object()

    def _meter(self, match: re.Match[str]) -> Any:
        meter = self.ledger.meters.get(match["id"])
        if meter is None:
            raise StripeApiError(
                404, f"No such billing meter: '{match['id']}'", code="resource_missing", param="id"
            )
        return meter

    def _h_v1_get_meter(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        return self._meter(match).as_object()

    def _h_v1_summaries(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        meter = self._meter(match)
        params = dict(parse_qsl(query))
        for required in ("customer", "start_time", "end_time"):
            if not params.get(required):
                raise StripeApiError(
                    400, f"Missing required param: {required}.", code="parameter_missing", param=required
                )
        try:
            start, end = int(params["start_time"]), int(params["end_time"])
        except ValueError:
            raise StripeApiError(
                400, "start_time and end_time must be integers.", code="parameter_invalid_integer"
            ) from None
        window_name = params.get("value_grouping_window")
        window = {"day": _DAY, "hour": 3600, None: None}.get(window_name, -1)
        if window == -1:
            raise StripeApiError(
                400, "value_grouping_window must be day or hour.", param="value_grouping_window"
            )
        align = window or 60
        for name, value in (("start_time", start), ("end_time", end)):
            if value % align:
                raise StripeApiError(
                    400, f"{name} must be aligned to {window_name or 'minute'} boundaries.", param=name
                )
        if end <= start:
            raise StripeApiError(400, "end_time must be after start_time.", param="end_time")
        if not self.ledger.customer_known(params["customer"]):
            raise StripeApiError(
                404, f"No such customer: '{params['customer']}'", code="resource_missing", param="customer"
            )
        summaries = self.ledger.summarize(meter, params["customer"], start, end, window)
        return _paginate(summaries, params, f"/v1/billing/meters/{meter.id}/event_summaries")

    def _h_v2_session(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        token, created, expires = self.ledger.open_session(self.server_state.session_ttl)
        return {
            "id": f"mes_{secrets.token_hex(8)}",
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": rfc3339(created),
            "expires_at": rfc3339(expires),
            "livemode": False,
        }

    def _v2_event_fields(self, item: Any) -> dict[str, Any]:
        if (
            not isinstance(item, dict)
            or "event_name" not in item
            or not isinstance(item.get("payload"), dict)
        ):
            raise StripeApiError(400, "Each event needs event_name and payload.", code="invalid_payload")
        timestamp = item.get("timestamp")
        if timestamp is not None:
            try:
                timestamp = parse_rfc3339(timestamp)
            except (TypeError, ValueError):
                raise StripeApiError(
                    400, f"Invalid timestamp: {timestamp!r}", code="invalid_timestamp"
                ) from None
        return {
            "event_name": item["event_name"],
            "payload": item["payload"],
            "identifier": item.get("identifier"),
            "timestamp": timestamp,
        }

    def _h_v2_stream(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not events:
            raise StripeApiError(400, "events must be a non-empty list.", code="invalid_payload")
        if len(events) > 100:
            raise StripeApiError(
                400, f"At most 100 events per request, got {len(events)}.", code="invalid_payload"
            )
        ledger = self.ledger
        for item in events:
            # Validation on the stream is asynchronous: bad or duplicate events are dropped and
            # reported, never rejected in the response.
            try:
                fields = self._v2_event_fields(item)
            except StripeApiError as err:
                with ledger.lock:
                    ledger.error_reports.append({"code": err.code, "message": err.message})
                continue
            ledger.record(**fields, api="v2_stream", synchronous=False)
        return {}

    def _h_v1_prices(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        """``GET /v1/prices``: the account's prices, newest first; ``active`` (absent: both, as
        Stripe lists archived prices too) and ``type`` filters (docs.stripe.com/api/prices/list)."""
        params = dict(parse_qsl(query))
        prices = sorted(self.ledger.billing.prices.values(), key=lambda p: (p.created, p.id), reverse=True)
        active = params.get("active")
        if active is not None:
            if active not in ("true", "false"):
                raise StripeApiError(
                    400, f"Invalid boolean: {active}", code="parameter_invalid_boolean", param="active"
                )
            prices = [p for p in prices if p.active == (active == "true")]
        if params.get("type") not in (None, "recurring"):
            prices = []  # every price here is recurring
        return _paginate([p.as_object() for p in prices], params, "/v1/prices")

    def _h_v1_subscriptions(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        """``GET /v1/subscriptions``: filters ``price``, ``customer``, ``status`` (default: not
        canceled; ``all``), ``current_period_end[gte]``; the item embedded."""
        params = dict(parse_qsl(query))
        billing = self.ledger.billing
        now = int(self.ledger.clock())

        def build() -> list[Any]:
            # Newest first, as Stripe lists (docs.stripe.com/api/subscriptions/list).
            # Made later comes first among equals: the reversed order of making, sorted stably.
            subs = sorted(reversed(billing.subscriptions.values()), key=attrgetter("created"), reverse=True)
            if params.get("price"):
                subs = [s for s in subs if s.price.id == params["price"]]
            if params.get("customer"):
                subs = [s for s in subs if s.customer == params["customer"]]
            status = params.get("status")
            if status != "all":
                want_ended = status == "canceled"
                subs = [s for s in subs if (s.ended_at(now) is not None) == want_ended]
            if params.get("current_period_end[gte]"):
                floor = int(params["current_period_end[gte]"])
                subs = [s for s in subs if billing.current_period(s, now)[1] >= floor]
            return subs

        subs = billing.listing(params, build)
        # Paged on the objects themselves; only the page is rendered (a benchmark lists 100,000).
        limit = max(1, min(100, int(params.get("limit") or 10)))
        after = params.get("starting_after")
        if after:
            ids = [s.id for s in subs]
            subs = subs[ids.index(after) + 1 :] if after in ids else []
        return {
            "object": "list",
            "data": [billing.subscription_object(s) for s in subs[:limit]],
            "has_more": len(subs) > limit,
            "url": "/v1/subscriptions",
        }

    def _h_v1_subscription(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        """``GET /v1/subscriptions/{id}``: the subscription as the pinned version shows it (a period
        change read from an event that has no periods is read again this way)."""
        sub = self.ledger.billing.subscriptions.get(match["id"])
        if sub is None:
            raise StripeApiError(
                404, f"No such subscription: '{match['id']}'", code="resource_missing", param="id"
            )
        return self.ledger.billing.subscription_object(sub)

    def _h_v1_invoices(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        """``GET /v1/invoices``: filters ``subscription``, ``customer``, ``status``,
        ``created[gt|gte|lt|lte]``; newest first by ``created`` (docs.stripe.com/api/invoices/list)."""
        params = dict(parse_qsl(query))
        billing = self.ledger.billing
        low, high = _created_bounds(params)

        def build() -> list[Any]:
            now = int(self.ledger.clock())
            subs = list(billing.subscriptions.values())
            if params.get("subscription"):
                subs = [s for s in subs if s.id == params["subscription"]]
            if params.get("customer"):
                subs = [s for s in subs if s.customer == params["customer"]]
            if params.get("status") == "draft":
                # A cycle's draft lives through the grace period after its period ended, unless a
                # test changed how it finalizes: find those first (a benchmark has 100,000).
                # Their periods ended (a renewal or an end) inside the grace period and the
                # ``created`` range asked: found by bisecting the subscriptions' events, not by
                # walking every subscription once per range listed.
                controlled = billing.controlled()
                lo, hi = max(now - billing.grace, low), min(now, high)
                near = {moment[2].id for moment in billing.event_moments(lo, hi)} if hi > lo else set()
                # A subscription made since (backdated: its periods ended before it was made) has no
                # renewal event for them: it is a candidate too.
                made = {s.id for s in subs if (s.changes[0][0] if s.changes else s.created) > lo}
                subs = [s for s in subs if s.id in controlled or s.id in near or s.id in made]
            refs = billing.all_invoice_refs(subs)
            if params.get("subscription"):
                refs = [r for r in refs if r.sub is not None and r.sub.id == params["subscription"]]
            if params.get("customer"):
                refs = [r for r in refs if r.customer == params["customer"]]
            if params.get("status"):
                refs = [r for r in refs if billing.status_of(r) == params["status"]]
            return [r for r in refs if low < r.created <= high]

        # Paged on references; only the page's quantities are read and rendered.
        page = _paginate(billing.listing({"invoices": "1", **params}, build), params, "/v1/invoices")
        page["data"] = [billing.render_invoice(ref) for ref in page["data"]]
        return page

    def _h_v1_invoice(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        """``GET /v1/invoices/{id}``."""
        ref = self.ledger.billing.find_invoice(match["id"])
        if ref is None:
            raise StripeApiError(
                404, f"No such invoice: '{match['id']}'", code="resource_missing", param="id"
            )
        return self.ledger.billing.render_invoice(ref)

    def _h_v1_invoice_lines(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        """``GET /v1/invoices/{id}/lines``: every line, paged (an invoice embeds only its first 10;
        docs.stripe.com/api/invoices/invoice_lines); a preview's ``upcoming_in_...`` id too."""
        lines = self.ledger.billing.invoice_lines(match["id"])
        if lines is None:
            raise StripeApiError(
                404, f"No such invoice: '{match['id']}'", code="resource_missing", param="id"
            )
        return _paginate(lines, dict(parse_qsl(query)), f"/v1/invoices/{match['id']}/lines")

    def _h_v1_subscription_items(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        """``GET /v1/subscription_items?subscription=``: the subscription's items, as embedded."""
        params = dict(parse_qsl(query))
        billing = self.ledger.billing
        sub = billing.subscriptions.get(params.get("subscription") or "")
        if sub is None:
            if not params.get("subscription"):
                raise StripeApiError(
                    400,
                    "Missing required param: subscription.",
                    code="parameter_missing",
                    param="subscription",
                )
            raise StripeApiError(
                404, f"No such subscription: '{params['subscription']}'", code="resource_missing"
            )
        items = billing.subscription_object(sub)["items"]["data"]
        return _paginate(items, params, "/v1/subscription_items")

    def _h_v1_events(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        """``GET /v1/events``: the subscriptions' events of the last 30 days, newest first; filters
        ``type`` (``*`` wildcards), ``types[]`` (at most 20) and ``created[gt|gte|lt|lte]``
        (docs.stripe.com/api/events/list)."""
        pairs = parse_qsl(query)
        params = dict(pairs)
        types = [v for k, v in pairs if k == "types" or k.startswith("types[")]
        if len(types) > MAX_EVENT_TYPES:
            raise StripeApiError(
                400,
                f"You can pass at most {MAX_EVENT_TYPES} types, got {len(types)}.",
                code="parameter_invalid_array",
                param="types",
            )
        if params.get("type"):
            if types:
                raise StripeApiError(400, "You may pass either type or types, not both.", param="types")
            types = [params["type"]]
        billing = self.ledger.billing
        low, high = _created_bounds(params)
        # Stripe keeps events 30 days: older ones are not listed.
        low = max(low, int(self.ledger.clock()) - EVENT_RETENTION)

        def build() -> list[Any]:
            found = billing.event_moments(low, None if high == _FAR else high)
            if not types:
                return found
            return [m for m in found if any(fnmatchcase(EVENT_TYPES[m[1]], t) for t in types)]

        # Paged on the moments; only the page is rendered (a night lists thousands of renewals).
        moments = billing.listing({"events": "1", **params}, build)
        limit = max(1, min(100, int(params.get("limit") or 10)))
        start = 0
        if params.get("starting_after"):
            ids = [billing.event_id(m) for m in moments]
            start = ids.index(params["starting_after"]) + 1 if params["starting_after"] in ids else len(ids)
        page = moments[start : start + limit]
        return {
            "object": "list",
            "data": [billing.event_object(m) for m in page],
            "has_more": start + limit < len(moments),
            "url": "/v1/events",
        }

    def _h_v1_invoice_preview(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        """``POST /v1/invoices/create_preview``: the subscription's upcoming invoice, as it stands."""
        billing = self.ledger.billing
        sub = billing.subscriptions.get(str((body or {}).get("subscription") or ""))
        if sub is None:
            raise StripeApiError(
                404, f"No such subscription: '{(body or {}).get('subscription')}'", code="resource_missing"
            )
        if sub.ended_at(int(self.ledger.clock())) is not None:
            raise StripeApiError(
                400, "The subscription has ended: it has no upcoming invoice.", code="invoice_upcoming_none"
            )
        return billing.preview(sub)

    def _customer_object(self, customer_id: str) -> dict[str, Any]:
        """A customer as ``stripe.Customer`` declares it: every required field, a few optional ones."""
        return {
            "id": customer_id,
            "object": "customer",
            "created": self.ledger.customer_created(customer_id),
            "livemode": False,
            "balance": 0,
            "currency": None,
            "delinquent": False,
            "description": None,
            "email": None,
            "metadata": {},
            "name": None,
        }

    def _h_v1_customers(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        """``GET /v1/customers``: the account's customers, newest first, deleted ones left out
        (with ``customers=None``, those this server has met: see ``MeterLedger.customer_list``)."""
        params = dict(parse_qsl(query))
        limit = max(1, min(100, int(params.get("limit") or 10)))
        page, more = self.ledger.customer_page(params.get("starting_after"), limit)
        return {
            "object": "list",
            "data": [self._customer_object(c) for c in page],
            "has_more": more,
            "url": "/v1/customers",
        }

    def _h_v1_customer(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        """``GET /v1/customers/{id}``: the customer; a deleted one as ``deleted: true``; 404 for
        one Stripe does not know, as Stripe answers (``resource_missing``, ``param: id``)."""
        from urllib.parse import unquote

        customer_id = unquote(match["id"])
        if customer_id in self.ledger.deleted_customers:
            return {"id": customer_id, "object": "customer", "deleted": True}
        if not self.ledger.customer_known(customer_id):
            raise StripeApiError(
                404, f"No such customer: '{customer_id}'", code="resource_missing", param="id"
            )
        return self._customer_object(customer_id)

    def _h_v2_events(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        """``GET /v2/core/events``: the meters' error reports, filtered by ``object_id``, ``types``
        and ``created``, newest first, a page of ``limit`` (default 20) at a time."""
        params = parse_qs(query)
        events = self.ledger.error_report_events()
        if params.get("object_id"):
            events = [e for e in events if e["related_object"]["id"] == params["object_id"][0]]
        types = [v for k, vs in params.items() if k == "types" or k.startswith("types[") for v in vs]
        if types:
            events = [e for e in events if e["type"] in types]
        for bound, keep in (
            ("gt", lambda a, b: a > b),
            ("gte", lambda a, b: a >= b),
            ("lt", lambda a, b: a < b),
            ("lte", lambda a, b: a <= b),
        ):
            value = (params.get(f"created[{bound}]") or params.get(f"created.{bound}") or [""])[0]
            if value:
                events = [e for e in events if keep(parse_rfc3339(e["created"]), parse_rfc3339(value))]
        limit = max(1, min(100, int((params.get("limit") or ["20"])[0])))
        offset = int((params.get("page") or ["0"])[0])
        page = events[offset : offset + limit]
        rest = offset + limit < len(events)
        keep_query = "&".join(f"{k}={quote(v)}" for k, vs in params.items() if k != "page" for v in vs)
        return {
            "data": page,
            "next_page_url": f"/v2/core/events?{keep_query}&page={offset + limit}" if rest else None,
            "previous_page_url": None,
        }

    def _h_v2_meter_event(self, body: Any, match: re.Match[str], query: str) -> dict[str, Any]:
        fields = self._v2_event_fields(body)
        try:
            event = self.ledger.record(**fields, api="v2")
        except StripeApiError as err:
            if "already exists" in err.message:
                raise _V2Error(
                    400, err.message, type="invalid_request_error", code="duplicate_meter_event"
                ) from None
            raise
        assert event is not None
        return {
            "object": "v2.billing.meter_event",
            "created": rfc3339(event.created),
            "event_name": event.event_name,
            "identifier": event.identifier,
            "livemode": False,
            "payload": dict(event.payload),
            "timestamp": rfc3339(event.timestamp),
        }


def _shown(credential: str | None) -> str:
    """A key as Stripe's errors show it: its start and end, never the whole of it."""
    return f"{credential[:8]}****{credential[-4:]}" if credential and len(credential) > 12 else "****"


class _V2Error(StripeApiError):
    """An error with a v2 ``type``/``code`` pair (the SDK maps some to their own classes)."""


def _error_body(err: StripeApiError, v2: bool) -> dict[str, Any]:
    if v2 or isinstance(err, _V2Error):
        # v2 errors always carry a code (v2.error schema).
        return {"error": {"type": err.type, "code": err.code or err.type, "message": err.message}}
    return err.body()


def _error_headers(err: StripeApiError) -> dict[str, str]:
    if err.should_retry is None:
        return {}
    return {"Stripe-Should-Retry": "true" if err.should_retry else "false"}


#: No upper bound on ``created``.
_FAR = 2**62


def _created_bounds(params: dict[str, str]) -> tuple[int, int]:
    """``created`` / ``created[gt|gte|lt|lte]`` as ``(low, high)``: an object matches when
    ``low < created <= high`` (Stripe's list filters, docs.stripe.com/api/pagination)."""
    low, high = -1, _FAR
    for key, value in params.items():
        if key != "created" and not key.startswith("created["):
            continue
        try:
            bound = int(value)
        except ValueError:
            raise StripeApiError(
                400, f"Invalid integer: {value}", code="parameter_invalid_integer", param=key
            ) from None
        if key in ("created", "created[gte]"):
            low = max(low, bound - 1)
        if key in ("created", "created[lte]"):
            high = min(high, bound)
        if key == "created[gt]":
            low = max(low, bound)
        if key == "created[lt]":
            high = min(high, bound - 1)
    return low, high


def _paginate(items: list[Any], params: dict[str, str], url: str) -> dict[str, Any]:
    """One page of ``items`` (``limit``, and ``starting_after`` or ``ending_before`` an id)."""
    limit = max(1, min(100, int(params.get("limit") or 10)))
    after, before = params.get("starting_after"), params.get("ending_before")
    if after or before:
        ids = [item["id"] if isinstance(item, dict) else item.id for item in items]
    if after:
        items = items[ids.index(after) + 1 :] if after in ids else []
    elif before:
        # The page just before ``before``: its ``has_more`` says whether more lie before it.
        kept = items[: ids.index(before)] if before in ids else []
        page = kept[-limit:]
        return {"object": "list", "data": page, "has_more": len(kept) > limit, "url": url}
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit, "url": url}
