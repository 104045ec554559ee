"""Reading the published snapshot and cleaning up the ones it replaced."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pseudolabel import layout
from pseudolabel.storage import ObjectNotFound, ObjectStore, read_parquet

_CATALOG_DIR = layout.catalog_snapshot_dir("")  # "catalog/"


def read_current(store: ObjectStore) -> dict[str, Any] | None:
    """The ``catalog/CURRENT.json`` pointer, or None when no snapshot was ever published."""
    try:
        return store.get_json(layout.CATALOG_CURRENT)
    except ObjectNotFound:
        return None


def iter_current_parts(store: ObjectStore, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The current snapshot's parts as Arrow tables, one part in memory at a time."""
    pointer = read_current(store)
    if pointer is None:
        raise FileNotFoundError(f"no catalog snapshot yet: {store.uri(layout.CATALOG_CURRENT)} is missing")
    for key in pointer["parts"]:
        yield read_parquet(store, key, columns=columns)


def snapshot_ids(store: ObjectStore) -> list[str]:
    """Ids of every snapshot directory in storage (published or not), oldest first."""
    ids = set()
    for key in _keys_under(store, _CATALOG_DIR):
        name, slash, _ = key[len(_CATALOG_DIR) :].partition("/")
        if slash:  # a file inside a snapshot dir, not CURRENT.json itself
            ids.add(name)
    return sorted(ids)


def prune_old_snapshots(store: ObjectStore, keep_previous: int = 1) -> list[str]:
    """Delete snapshot dirs older than the current one, except the ``keep_previous`` newest of them.

    Runs after the pointer moved, so a reader starting now never needs what is deleted; keeping
    one previous snapshot lets a reader that started just before the switch finish. Newer dirs
    (a run in progress elsewhere) are never touched.
    """
    pointer = read_current(store)
    if pointer is None:
        return []
    older = [s for s in snapshot_ids(store) if s < pointer["snapshot_id"]]
    doomed = older[: max(0, len(older) - keep_previous)]
    for snapshot_id in doomed:
        delete_snapshot(store, snapshot_id)
    return doomed


def delete_snapshot(store: ObjectStore, snapshot_id: str) -> int:
    """Delete every object of one snapshot dir (and nothing that merely shares its name as a prefix)."""
    keys = _keys_under(store, layout.catalog_snapshot_dir(snapshot_id) + "/")
    for key in keys:
        store.delete(key)
    return len(keys)


def _keys_under(store: ObjectStore, directory: str) -> list[str]:
    # Stores may match a prefix loosely ("catalog/" also finding "catalogue/..."): keep exact matches.
    return [info.key for info in store.list(directory) if info.key.startswith(directory)]
