"""The billing ledger: every meter event the batch operator sends, in a table the team owns.

An outbox, as payment systems keep one: a row is written (``pending``) before its event leaves,
and resolved by Stripe's answer (``accepted``), so a run knows what Stripe holds of its own
events without reading Stripe's summaries, for as long as the table is kept rather than for
Stripe's 24-hour identifier window. Stripe's summaries become the audit.

* :mod:`.entries`: one row, its states, and what a customer-day's rows add up to by the
  meter's formula.
* :mod:`.schema`: the table, for SQLite and PostgreSQL (and the DDL the docs give for others).
* :mod:`.store`: reading and writing it through any DB-API connection.

Plain Python: no Airflow, no ``stripe``.
"""
