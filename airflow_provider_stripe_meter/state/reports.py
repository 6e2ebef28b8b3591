"""Full per-customer tables, written where the user names, so XCom keeps only counts and samples.

XCom values and trigger arguments are rows in Airflow's metadata database; a table with a line
per customer-day grows with the number of customers and does not belong there. A task given a
``report_path`` writes its table through Airflow's object storage (``file://``, ``s3://``,
``gs://``, ... with the connection in the URL, ``s3://aws_default@bucket/key``), one JSON object
per line (JSON Lines), which any query engine reads; its result names the file.

.. seealso:: https://airflow.apache.org/docs/apache-airflow/stable/core-concepts/objectstorage.html
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def _path(url: str) -> Any:
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    return ObjectStoragePath(url)


def write_lines(url: str, lines: Iterable[dict[str, Any]]) -> str:
    """Write ``lines`` to ``url`` as JSON Lines (replacing what was there); the URL written.

    The file is written whole or not at all from a reader's side: to a temporary name first,
    then renamed where the store can (a local file), so a task killed mid-write leaves no half
    table under the name a result points to.
    """
    path = _path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    local = getattr(path, "protocol", None) in ("", "file", "local")
    target = path.parent / f".{path.name}.partial" if local else path
    with target.open("w") as out:
        for line in lines:
            out.write(json.dumps(line, separators=(",", ":")))
            out.write("\n")
    if target is not path:
        target.rename(path)
    return url


def write_report(url: str | None, lines: Iterable[Any]) -> str | None:
    """Write a table of objects with ``to_dict()`` to ``url`` when one is named; the URL, or ``None``."""
    if not url:
        return None
    return write_lines(url, (line.to_dict() for line in lines))


def read_lines(url: str) -> Iterator[dict[str, Any]]:
    """The objects of a JSON Lines file written by :func:`write_lines`, one at a time."""
    with _path(url).open("r") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def write_json(url: str, value: Any) -> str:
    """Write one JSON document to ``url``; the URL written."""
    return write_lines(url, [value])


def read_json(url: str) -> Any:
    """The JSON document :func:`write_json` wrote."""
    return next(read_lines(url))
