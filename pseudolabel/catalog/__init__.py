"""Reading the image catalog (REST API or local file) and snapshotting it into Parquet parts."""

from pseudolabel.catalog.batch import CATALOG_ROWS, CatalogBatch
from pseudolabel.catalog.pointer import iter_current_parts, prune_old_snapshots, read_current, snapshot_ids
from pseudolabel.catalog.reader import fetch_total, iter_catalog_batches
from pseudolabel.catalog.run import take_snapshot
from pseudolabel.catalog.snapshot import CatalogSnapshotWriter, SnapshotSummary, new_snapshot_id
from pseudolabel.catalog.source import (
    CATALOG_ENV,
    CATALOG_TOKEN_ENV,
    CatalogError,
    CatalogSource,
    ItemFields,
    redact_location,
)
from pseudolabel.catalog.synthetic import SyntheticCatalog
from pseudolabel.catalog.tally import ReasonTally

__all__ = [
    "CATALOG_ENV",
    "CATALOG_ROWS",
    "CATALOG_TOKEN_ENV",
    "CatalogBatch",
    "CatalogError",
    "CatalogSnapshotWriter",
    "CatalogSource",
    "ItemFields",
    "ReasonTally",
    "SnapshotSummary",
    "SyntheticCatalog",
    "fetch_total",
    "iter_catalog_batches",
    "iter_current_parts",
    "new_snapshot_id",
    "prune_old_snapshots",
    "read_current",
    "redact_location",
    "snapshot_ids",
    "take_snapshot",
]
