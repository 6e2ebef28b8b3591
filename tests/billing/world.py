"""A billing world in one process: a source table, the billing ledger (SQLite), Stripe (the local
server's ledger, called in-process) and one clock for all three, so a test can live a history
(nights, hours, kills, a clock moved past Stripe's 24-hour window) in milliseconds.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections import defaultdict
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from airflow_provider_stripe_meter.billing.context import Writer
from airflow_provider_stripe_meter.billing.coverage import NOTHING, Coverage
from airflow_provider_stripe_meter.billing.result import SourceFigures
from airflow_provider_stripe_meter.billing.run import BillingRun, Usage
from airflow_provider_stripe_meter.billing.settings import Delivery, RunSettings, Timing
from airflow_provider_stripe_meter.ledger.customers import CustomerTable
from airflow_provider_stripe_meter.ledger.store import SqlLedger
from airflow_provider_stripe_meter.testing.inprocess import InProcessStripe
from airflow_provider_stripe_meter.testing.ledger import MeterLedger
from airflow_provider_stripe_meter.utils.aggregation import UsageAggregator
from airflow_provider_stripe_meter.utils.clock import Clock

DAY = 86400
HOUR = 3600
EVENT = "ai_tokens_used"
#: 02:00 UTC: when the nightly run bills yesterday.
START = int(datetime(2026, 11, 20, 2, 0, tzinfo=timezone.utc).timestamp())
LOG = logging.getLogger("ledger-world")


def midnight(offset: int, now: int = START) -> int:
    """Unix seconds of midnight UTC ``offset`` days from the day of ``now``."""
    return (now // DAY + offset) * DAY


def iso(stamp: int) -> str:
    """The UTC day of ``stamp``, ISO."""
    return datetime.fromtimestamp(stamp, timezone.utc).date().isoformat()


class World:
    """The source, the ledger and Stripe, on one clock."""

    def __init__(
        self,
        tmp_path: Path,
        monkeypatch: Any,
        *,
        formula: str = "sum",
        window: str | None = None,
        customers: list[str] | None = None,
        summary_lag: float = 0.0,
        check_customers: bool = True,
    ) -> None:
        self.now = float(START)
        #: The runs' clock: waiting on it moves it on.
        self.run_clock = Clock(self.clock, self.advance)
        self.stripe_state = MeterLedger(
            clock=self.clock, identifier_window=DAY, summary_lag=summary_lag, customers=customers
        )
        self.meter = self.stripe_state.add_meter(EVENT, formula=formula, event_time_window=window)
        self.stripe = InProcessStripe(self.stripe_state)
        self.formula = formula
        #: Runs check the source's customers against the known-customers table, as the operator's do.
        self.check_customers = check_customers
        self.db = tmp_path / "ledger.db"
        #: The usage table: (customer, value, unix seconds).
        self.rows: list[tuple[str, int, int]] = []
        self.results: list[dict[str, Any]] = []
        #: Requests in flight at most (``None``: from the pace, several at once).
        self.concurrency: int | None = None
        #: Where the source's rows are summed: ``"worker"`` (row by row in Python),
        #: ``"database"`` (the SQL the operator pushes down, run on an in-memory SQLite table) or
        #: ``"ledger"`` (that SQL on a table beside the ledger, which the database subtracts).
        self.aggregate_in = "worker"

    def clock(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def add(self, customer: str, value: int, at: int) -> None:
        self.rows.append((customer, value, at))

    def store(self) -> SqlLedger:
        return SqlLedger(lambda: sqlite3.connect(self.db))

    def run(
        self,
        *,
        since: int | None = None,
        until: int | None = None,
        too_old: str = "skip",
        api: str = "v1",
        run_id: str = "nightly",
        dry_run: bool = False,
        summary_lag: float = 0.0,
        confirm: str = "meter",
        adopt: bool = False,
        meanwhile: list[Any] | None = None,
        covers: Coverage | str | None = "query",
        periods: Any = None,
    ) -> dict[str, Any]:
        """One batch run over the rows in ``[since, until)`` (default: every row up to now);
        ``meanwhile``: work the run does while its first events are out; ``covers``: where the
        source is the truth (``"query"``: ``[since, until)`` when ``since`` is given, as a DAG
        declares its query's window; ``None``: nowhere)."""
        now = int(self.now)
        end = until if until is not None else now + 1
        rows = [
            (c, v, datetime.fromtimestamp(t, timezone.utc))
            for c, v, t in self.rows
            if (since is None or t >= since) and t < end
        ]
        aggregator = UsageAggregator(
            event_name=EVENT,
            now=now,
            columns=("customer_id", "value", "timestamp"),
            naive_timezone=timezone.utc,
            safety_margin=timedelta(minutes=5),
            keep_too_old=too_old == "bill_at_oldest",
            split=periods.split() if periods is not None else None,
        )
        coverage = (
            Coverage.between(since, until if until is not None else now + 1, now)
            if covers == "query" and since is not None
            else covers
            if isinstance(covers, Coverage)
            else NOTHING
        )
        if self.aggregate_in == "ledger" and not adopt:
            self._aggregate_in_database(aggregator, since, end, subtract=coverage)
        elif self.aggregate_in in ("database", "ledger"):
            self._aggregate_in_database(aggregator, since, end)
        else:
            aggregator.add_rows(rows)
        aggregates = aggregator.finish()
        unchanged = aggregator.unchanged
        usage = Usage(
            aggregates,
            SourceFigures(
                rows=aggregator.rows,
                aggregates=len(aggregates) + (unchanged.groups() if unchanged is not None else 0),
                problems=dict(aggregator.problems.counts),
                samples=dict(aggregator.problems.samples),
                late_rows=aggregator.too_old_rows,
                database=aggregator.database,
            ),
            tuple(aggregator.too_old),
            aggregator.oldest,
            covers=coverage,
            periods=periods,
            event_names=frozenset({EVENT}),
            unchanged=unchanged,
        )
        settings = RunSettings(
            api=api,  # type: ignore[arg-type]
            confirm=confirm,  # type: ignore[arg-type]
            adopt=adopt,
            dry_run=dry_run,
            max_rps=10_000,
            read_rps=10_000,
            delivery=Delivery(
                max_rps=10_000,
                concurrency=self.concurrency,
                max_attempts=3,
                outage_timeout=timedelta(seconds=5),
            ),
            timing=Timing(settle_timeout=timedelta(minutes=10)),
            summary_lag=summary_lag,
        )
        store = self.store()
        try:
            run = BillingRun(
                settings,
                self.stripe,
                store,
                Writer("platform", run_id, uuid.uuid4().hex),
                LOG,
                now,
                customers=CustomerTable(store) if self.check_customers else None,
                clock=self.run_clock,
            )
            run.meanwhile = list(meanwhile or [])
            result = run.execute(usage).as_dict()
        finally:
            store.close()
        self.results.append(result)
        return result

    def _aggregate_in_database(
        self, aggregator: UsageAggregator, since: int | None, end: int, *, subtract: Coverage | None = None
    ) -> None:
        """The rows of ``[since, end)`` summed by the operator's pushed-down SQL, from a table of
        integer unix seconds (every row vouched for by the SQL: none is checked in Python).

        ``subtract``: the table lives beside the ledger, which the database subtracts (as the
        operator does where ``ledger_conn_id`` is ``sql_conn_id``), except on the days of this
        coverage, as the operator keeps its coverage's days apart.
        """
        from airflow_provider_stripe_meter.pushdown.dialects import SqliteDialect
        from airflow_provider_stripe_meter.pushdown.ledger_diff import LedgerSide
        from airflow_provider_stripe_meter.pushdown.source import aggregate_in_database

        side = None
        if subtract is not None:
            # The ledger's own connection (its table created on first use): the usage beside it.
            store = self.store()
            con = store.conn
            con.execute("DROP TABLE IF EXISTS usage")
            days = subtract.days
            apart = (days[0].toordinal() - EPOCH, days[-1].toordinal() - EPOCH) if days else None
            # As the run's subtractable(): a raw sum or count meter (a pre-aggregated one bills its
            # newest event).
            if self.formula in ("sum", "count") and self.meter.event_time_window is None:
                meters = {EVENT: (self.meter.id, self.formula == "count")}
                side = LedgerSide("stripe_meter_ledger", "platform", meters, apart)
        else:
            store = SqlLedger(lambda: sqlite3.connect(":memory:"), create=False)
            con = store.conn
        try:
            con.execute("CREATE TABLE usage (customer_id TEXT, value INTEGER, used_at INTEGER)")
            con.executemany("INSERT INTO usage VALUES (?, ?, ?)", self.rows)
            figures = aggregate_in_database(
                con,
                SqliteDialect(),
                "SELECT customer_id, value, used_at FROM usage WHERE used_at >= ? AND used_at < ?",
                (since if since is not None else -(2**62), end),
                aggregator,
                ledger=(lambda: side) if side is not None else None,
            )
            assert figures.rows_checked == 0, figures
            aggregator.database = figures.as_dict()
            #: What the last run's database left out, the ledger holding it (``None``: not subtracted).
            self.unchanged = figures.unchanged
        finally:
            store.close()

    def run_confirmed(self, **kwargs: Any) -> dict[str, Any]:
        """A run with ``confirm="summaries"``: it reads back every customer it sent to."""
        return self.run(confirm="summaries", **kwargs)

    # -- what a test compares --------------------------------------------------------------------

    def billed(self) -> dict[tuple[str, str], int]:
        """What Stripe bills per (customer, UTC day), by the meter's formula (dropped events excluded)."""
        return {k: v for k, v in self.stripe_state.figures(EVENT).items() if v or self.formula == "last"}

    def source(self, since: int | None = None, until: int | None = None) -> dict[tuple[str, str], int]:
        """The source's figure per (customer, UTC day) by the meter's formula, rows in ``[since, until)``."""
        days: dict[tuple[str, str], list[tuple[int, int, int]]] = defaultdict(list)
        for index, (customer, value, at) in enumerate(self.rows):
            if (since is None or at >= since) and (until is None or at < until):
                days[(customer, iso(at))].append((at, index, value))
        out = {}
        for key, rows in days.items():
            if self.formula == "count":
                out[key] = len(rows)
            elif self.formula == "last":
                out[key] = max(rows)[2]
            else:
                out[key] = sum(r[2] for r in rows)
        return {k: v for k, v in out.items() if v or self.formula == "last"}

    def invoiced(self, start: int, end: int) -> int:
        """What Stripe bills for events stamped in ``[start, end)`` (a billing period), by ``sum``."""
        return sum(
            int(e.payload["value"]) for e in self.stripe_state.accepted() if start <= e.timestamp < end
        )

    def ledger_rows(self) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db) as con:
            return con.execute(
                "SELECT customer_id, day, seq, value, state FROM stripe_meter_ledger ORDER BY 1, 2, 3"
            ).fetchall()


EPOCH = date(1970, 1, 1).toordinal()


def day_of(stamp: int) -> date:
    return datetime.fromtimestamp(stamp, timezone.utc).date()
