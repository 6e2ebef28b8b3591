"""The billing core, in plain Python (no Airflow, no ``stripe``).

One run reads top to bottom in :mod:`.run`: read the meters, settle what an earlier run left open
(:mod:`.settling`), plan every customer-day from the source and the ledger (:mod:`.plans`, in
billing periods through :mod:`.periods`, within the run's :mod:`.coverage`), deliver
(:mod:`.delivering`, through :mod:`.sending`), check, and return a :class:`~.result.BatchResult`.
Outcomes are one vocabulary (:class:`~.outcomes.DayOutcome`); Stripe and Airflow come in only
through :mod:`.ports`, and the phases share one :class:`~.context.RunContext`, never the run.
"""
