"""The billing core, in plain Python (no Airflow, no ``stripe``).

One run reads top to bottom in :mod:`.run`: read the meters, plan every customer-day
(:mod:`.plans`, looking Stripe up where needed through :mod:`.lookup`), deliver (:mod:`.sending`,
with usage older than Stripe's window in :mod:`.late`), confirm (:mod:`.confirming`), and
return a typed :class:`~.result.BatchResult`. What can happen to a customer-day is one
vocabulary, :class:`~.outcomes.DayOutcome`, shared with the reconcile report and the metrics.
Stripe and Airflow come in only through the interfaces of :mod:`.ports`.
"""
