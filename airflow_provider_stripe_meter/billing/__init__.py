"""The billing core, in plain Python (no Airflow, no ``stripe``).

One run reads top to bottom in :mod:`.run`: read the meters, settle what an earlier run left
open (:mod:`.settling`), plan every customer-day from the source and the ledger (:mod:`.plans`,
in billing periods through :mod:`.periods`, within the run's :mod:`.coverage`), deliver
(:mod:`.sending`), check, and return a typed :class:`~.result.BatchResult`. What can happen to
a customer-day is one vocabulary, :class:`~.outcomes.DayOutcome`, shared with the reconcile
report and the metrics. Stripe and Airflow come in only through the interfaces of :mod:`.ports`;
the phases share one :class:`~.context.RunContext`, never the run itself.
"""
