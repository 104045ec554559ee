"""Reading the image catalog (REST API or local file) and snapshotting it into Parquet parts."""

from pseudolabel.catalog.pointer import iter_current_parts, prune_old_snapshots, read_current, snapshot_ids
from pseudolabel.catalog.reader import fetch_total, iter_catalog_batches
from pseudolabel.catalog.rows import CatalogBatch, ReasonTally
from pseudolabel.catalog.snapshot import (
    DEFAULT_CHUNK_ROWS,
    CatalogSnapshotWriter,
    SnapshotSummary,
    label_histogram_markdown,
    new_snapshot_id,
    reasons_markdown,
    take_snapshot,
)
from pseudolabel.catalog.source import (
    CATALOG_ENV,
    CATALOG_TOKEN_ENV,
    CatalogError,
    CatalogSource,
    ItemFields,
    redact_location,
)

__all__ = [
    "CATALOG_ENV",
    "CATALOG_TOKEN_ENV",
    "DEFAULT_CHUNK_ROWS",
    "CatalogBatch",
    "CatalogError",
    "CatalogSnapshotWriter",
    "CatalogSource",
    "ItemFields",
    "ReasonTally",
    "SnapshotSummary",
    "fetch_total",
    "iter_catalog_batches",
    "iter_current_parts",
    "label_histogram_markdown",
    "new_snapshot_id",
    "prune_old_snapshots",
    "read_current",
    "reasons_markdown",
    "redact_location",
    "snapshot_ids",
    "take_snapshot",
]
