"""Taking a full catalog snapshot: read every batch, write parts, publish, prune (what the asset runs)."""

from __future__ import annotations

import time
from collections.abc import Callable

from pseudolabel.catalog.pointer import prune_old_snapshots
from pseudolabel.catalog.reader import iter_catalog_batches
from pseudolabel.catalog.snapshot import DEFAULT_CHUNK_ROWS, CatalogSnapshotWriter, SnapshotSummary
from pseudolabel.catalog.source import CatalogSource
from pseudolabel.storage import ObjectStore

PROGRESS_EVERY_S = 30.0


def take_snapshot(
    source: CatalogSource,
    store: ObjectStore,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    keep_previous: int = 1,
    allow_empty: bool = False,
    log: Callable[[str], None] | None = None,
) -> SnapshotSummary:
    """Snapshot the whole catalog into ``store``; on any error the previous snapshot stays current."""
    log = log or (lambda _message: None)
    log(f"snapshotting catalog {source.redacted} into {store.uri('catalog')}")
    last_report = time.monotonic()
    with CatalogSnapshotWriter(store, source=source.redacted, chunk_rows=chunk_rows) as writer:
        for batch in iter_catalog_batches(source):
            writer.add(batch)
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                progress = writer.summary
                log(
                    f"{progress.pages} pages, {progress.rows} rows written, up to offset {progress.end_offset}"
                    + (f" of {progress.reported_total}" if progress.reported_total is not None else "")
                )
        summary = writer.commit(allow_empty=allow_empty)
    pruned = prune_old_snapshots(store, keep_previous=keep_previous)
    if pruned:
        log(f"deleted {len(pruned)} older snapshot(s): {', '.join(pruned)}")
    return summary
