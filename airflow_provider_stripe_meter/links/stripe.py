"""A link from each task of this provider to the meter it fed, in Stripe's dashboard.

The dashboard keeps test and live data apart under ``/test/``, and opens a connected account's
data under the account id (the same account-scoped form Stripe's own ``request_log_url`` in API
errors uses), so the link follows the task's API key and ``stripe_account``:

* test key, platform: ``https://dashboard.stripe.com/test/meters/mtr_...``
* live key, platform: ``https://dashboard.stripe.com/meters/mtr_...``
* test key, connected account: ``https://dashboard.stripe.com/acct_.../test/meters/mtr_...``

Where the task never learnt the meter's id (``preflight=False``, or a batch billing several
meters), the link opens the meters list instead.

.. seealso:: https://docs.stripe.com/billing/subscriptions/usage-based/meters/configure
.. seealso:: https://airflow.apache.org/docs/apache-airflow/stable/howto/define-extra-link.html
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

DASHBOARD = "https://dashboard.stripe.com"


def dashboard_url(*, livemode: bool, account: str | None = None, meter_id: str | None = None) -> str:
    """The dashboard page of ``meter_id`` (or of all meters), in test or live data, for ``account``."""
    parts = [DASHBOARD]
    if account:
        parts.append(account)
    if not livemode:
        parts.append("test")
    parts.append("meters")
    if meter_id:
        parts.append(meter_id)
    return "/".join(parts)


class StripeMeterLink(BaseOperatorLink):
    """The "Stripe meter" button on a task: the meter it fed (or checked) in Stripe's dashboard.

    Airflow 3 asks for the link on the worker when the task ends, and stores it for the UI; the
    task itself knows the key's mode, the account and the meter's id by then (see
    :meth:`~airflow_provider_stripe_meter.operators.base.StripeBaseOperator.meter_dashboard_url`).
    """

    name = "Stripe meter"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """The dashboard URL the task recorded, or ``""`` where it never reached Stripe."""
        url: Any = getattr(operator, "meter_dashboard_url", None)
        return (url() if callable(url) else None) or ""
