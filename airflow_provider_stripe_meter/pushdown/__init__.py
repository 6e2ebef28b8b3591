"""Usage aggregated inside the team's database: SQL generated per dialect, only figures returned.

:mod:`.dialects` says each rule in a database's SQL (:mod:`.warehouses` for those the tests
cannot run; :mod:`.registry` finds one by connection type), :mod:`.queries` builds the statements,
:mod:`.source` runs them and feeds the worker's aggregator. Importing this package imports no
SQL library (DAG files import the operators, which name :class:`Unsupported`).
"""


class Unsupported(Exception):
    """The query's columns, options or database are not ones SQL is generated for: the rows
    stream to the worker instead (or, with ``aggregate_in="database"``, the task fails)."""
