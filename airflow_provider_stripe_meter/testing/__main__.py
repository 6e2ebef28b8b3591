"""Run the local Stripe meter server: ``python -m airflow_provider_stripe_meter.testing``."""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time

from airflow_provider_stripe_meter.testing.server import DEFAULT_API_KEY, LocalStripeServer


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, serve until interrupted."""
    parser = argparse.ArgumentParser(
        description="Local Stripe billing-meter server for tests and demos. Every endpoint, reads "
        "included, needs the API key as a Bearer token (the key it prints), as Stripe's do.",
        # Each option's default is shown in --help.
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=12111, help="port on 127.0.0.1")
    parser.add_argument(
        "--meter", action="append", default=[], help="event name of a meter to create (repeat)"
    )
    parser.add_argument(
        "--customer",
        action="append",
        help="a customer Stripe knows (repeat; None: every cus_... id is known)",
    )
    parser.add_argument("--api-key", default=DEFAULT_API_KEY, help="the secret key it accepts (a test key)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument(
        "--rate-limit", type=float, help="API requests per second before 429 (None: no limit)"
    )
    parser.add_argument(
        "--stream-rate-limit", type=float, help="v2 stream requests per second before 429 (None: no limit)"
    )
    parser.add_argument(
        "--allow-concurrent-per-customer",
        action="store_true",
        help="do not answer 429 to a second in-flight request for the same customer and meter",
    )
    parser.add_argument(
        "--preload",
        help="JSON file of events Stripe already holds: "
        "[{event_name, customer, value, timestamp, identifier}, ...]",
    )
    parser.add_argument(
        "--subscriptions",
        type=int,
        default=0,
        help="subscribe cus_bench000000... to a monthly metered price on the first meter, anchors "
        "spread over the last 30 days",
    )
    parser.add_argument(
        "--subscriptions-at",
        type=int,
        help="unix seconds the --subscriptions anchors count back from (default: now), so two "
        "servers hold the same subscriptions",
    )
    parser.add_argument("--grace", type=int, default=3600, help="finalization grace period, seconds")
    parser.add_argument(
        "--clock-offset",
        type=float,
        default=0.0,
        help="seconds added to this server's clock (negative: the server lives in the past)",
    )
    args = parser.parse_args(argv)

    server = LocalStripeServer(
        meters=args.meter or ["ai_tokens_used"],
        customers=args.customer,
        api_keys=[args.api_key],
        latency=args.latency,
        rate_limit=args.rate_limit,
        stream_rate_limit=args.stream_rate_limit,
        one_request_per_customer_meter=not args.allow_concurrent_per_customer,
        port=args.port,
    ).start()
    server.clock_offset = args.clock_offset
    if args.preload:
        with open(args.preload) as handle:
            for event in json.load(handle):
                server.ledger.record(
                    event_name=event["event_name"],
                    payload={"stripe_customer_id": event["customer"], "value": str(event["value"])},
                    identifier=event.get("identifier"),
                    timestamp=event["timestamp"],
                    api="preload",
                )
    if args.subscriptions:
        billing = server.ledger.billing
        billing.grace = args.grace
        price = billing.add_price((args.meter or ["ai_tokens_used"])[0])
        now = args.subscriptions_at or int(time.time())
        for i in range(args.subscriptions):
            anchor = now - (i % 30) * 86400 - 3600 - i % 3600
            start = anchor - 60 * 86400
            # Made long ago: no customer.subscription.created event inside any run's window.
            billing.subscribe(f"cus_bench{i:06d}", price, anchor=anchor, start=start, created_at=start)
        # Stripe lists events it stored as they happened: work them out now, not on a first request.
        billing.event_moments(0)
    print(f"Local Stripe meter server on {server.url}", flush=True)
    print(f"AIRFLOW_CONN_STRIPE_DEFAULT='{server.connection_json(args.api_key)}'", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
