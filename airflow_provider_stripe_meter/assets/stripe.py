"""The ``stripe`` asset URI scheme: a Stripe meter as an Airflow Asset.

``stripe://<account>/meters/<event name>``, where ``<account>`` is the connected account
(``acct_...``) billed for, or ``platform`` for the account of the API key itself. The operators
that bill a meter update its Asset when they finish, with the run's figures as the event's
``extra``, so a DAG scheduled on the Asset ("finalize invoices", "refresh the revenue
dashboard") runs once billing is done.

.. seealso:: https://airflow.apache.org/docs/apache-airflow/stable/authoring-and-scheduling/asset-scheduling.html
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from urllib.parse import SplitResult

    from airflow.sdk import Asset

PLATFORM = "platform"


def meter_uri(event_name: str, account: str | None = None) -> str:
    """The URI of the meter that ``event_name`` feeds, for ``account`` (``None``: the platform)."""
    return f"stripe://{account or PLATFORM}/meters/{quote(event_name, safe='')}"


def create_asset(
    *, event_name: str, account: str | None = None, extra: dict[str, Any] | None = None
) -> Asset:
    """The Asset of the meter ``event_name`` feeds (the factory registered for the scheme)."""
    from airflow.sdk import Asset

    return Asset(uri=meter_uri(event_name, account), extra=extra or {})


def sanitize_uri(uri: SplitResult) -> SplitResult:
    """Check and normalise a ``stripe://`` URI: an account (or ``platform``) and ``/meters/<name>``."""
    account = uri.netloc
    if not account:
        raise ValueError(
            "URI format stripe:// must name an account: stripe://platform/... or stripe://acct_.../..."
        )
    if account != PLATFORM and not account.startswith("acct_"):
        raise ValueError(
            f"URI format stripe:// needs 'platform' or a connected account acct_..., got {account!r}"
        )
    parts = uri.path.split("/")
    if len(parts) != 3 or parts[1] != "meters" or not parts[2]:
        raise ValueError("URI format stripe:// must be stripe://<account>/meters/<event name>")
    return uri._replace(scheme="stripe", path=uri.path.rstrip("/"), query="", fragment="")


def convert_asset_to_openlineage(asset: Asset, lineage_context: Any) -> Any:
    """The meter's Asset as an OpenLineage dataset: namespace ``stripe://<account>``, name ``meters/<event>``.

    Registered for the scheme, so the OpenLineage provider names the Asset as the operators'
    lineage names the meter.
    """
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(asset.uri)
    account = None if parts.netloc == PLATFORM else parts.netloc
    return meter_dataset(unquote(parts.path.split("/")[-1]), account)


def meter_dataset(event_name: str, account: str | None) -> Any:
    """The OpenLineage dataset of the meter ``event_name`` feeds, for ``account`` (``None``: platform)."""
    from airflow.providers.common.compat.openlineage.facet import Dataset

    return Dataset(namespace=f"stripe://{account or PLATFORM}", name=f"meters/{event_name}")
