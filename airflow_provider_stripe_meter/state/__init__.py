"""What runs of this provider remember between them, kept in Airflow's metadata database.

The only Airflow-facing state of the package: Airflow Variables, read and written through
:mod:`.variables` so that runs writing the same record at once do not lose each other's writes.

* :mod:`.day_journal`: which days were sent to, when last, and in how many runs;
* :mod:`.late_billing`: usage older than Stripe's window that was billed late, and where it landed.

.. seealso:: https://airflow.apache.org/docs/apache-airflow/stable/core-concepts/variables.html
"""
