"""Template macros for billing DAGs: whole UTC days, whether or not the run has a logical date.

Airflow 3's manual trigger (the UI's Trigger button, ``airflow dags trigger``, the REST API with
``logical_date: null``) creates a run **without** a logical date, so ``data_interval_start``,
``data_interval_end`` and ``ds`` are undefined in its templates; ``dag_run.run_after`` is always
set. A billing window built on ``data_interval_end`` then fails the run, and one built on a
logical date that is not midnight cuts its first day in two (while Stripe's figures are whole UTC
days). :func:`billing_window` always gives whole UTC days::

    with DAG(..., user_defined_macros=BILLING_MACROS):
        SQLExecuteQueryOperator(
            sql="SELECT ... WHERE used_at >= '{{ billing_window().start }}' "
            "AND used_at < '{{ billing_window().end }}'",
        )

A scheduled run of a daily data-interval timetable bills the day its interval covers; any other
run (manual, or with a logical date inside a day) bills the last ``days`` whole UTC days before
the moment it stands for.

.. seealso:: https://airflow.apache.org/docs/apache-airflow/stable/templates-ref.html
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

from jinja2 import pass_context


class BillingWindow(NamedTuple):
    """Whole UTC days ``[start, end)``, as ``YYYY-MM-DD HH:MM:SS+00:00`` strings SQL engines read."""

    start: str
    end: str
    #: The moment the run stands for (its data interval's end, or when it was triggered).
    as_of: str
    days: int

    @property
    def first_day(self) -> str:
        """The first UTC day, ``YYYY-MM-DD``."""
        return self.start[:10]


def whole_days(as_of: datetime, days: int = 1) -> BillingWindow:
    """The ``days`` whole UTC days that end at the last UTC midnight at or before ``as_of``.

    :raises ValueError: ``as_of`` has no time zone, or ``days`` is not at least 1.
    """
    if as_of.tzinfo is None:
        raise ValueError(f"as_of must be timezone-aware, got {as_of!r}")
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days!r}")
    moment = as_of.astimezone(timezone.utc)
    end = datetime(moment.year, moment.month, moment.day, tzinfo=timezone.utc)
    start = end - timedelta(days=days)
    return BillingWindow(_sql(start), _sql(end), _sql(moment), days)


def _sql(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S+00:00")


def as_of(context: Any) -> datetime:
    """The moment a run stands for: ``data_interval_end`` when the run has one, else ``run_after``."""
    end = context.get("data_interval_end")
    if end is not None:
        return end
    return context["dag_run"].run_after


@pass_context
def billing_window(context: Any, days: int = 1) -> BillingWindow:
    """Template macro: the run's billing window, ``days`` whole UTC days (see the module docstring)."""
    return whole_days(as_of(context), int(days))


#: Pass as ``DAG(user_defined_macros=BILLING_MACROS)``.
BILLING_MACROS: dict[str, Any] = {"billing_window": billing_window}
