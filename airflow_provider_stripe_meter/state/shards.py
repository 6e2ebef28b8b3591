"""A record of many entries kept across Variables of bounded size.

An Airflow Variable is one row of the metadata database, read and written whole: a record that
holds an entry per customer would grow with the number of customers, and every change would
rewrite all of it. A :class:`ShardedRecord` instead keeps its entries (keyed by a Stripe
identifier) in *shards*, Variables of at most :data:`SHARD_SIZE` entries each, under an index
Variable that says only how many shards there are.

Concurrent writers lose nothing: every shard write is a merge (:mod:`.variables`) that adds or
removes entries by identifier, and the index only ever grows (a merge taking the larger count),
so a shard another writer is filling is never forgotten. A writer reserves the shards it needs in
the index before it writes them; one killed in between leaves empty shards, which read as empty.
Shards emptied by removals are filled again before new ones are opened, so the number of shards
follows the most entries ever held at once, not how many were ever written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_provider_stripe_meter.state.variables import Records

#: Entries per shard. A billed-late entry takes about 80 bytes as JSON and a pending one about
#: 280, so a shard stays under 200 KB even Fernet-encrypted: far inside the column a Variable's
#: value is stored in (MEDIUMTEXT, 16 MB, on MySQL) and quick to read and rewrite whole.
SHARD_SIZE = 500


class ShardedRecord:
    """Entries ``{identifier: value}`` kept in Variables of at most :data:`SHARD_SIZE` entries.

    :param records: The records (and so the backend) the Variables belong to.
    :param key: The index Variable; shard ``i`` is ``<key>.<i>``.
    :param description: The description Airflow shows for each of its Variables.
    """

    def __init__(self, records: Records, key: str, description: str) -> None:
        self.records = records
        self.key = key
        self.description = description

    def shard_key(self, index: int) -> str:
        """The Variable of shard ``index``."""
        return f"{self.key}.{index}"

    def count(self) -> int:
        """How many shards the index names (some may be empty)."""
        return _count(self.records.get(self.key))

    def read(self) -> dict[str, Any]:
        """Every entry, by identifier."""
        entries: dict[str, Any] = {}
        for shard in self._shards():
            entries.update(shard)
        return entries

    def add(self, entries: Mapping[str, Any]) -> None:
        """Add ``entries`` (those already held are left as they are)."""
        shards = self._shards()
        held = {identifier for shard in shards for identifier in shard}
        new = [(k, v) for k, v in sorted(entries.items()) if k not in held]
        if not new:
            return
        # Fill the room left in existing shards first, then open as many new ones as needed.
        chunks: list[tuple[int, dict[str, Any]]] = []
        for index, shard in enumerate(shards):
            room = SHARD_SIZE - len(shard)
            if room > 0 and new:
                chunks.append((index, dict(new[:room])))
                new = new[room:]
        index = len(shards)
        while new:
            chunks.append((index, dict(new[:SHARD_SIZE])))
            new = new[SHARD_SIZE:]
            index += 1
        if index > len(shards):
            self.records.merge(
                self.key, lambda record: {"shards": max(_count(record), index)}, self.description
            )
        for index, chunk in chunks:
            self.records.merge(self.shard_key(index), _adding(chunk), self.description)

    def remove(self, identifiers: Iterable[str]) -> None:
        """Remove the entries of ``identifiers`` (those not held are ignored)."""
        gone = set(identifiers)
        if not gone:
            return
        for index, shard in enumerate(self._shards()):
            if gone & shard.keys():
                self.records.merge(self.shard_key(index), _removing(gone), self.description)

    def delete(self) -> None:
        """Remove the record: every shard, then the index."""
        for index in range(self.count()):
            self.records.delete(self.shard_key(index))
        self.records.delete(self.key)

    def _shards(self) -> list[dict[str, Any]]:
        shards = []
        for index in range(self.count()):
            shard = self.records.get(self.shard_key(index))
            shards.append(shard if isinstance(shard, dict) else {})
        return shards


def _count(record: Any) -> int:
    return int(record.get("shards") or 0) if isinstance(record, dict) else 0


def _adding(chunk: dict[str, Any]) -> Any:
    def change(record: Any) -> dict[str, Any]:
        return {**(record if isinstance(record, dict) else {}), **chunk}

    return change


def _removing(gone: set[str]) -> Any:
    def change(record: Any) -> dict[str, Any] | None:
        left = {k: v for k, v in (record if isinstance(record, dict) else {}).items() if k not in gone}
        return left or None

    return change
