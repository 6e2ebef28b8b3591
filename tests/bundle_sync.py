"""``dag.test()`` writes a bundle's DAGs to the metadata DB once while its files are unchanged.

Airflow 3.2+ re-syncs the bundle of the DAG it runs on every ``dag.test()`` call, so that sibling
DAGs (the targets of a trigger) are in the DB even when they were added since the first call
(apache/airflow#64884). Here the DAG files are copied into their bundles once, before any test
runs, and the ``airflow_db`` fixture syncs every bundle then; a re-sync of an unchanged bundle
writes nothing new (Airflow compares each DAG's hash) yet costs about a third of the CPU of a
one-task run (a DB round of every DAG of the bundle), hundreds of times a suite. So a bundle is
synced again only when what was parsed differs from what this process last synced (its files'
change times, its DAGs, its import errors); the run itself is untouched. Nor is a bundle whose
files are unchanged parsed again for that check: the earlier parse is reused.
"""

from __future__ import annotations

import os
from typing import Any

#: Per bundle name: the fingerprint of the bag this process last synced.
_SYNCED: dict[str, Any] = {}
#: Per bundle folder: its files' stamps when last parsed, and that parse's state.
_PARSED: dict[str, tuple[Any, dict[str, Any]]] = {}


def _stamps(folder: str) -> frozenset[tuple[str, int, int]]:
    """Every file of ``folder`` (bytecode caches aside): path, change time and size."""
    stamps = set()
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            stat = os.stat(os.path.join(parent, name))
            stamps.add((os.path.join(parent, name), stat.st_mtime_ns, stat.st_size))
    return frozenset(stamps)


def _fingerprint(bag: Any, bundle_version: str | None) -> Any:
    return (
        bundle_version,
        frozenset(bag.file_last_changed.items()),
        frozenset(bag.dags),
        frozenset(bag.import_errors.items()),
    )


def sync_unchanged_bundles_once() -> None:
    """Wrap ``airflow.dag_processing.dagbag.sync_bag_to_db`` (imported by ``dag.test()`` at each
    call) in this process; an Airflow without it (3.1) is left as it is."""
    try:
        from airflow.dag_processing import dagbag
    except ImportError:
        return
    original = getattr(dagbag, "sync_bag_to_db", None)
    if original is None or getattr(original, "syncs_unchanged_bundles_once", False):
        return

    def sync_bag_to_db(
        bag: Any, bundle_name: str, bundle_version: str | None, *args: Any, **kwargs: Any
    ) -> None:
        fingerprint = _fingerprint(bag, bundle_version)
        if _SYNCED.get(bundle_name) == fingerprint:
            return
        original(bag, bundle_name, bundle_version, *args, **kwargs)
        _SYNCED[bundle_name] = fingerprint

    sync_bag_to_db.syncs_unchanged_bundles_once = True  # type: ignore[attr-defined]
    setattr(dagbag, "sync_bag_to_db", sync_bag_to_db)  # noqa: B010 - its signature, loosened

    class BundleDagBag(dagbag.BundleDagBag):
        """A bundle's bag, parsed again only when a file of its folder changed. Its DAGs are only
        written to the DB (``dag.test()`` runs the DAG it was called on), never run."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            folder = str(kwargs.get("dag_folder", ""))
            stamps = _stamps(folder) if folder and os.path.isdir(folder) else None
            earlier = _PARSED.get(folder)
            if stamps is not None and earlier is not None and earlier[0] == stamps:
                self.__dict__.update(earlier[1])
                return
            super().__init__(*args, **kwargs)
            if stamps is not None:
                _PARSED[folder] = (stamps, dict(self.__dict__))

    dagbag.BundleDagBag = BundleDagBag  # type: ignore[misc]
