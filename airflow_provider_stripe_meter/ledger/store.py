"""Reading and writing the ledger through any DB-API 2.0 connection (PEP 249).

One :class:`SqlLedger` serves one run from one thread: the run writes a slice of rows
(``pending``), sends that slice, and resolves it, so a run killed at any instant leaves at most
one slice for the next run to settle. Writes go in multi-row statements, so a 100,000-event
night costs a few hundred round trips, not 100,000.

.. seealso:: https://peps.python.org/pep-0249/
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date
from typing import Any

from airflow_provider_stripe_meter.ledger.entries import LIVE, OPEN, Change, DayFigure, Entry
from airflow_provider_stripe_meter.ledger.schema import COLUMN_NAMES, DEFAULT_TABLE, check_table_name, ddl
from airflow_provider_stripe_meter.utils.days import day_of

#: Tries at creating the table when other runs create it at the same moment.
DDL_TRIES = 5
#: Rows per multi-row statement (SQLite allows 32,766 parameters; 16 columns x 500 rows fit).
BATCH = 500
#: A day with this many customer-days to read is read whole (:meth:`SqlLedger.figures_of`).
WHOLE_DAY = 2_000
#: Dialects whose ``INSERT ... ON CONFLICT DO NOTHING`` and ``WITH ... UPDATE ... FROM`` we use.
NATIVE = ("sqlite", "postgres")

#: (customer, UTC day) within one meter (the billing core's keys also name the meter's event).
CustomerDayKey = tuple[str, date]


def _chunks(items: Sequence[Any], size: int = BATCH) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SqlLedger:
    """The ledger table, through a DB-API connection.

    :param connect: Returns a new DB-API connection (called once, on first use).
    :param placeholder: The driver's parameter marker: ``?`` (SQLite) or ``%s`` (psycopg2, most
        others); a common-sql hook's ``placeholder``.
    :param dialect: ``sqlite``, ``postgres`` or ``generic`` (row-by-row writes, no
        ``ON CONFLICT``; the table's key still refuses a second writer where it is enforced).
    :param table: The table, optionally schema-qualified.
    :param create: Create the table and its indexes if they do not exist.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        placeholder: str = "?",
        dialect: str = "sqlite",
        table: str = DEFAULT_TABLE,
        create: bool = True,
    ) -> None:
        self._connect = connect
        self.placeholder = placeholder
        self.dialect = dialect if dialect in NATIVE else "generic"
        self.table = check_table_name(table)
        self.create = create
        self._conn: Any = None

    # -- connection ---------------------------------------------------------------------------

    @property
    def conn(self) -> Any:
        """The open connection, with the table created on first use."""
        if self._conn is None:
            self._conn = self._connect()
            if self.create:
                self._create()
        return self._conn

    def _create(self) -> None:
        """Create the table and indexes if missing. Two first runs at once may both try: on
        PostgreSQL ``IF NOT EXISTS`` is not atomic, so the loser's error is caught and it tries again
        once the winner has committed."""
        for attempt in range(DDL_TRIES):
            try:
                cursor = self._conn.cursor()
                for statement in ddl(self.table):
                    cursor.execute(statement)
                self._conn.commit()
                return
            except Exception:
                self._conn.rollback()
                if attempt == DDL_TRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _sql(self, text: str) -> str:
        return text.replace("?", self.placeholder) if self.placeholder != "?" else text

    def _marks(self, n: int) -> str:
        return ", ".join(["?"] * n)

    def _query(self, text: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self.conn.cursor()
        cursor.execute(self._sql(text), tuple(params))
        rows = cursor.fetchall()
        cursor.close()
        return rows

    def _execute(self, text: str, params: Sequence[Any] = ()) -> None:
        cursor = self.conn.cursor()
        cursor.execute(self._sql(text), tuple(params))
        cursor.close()

    # -- reading ------------------------------------------------------------------------------

    def figures_of(
        self, account: str, meter_id: str, keys: Iterable[CustomerDayKey]
    ) -> dict[CustomerDayKey, DayFigure]:
        """:meth:`figures` (sums and counts) of the customer-days ``keys`` alone: a day with many
        of them is read whole, the others customer by customer (in bounded queries)."""
        by_day: dict[date, set[str]] = {}
        for customer, day in keys:
            by_day.setdefault(day, set()).add(customer)
        out: dict[CustomerDayKey, DayFigure] = {}
        for day, customers in sorted(by_day.items()):
            if len(customers) >= WHOLE_DAY:
                out.update(self.figures(account, meter_id, day, day))
                continue
            for chunk in _chunks(sorted(customers)):
                out.update(self._figures(account, meter_id, day, day, chunk))
        return out

    def figures(
        self, account: str, meter_id: str, first: date, last: date, *, newest: bool = False
    ) -> dict[CustomerDayKey, DayFigure]:
        """What the ledger holds per (customer, day) from ``first`` to ``last``, folded.

        ``newest``: also find each day's newest event (what ``last`` and pre-aggregated meters
        bill), which reads the live rows themselves instead of per-day sums.
        """
        out = self._figures(account, meter_id, first, last)
        if newest:
            live = self._marks(len(LIVE))
            for customer, day, seq, value, stamp in self._query(
                f"SELECT customer_id, day, seq, value, stamp FROM {self.table} "
                f"WHERE account = ? AND meter_id = ? AND day >= ? AND day <= ? AND state IN ({live})",
                (account, meter_id, first.isoformat(), last.isoformat(), *LIVE),
            ):
                figure = out[(customer, date.fromisoformat(day))]
                if (stamp, seq) > (figure.newest_stamp, figure.newest_seq):
                    figure.newest, figure.newest_stamp, figure.newest_seq = int(value), int(stamp), int(seq)
                if seq > figure.last_sent_seq:
                    figure.newest_sent, figure.last_sent_seq = int(value), int(seq)
        return out

    def _figures(
        self, account: str, meter_id: str, first: date, last: date, customers: Sequence[str] = ()
    ) -> dict[CustomerDayKey, DayFigure]:
        """The live events folded per (customer, day) from ``first`` to ``last`` (of ``customers``
        alone, where given)."""
        live, open_ = self._marks(len(LIVE)), self._marks(len(OPEN))
        only = f" AND customer_id IN ({self._marks(len(customers))})" if customers else ""
        rows = self._query(
            f"SELECT customer_id, day, MAX(seq), "
            f"SUM(CASE WHEN state IN ({live}) THEN value ELSE 0 END), "
            f"SUM(CASE WHEN state IN ({live}) THEN 1 ELSE 0 END), "
            f"MAX(CASE WHEN state IN ({live}) THEN source_at ELSE -1 END), "
            f"SUM(CASE WHEN state IN ({open_}) THEN 1 ELSE 0 END) "
            f"FROM {self.table} WHERE account = ? AND meter_id = ? AND day >= ? AND day <= ?{only} "
            "GROUP BY customer_id, day",
            (*LIVE, *LIVE, *LIVE, *OPEN, account, meter_id, first.isoformat(), last.isoformat(), *customers),
        )
        out: dict[CustomerDayKey, DayFigure] = {}
        days: dict[str, date] = {}  # a few dozen days for millions of rows: parse each once
        for customer, day, max_seq, total, events, source_at, open_count in rows:
            figure = DayFigure(
                total=int(total or 0),
                events=int(events or 0),
                max_seq=int(max_seq),
                source_at=int(source_at if source_at is not None else -1),
                open=int(open_count or 0),
            )
            out[(customer, days.get(day) or days.setdefault(day, date.fromisoformat(day)))] = figure
        return out

    def open_entries(self, account: str, meter_id: str) -> list[Entry]:
        """Rows still to be settled (pending, unverified, cancelling), of any run."""
        return self._entries(
            f"account = ? AND meter_id = ? AND state IN ({self._marks(len(OPEN))})",
            (account, meter_id, *OPEN),
        )

    def entries_of(
        self, account: str, meter_id: str, customers: Iterable[str], first: date, last: date
    ) -> list[Entry]:
        """Every row of ``customers`` for the days ``first`` to ``last`` (source days)."""
        return self._entries_of_customers(
            "day >= ? AND day <= ?", (first.isoformat(), last.isoformat()), account, meter_id, customers
        )

    def entries_stamped(
        self, account: str, meter_id: str, customers: Iterable[str] | None, start: int, end: int
    ) -> list[Entry]:
        """Every row of ``customers`` (``None``: all) stamped in ``[start, end)``, whatever day it bills."""
        return self._entries_of_customers(
            "stamp >= ? AND stamp < ?", (start, end), account, meter_id, customers
        )

    def _entries_of_customers(
        self,
        where: str,
        params: tuple[Any, ...],
        account: str,
        meter_id: str,
        customers: Iterable[str] | None,
    ) -> list[Entry]:
        """The rows of a meter matching ``where``, for ``customers`` (``None``: all), in bounded queries."""
        base = f"account = ? AND meter_id = ? AND {where}"
        if customers is None:
            return self._entries(base, (account, meter_id, *params))
        out: list[Entry] = []
        for chunk in _chunks(sorted(set(customers))):
            out.extend(
                self._entries(
                    f"{base} AND customer_id IN ({self._marks(len(chunk))})",
                    (account, meter_id, *params, *chunk),
                )
            )
        return out

    def landed_late(self, account: str, meter_id: str, start: int, end: int) -> dict[CustomerDayKey, int]:
        """Per (customer, day it landed on), the live usage of older days stamped in ``[start, end)``.

        Usage older than Stripe's window is billed at the oldest instant Stripe accepts, so
        Stripe's figure for that day holds it beside the day's own usage.
        """
        out: dict[CustomerDayKey, int] = {}
        for customer, day, stamp, value in self._query(
            f"SELECT customer_id, day, stamp, value FROM {self.table} WHERE account = ? AND meter_id = ? "
            f"AND stamp >= ? AND stamp < ? AND state IN ({self._marks(len(LIVE))})",
            (account, meter_id, start, end, *LIVE),
        ):
            landed = day_of(int(stamp))
            if date.fromisoformat(day) < landed:
                out[(customer, landed)] = out.get((customer, landed), 0) + int(value)
        return out

    def _entries(self, where: str, params: Sequence[Any]) -> list[Entry]:
        rows = self._query(f"SELECT {', '.join(COLUMN_NAMES)} FROM {self.table} WHERE {where}", params)
        return [_entry(row) for row in rows]

    # -- writing ------------------------------------------------------------------------------

    def insert(self, entries: Sequence[Entry]) -> set[str]:
        """Write ``entries`` (each ``pending``) and return the identifiers this attempt now owns.

        An entry whose key another run wrote first is not written (the table's key refuses it):
        that run owns the customer-day's next event, and this one must plan the day again.
        """
        owned: set[str] = set()
        if self._copies:
            owned |= self._insert_by_copy(entries)
            self.conn.commit()
            return owned
        for chunk in _chunks(entries):
            values = [_values(entry) for entry in chunk]
            if self.dialect in NATIVE:
                row = f"({self._marks(len(COLUMN_NAMES))})"
                # RETURNING names the rows this statement wrote: the ones this attempt owns.
                owned |= {
                    identifier
                    for (identifier,) in self._query(
                        f"INSERT INTO {self.table} ({', '.join(COLUMN_NAMES)}) VALUES "
                        f"{', '.join([row] * len(values))} ON CONFLICT DO NOTHING RETURNING identifier",
                        [v for value in values for v in value],
                    )
                }
            else:
                self._insert_one_by_one(values)
                attempts = {e.identifier: e.attempt for e in chunk}
                for identifier, attempt in self._query(
                    f"SELECT identifier, attempt FROM {self.table} "
                    f"WHERE account = ? AND identifier IN ({self._marks(len(chunk))})",
                    (chunk[0].account, *attempts),
                ):
                    if attempts.get(identifier) == attempt:
                        owned.add(identifier)
            self.conn.commit()
        return owned

    @property
    def _copies(self) -> bool:
        """PostgreSQL through psycopg2 or psycopg 3 (the postgres provider hands out either): rows
        go in with ``COPY``, several times faster than ``INSERT``."""
        if self.dialect != "postgres":
            return False
        cursor = self.conn.cursor()
        try:
            return hasattr(cursor, "copy_expert") or hasattr(cursor, "copy")
        finally:
            cursor.close()

    def _copy(self, cursor: Any, temp: str, rows: Iterable[Sequence[Any]]) -> None:
        buffer = io.StringIO()
        for row in rows:
            buffer.write("\t".join(_copy_text(value) for value in row))
            buffer.write("\n")
        if hasattr(cursor, "copy_expert"):  # psycopg2
            buffer.seek(0)
            cursor.copy_expert(f"COPY {temp} FROM STDIN", buffer)
            return
        # psycopg 3: https://www.psycopg.org/psycopg3/docs/basic/copy.html
        with cursor.copy(f"COPY {temp} FROM STDIN") as copy:
            copy.write(buffer.getvalue())

    def _insert_by_copy(self, entries: Sequence[Entry]) -> set[str]:
        cursor = self.conn.cursor()
        cursor.execute(
            "CREATE TEMP TABLE IF NOT EXISTS stripe_meter_ledger_in "
            f"(LIKE {self.table}) ON COMMIT DELETE ROWS"
        )
        self._copy(cursor, "stripe_meter_ledger_in", (_values(e) for e in entries))
        cursor.execute(
            f"INSERT INTO {self.table} SELECT * FROM stripe_meter_ledger_in ON CONFLICT DO NOTHING "
            "RETURNING identifier"
        )
        owned = {identifier for (identifier,) in cursor.fetchall()}
        cursor.close()
        return owned

    def _insert_one_by_one(self, values: list[tuple[Any, ...]]) -> None:
        text = (
            f"INSERT INTO {self.table} ({', '.join(COLUMN_NAMES)}) VALUES ({self._marks(len(COLUMN_NAMES))})"
        )
        for value in values:
            try:
                self._execute(text, value)
                self.conn.commit()
            except Exception:  # the key is taken (each driver names its own IntegrityError)
                self.conn.rollback()

    def resolve(self, account: str, changes: Sequence[Change]) -> None:
        """Set (state, answered_at, note) of each identifier in ``changes``: (identifier, state, at, note).

        An empty note keeps the row's own (why it was written, such as usage carried).
        """
        if not changes:
            return
        if self.dialect not in NATIVE:
            cursor = self.conn.cursor()
            cursor.executemany(
                self._sql(
                    f"UPDATE {self.table} SET state = ?, answered_at = ?, "
                    "note = COALESCE(NULLIF(?, ''), note) WHERE account = ? AND identifier = ?"
                ),
                [(state, at, note, account, identifier) for identifier, state, at, note in changes],
            )
            self.conn.commit()
            return
        if self._copies:
            cursor = self.conn.cursor()
            cursor.execute(
                "CREATE TEMP TABLE IF NOT EXISTS stripe_meter_ledger_answers (identifier VARCHAR(100), "
                "state VARCHAR(16), answered_at DOUBLE PRECISION, note VARCHAR(255)) ON COMMIT DELETE ROWS"
            )
            self._copy(cursor, "stripe_meter_ledger_answers", changes)
            cursor.execute(
                f"UPDATE {self.table} SET state = a.state, answered_at = a.answered_at, "
                f"note = COALESCE(NULLIF(a.note, ''), {self.table}.note) "
                f"FROM stripe_meter_ledger_answers a WHERE {self.table}.account = %s "
                f"AND {self.table}.identifier = a.identifier",
                (account,),
            )
            cursor.close()
            self.conn.commit()
            return
        for chunk in _chunks(changes):
            rows = ", ".join(["(?, ?, ?, ?)"] * len(chunk))
            # The answers of a slice in one statement; answered_at stays per row (the order in
            # which Stripe took a customer's events is what settles a deactivation later).
            self._execute(
                f"WITH v(identifier, state, answered_at, note) AS (VALUES {rows}) "
                f"UPDATE {self.table} SET state = v.state, answered_at = v.answered_at, "
                f"note = COALESCE(NULLIF(v.note, ''), {self.table}.note) "
                f"FROM v WHERE {self.table}.account = ? AND {self.table}.identifier = v.identifier",
                [
                    *(x for identifier, state, at, note in chunk for x in (identifier, state, at, note)),
                    account,
                ],
            )
        self.conn.commit()


def _values(entry: Entry) -> tuple[Any, ...]:
    return (
        entry.account,
        entry.meter_id,
        entry.event_name,
        entry.customer_id,
        entry.day.isoformat(),
        entry.seq,
        entry.identifier,
        entry.value,
        entry.stamp,
        entry.source_at,
        entry.state,
        entry.run_id,
        entry.attempt,
        entry.sent_at,
        entry.answered_at,
        entry.note,
        entry.part,
        entry.period_end,
    )


def _copy_text(value: Any) -> str:
    """One value in ``COPY``'s text format (tab-separated; ``\\N`` is NULL)."""
    if value is None:
        return "\\N"
    text = str(value)
    if any(c in text for c in "\\\t\n\r"):
        text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text


def _entry(row: Sequence[Any]) -> Entry:
    data = dict(zip(COLUMN_NAMES, row, strict=True))
    return Entry(
        account=data["account"],
        meter_id=data["meter_id"],
        event_name=data["event_name"],
        customer_id=data["customer_id"],
        day=date.fromisoformat(data["day"]),
        seq=int(data["seq"]),
        identifier=data["identifier"],
        value=int(data["value"]),
        stamp=int(data["stamp"]),
        source_at=int(data["source_at"]),
        state=data["state"],
        run_id=data["run_id"],
        attempt=data["attempt"],
        sent_at=float(data["sent_at"]),
        answered_at=float(data["answered_at"]) if data["answered_at"] is not None else None,
        note=data["note"] or "",
        part=int(data["part"] or 0),
        period_end=int(data["period_end"]) if data["period_end"] is not None else None,
    )
