"""What every Stripe operator and the reconcile sensor share: connection, hook, preflight, sources."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator

from airflow_provider_stripe_meter.links.stripe import StripeMeterLink, dashboard_url
from airflow_provider_stripe_meter.sources import AGGREGATE_IN, DEFAULT_COLUMNS, check_source
from airflow_provider_stripe_meter.utils.aggregation import DEFAULT_SAFETY_MARGIN, DEFAULT_SAMPLE_LIMIT

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage
    from airflow.sdk import Context

    from airflow_provider_stripe_meter.hooks.stripe import StripeHook
    from airflow_provider_stripe_meter.pushdown.ledger_diff import LedgerSide
    from airflow_provider_stripe_meter.utils.aggregation import UsageAggregator

#: Stripe's brand colour, for every task of this provider in the Airflow UI.
STRIPE_UI_COLOR = "#635bff"


class StripeBaseOperator(BaseOperator):
    """
    Base of this provider's operators (and, through it, the reconcile sensor).

    Holds the connection and the Connect account, builds the :class:`StripeHook` once per task
    (after templates are rendered), returns its result as the return value with the keys of
    :attr:`own_xcoms` also pushed as XComs of their own (every key, as ``multiple_outputs``, where
    it is ``None``), and runs the meter preflight. A new operator subclasses it, adds its own
    parameters and writes ``execute``; nothing else.

    :param stripe_conn_id: Airflow connection of type ``stripe``.
    :param stripe_account: Connected account (``acct_...``) to act for, overriding the
        connection's. (templated)
    :param preflight: Check each event name against Stripe's active meters (one meters list per
        task) before anything is sent, failing with the meters that do exist if it has none;
        also takes the meter's payload keys.
    """

    template_fields: Sequence[str] = ("stripe_account",)
    #: Whether the operator's meter events update its meters' Assets (not the sensor's checks).
    bills_meters: ClassVar[bool] = False
    #: The keys of the result also pushed as XComs of their own, for ``task.output["success"]``
    #: (``None``: every key). The whole result is always the return value; each XCom is a row of
    #: Airflow's metadata database, and a task API call, so a wide result pushes only its headline.
    own_xcoms: ClassVar[tuple[str, ...] | None] = None
    ui_color = STRIPE_UI_COLOR
    operator_extra_links = (StripeMeterLink(),)

    def __init__(
        self,
        *,
        stripe_conn_id: str = "stripe_default",
        stripe_account: str | None = None,
        preflight: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("multiple_outputs", self.own_xcoms is None)
        super().__init__(**kwargs)
        self.stripe_conn_id = stripe_conn_id
        self.stripe_account = stripe_account
        self.preflight = preflight

    @classmethod
    def partial(cls, **kwargs: Any) -> Any:
        """Airflow's ``partial()``, with the meters' Asset alias as the outlet (see :func:`meter_outlets`).

        A mapped task's ``__init__`` runs only when each instance runs, too late to declare an
        outlet; the alias is declared here, and each instance adds its own meter's Asset to it.
        """
        if cls.bills_meters and not kwargs.get("dry_run"):
            meter_outlets(kwargs, kwargs.get("event_name"), kwargs.get("stripe_account"), mapped=True)
        return super().partial(**kwargs)

    def push_own_xcoms(self, context: Context, result: dict[str, Any]) -> None:
        """Push the keys of :attr:`own_xcoms` as XComs of their own (Airflow pushes the return
        value, and with ``multiple_outputs`` every key, itself; with ``do_xcom_push=False``
        nothing is pushed)."""
        if self.multiple_outputs or self.own_xcoms is None or not self.do_xcom_push:
            return
        for key in self.own_xcoms:
            if key in result:
                context["ti"].xcom_push(key=key, value=result[key])

    @cached_property
    def hook(self) -> StripeHook:
        """The Stripe hook for this task, built on first use (templates are rendered by then)."""
        from airflow_provider_stripe_meter.hooks.stripe import StripeHook

        return StripeHook(self.stripe_conn_id, stripe_account=self.stripe_account or None)

    def billed_account(self) -> str | None:
        """The connected account this task acts for (its own, else its connection's); ``None``: the platform.

        Reads the connection, never Stripe. Used to tag metrics and lineage per account, so each
        instance of a task mapped over accounts names its own.
        """
        given = self.stripe_account
        if isinstance(given, str) and "{{" in given:
            return None  # an unrendered template names no account yet
        try:
            return self.hook.stripe_account
        except Exception:  # no readable connection: the task's own setting is all there is
            return given or None

    def meter_dashboard_url(self) -> str | None:
        """This task's meter in Stripe's dashboard (test or live, Connect aware), once it reached Stripe.

        Read when the task ends, for the "Stripe meter" extra link; ``None`` if the task never
        built its hook (it failed before talking to Stripe). Does no I/O beyond the connection.
        """
        hook = self.__dict__.get("hook")
        if hook is None:
            return None
        try:
            livemode, account = hook.livemode, hook.stripe_account
        except Exception:  # an unreadable connection has already failed the task; no link then
            return None
        event_name = getattr(self, "event_name", None)
        meter_id = self.__dict__.get("linked_meter_id") or (
            hook.known_meter_id(event_name) if isinstance(event_name, str) else None
        )
        return dashboard_url(livemode=livemode, account=account, meter_id=meter_id)

    def payload_keys(
        self, event_name: str, customer_key: str | None = None, value_key: str | None = None
    ) -> tuple[str, str]:
        """The payload keys for ``event_name``, checking its meter first when ``preflight`` is on.

        :raises StripeMeterNotFoundError: no active meter has ``event_name``.
        """
        return self.hook.payload_keys(
            event_name, preflight=self.preflight, customer_key=customer_key, value_key=value_key
        )


#: The outlet of a task whose meter is known only when it runs (a templated, per-row or mapped
#: event name or account). The task adds the Asset of each meter it billed to the alias, so
#: Airflow records an event for that meter's ``stripe://`` Asset, and a DAG scheduled on the
#: Asset (or on the alias) runs once billing is done.
#: .. seealso:: https://airflow.apache.org/docs/apache-airflow/stable/authoring-and-scheduling/assets.html
METERS_ALIAS = "stripe_meters"


def _known_when_parsed(value: Any) -> bool:
    return isinstance(value, str) and "{{" not in value


def meter_outlets(kwargs: dict[str, Any], event_name: Any, account: Any, *, mapped: bool = False) -> None:
    """Give the task the outlet its meter events need, unless it names its own ``outlets``.

    The meter's Asset when the event name and the account are both known when the DAG is parsed
    (an Asset must be, for the DAGs scheduled on it); otherwise, and for every mapped task (one
    task, one meter per mapped instance), the :data:`METERS_ALIAS` alias, filled when it runs.
    """
    if "outlets" in kwargs:
        return
    from airflow.sdk import AssetAlias

    from airflow_provider_stripe_meter.assets.stripe import create_asset

    fixed = _known_when_parsed(event_name) and (account is None or _known_when_parsed(account))
    kwargs["outlets"] = [
        create_asset(event_name=event_name, account=account)
        if fixed and not mapped
        else AssetAlias(name=METERS_ALIAS)
    ]


def update_meter_assets(
    operator: StripeBaseOperator, context: Any, extra: dict[str, Any], event_names: Iterable[str]
) -> None:
    """Record the run's figures (``extra``) on the Asset of each meter this task billed.

    A ``stripe://`` Asset outlet gets them as its event's ``extra``; the :data:`METERS_ALIAS`
    alias gets one event per meter billed, on that meter's Asset for this task's account.
    """
    from airflow.sdk import AssetAlias

    from airflow_provider_stripe_meter.assets.stripe import create_asset

    for outlet in getattr(operator, "outlets", None) or []:
        if isinstance(outlet, AssetAlias) and outlet.name == METERS_ALIAS:
            account = operator.hook.stripe_account
            for name in sorted(set(event_names)):
                context["outlet_events"][outlet].add(
                    create_asset(event_name=name, account=account), extra=extra
                )
        elif str(getattr(outlet, "uri", "")).startswith("stripe://"):
            context["outlet_events"][outlet].extra = extra


class StripeUsageSourceOperator(StripeBaseOperator):
    """
    Where usage rows come from, for the batch operator and the reconcile sensor alike.

    A ``BaseOperator`` subclass, not a plain mixin: Airflow's dynamic task mapping checks
    ``partial()`` and ``expand()`` arguments against the ``__init__`` of the operator's
    ``BaseOperator`` classes only, so every source argument here can be mapped.

    Rows come from an upstream task (``rows=usage.output``) or from a query run here (``sql`` on
    ``sql_conn_id``, any common-sql hook, streamed in chunks). Each row is ``(customer_id,
    value, timestamp)``, with ``event_name`` fourth where no fixed event name is given, or a
    mapping with the names ``columns`` gives.

    :param rows: Rows from an upstream task, e.g. ``SQLExecuteQueryOperator(...).output``. (templated)
    :param sql: A query (or ``.sql`` file) returning the rows, run on ``sql_conn_id``. (templated)
    :param sql_conn_id: Connection of any common-sql ``DbApiHook`` (Postgres, SQLite, ...).
    :param parameters: Query parameters for ``sql``. (templated)
    :param columns: Names of the row fields: customer id, value, timestamp, event name.
    :param naive_timezone: Zone of timestamps without one (default UTC); ``None`` rejects them.
    :param safety_margin: How much younger than Stripe's 35 days a row must be to count.
    :param chunk_size: Rows fetched and aggregated at a time.
    :param sample_limit: Examples kept per kind of problem in the result.
    :param aggregate_in: Where ``sql``'s rows are aggregated: ``"auto"`` (in the database where
        SQL is generated for it and rows would cross a network: PostgreSQL, DuckDB; else on the
        worker, SQLite included), ``"database"`` (SQLite too)
        (fail, before anything is sent, if it cannot be) or ``"worker"`` (row by row). The same
        figures either way; the result's ``aggregated_in`` says which ran (docs/batch.md).
    """

    source_template_fields: ClassVar[tuple[str, ...]] = ("rows", "sql", "parameters")
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers: ClassVar[dict[str, str]] = {"sql": "sql", "parameters": "json"}

    def __init__(
        self,
        *,
        rows: Any = None,
        sql: str | None = None,
        sql_conn_id: str | None = None,
        parameters: Any = None,
        columns: Sequence[str] = DEFAULT_COLUMNS,
        naive_timezone: Any = timezone.utc,
        safety_margin: timedelta = DEFAULT_SAFETY_MARGIN,
        chunk_size: int = 10_000,
        sample_limit: int = DEFAULT_SAMPLE_LIMIT,
        aggregate_in: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_source(rows, sql, sql_conn_id)
        if aggregate_in not in AGGREGATE_IN:
            raise ValueError(f"aggregate_in must be one of {AGGREGATE_IN}, got {aggregate_in!r}")
        if aggregate_in == "database" and sql is None:
            raise ValueError(
                'aggregate_in="database" needs sql= (rows from an upstream task are already on the worker)'
            )
        self.aggregate_in = aggregate_in
        self.rows = rows
        #: The task whose output the rows are (``rows=usage.output``), for lineage.
        self.rows_task_id: str | None = getattr(getattr(rows, "operator", None), "task_id", None)
        self.sql = sql
        self.sql_conn_id = sql_conn_id
        self.parameters = parameters
        self.columns = tuple(columns)
        self.naive_timezone = naive_timezone
        self.safety_margin = safety_margin
        self.chunk_size = chunk_size
        self.sample_limit = sample_limit

    def get_openlineage_facets_on_start(self) -> OperatorLineage | None:
        """OpenLineage: the usage tables as inputs, the meter as output (see :mod:`..lineage`)."""
        from airflow_provider_stripe_meter.lineage import usage_lineage

        return usage_lineage(self)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage | None:
        """OpenLineage facets when the task ends: the same as at its start."""
        return self.get_openlineage_facets_on_start()

    def read_usage(
        self,
        event_name: str | None,
        *,
        keep_too_old: bool = False,
        split: Mapping[tuple[str, str], Sequence[int]] | None = None,
        needs_last: Callable[[set[str]], set[str]] | None = None,
        ledger: Callable[[], LedgerSide | None] | None = None,
    ) -> UsageAggregator:
        """Read the source and aggregate it per (event name, customer, UTC day), once.

        ``keep_too_old`` aggregates rows older than Stripe's window apart instead of skipping them;
        ``split`` gives per (event name, customer) the instants where a day is aggregated in parts;
        ``needs_last`` says which event names' meters bill the ``last`` value (``None``: all);
        ``ledger``, the ledger where it is in the query's database (subtracted there).
        :raises StripeParameterError: ``aggregate_in="database"`` and the database cannot.
        """
        from airflow_provider_stripe_meter.exceptions import StripeParameterError
        from airflow_provider_stripe_meter.pushdown import Unsupported
        from airflow_provider_stripe_meter.sources import aggregate_usage

        try:
            return self._aggregate(event_name, keep_too_old, split, needs_last, aggregate_usage, ledger)
        except Unsupported as err:
            raise StripeParameterError(
                f'aggregate_in="database", but the query cannot be aggregated in its database: {err}',
                {"type": "validation_error", "field": "aggregate_in", "value": "database", "rule": str(err)},
            ) from err

    def _aggregate(
        self,
        event_name: str | None,
        keep_too_old: bool,
        split: Mapping[tuple[str, str], Sequence[int]] | None,
        needs_last: Callable[[set[str]], set[str]] | None,
        aggregate_usage: Callable[..., UsageAggregator],
        ledger: Callable[[], LedgerSide | None] | None = None,
    ) -> UsageAggregator:
        return aggregate_usage(
            rows=self.rows,
            sql=self.sql,
            sql_conn_id=self.sql_conn_id,
            parameters=self.parameters,
            chunk_size=self.chunk_size,
            event_name=event_name,
            columns=self.columns,
            naive_timezone=self.naive_timezone,
            safety_margin=self.safety_margin,
            sample_limit=self.sample_limit,
            log=self.log,
            keep_too_old=keep_too_old,
            split=split,
            aggregate_in=self.aggregate_in,
            needs_last=needs_last,
            ledger=ledger,
        )
