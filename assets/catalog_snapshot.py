"""``catalog_snapshot``: the whole image catalog as deduplicated Parquet parts behind catalog/CURRENT.json."""

# No ``from __future__ import annotations``: Dagster reads the config/resource annotations at runtime.
from dagster import AssetExecutionContext, Config, Failure, MaterializeResult, MetadataValue, asset

from assets.common import network_retry
from pseudolabel import layout
from pseudolabel.catalog import (
    DEFAULT_CHUNK_ROWS,
    CatalogError,
    SnapshotSummary,
    label_histogram_markdown,
    reasons_markdown,
    take_snapshot,
)
from resources.catalog import CatalogResource
from resources.storage import StorageResource


class CatalogSnapshotConfig(Config):
    chunk_rows: int = DEFAULT_CHUNK_ROWS  # max rows per Parquet part (bounds memory while writing)
    keep_previous: int = 1  # older snapshots kept after the pointer moves (for readers mid-way)
    allow_empty: bool = False  # publishing an empty catalog is almost always a misconfiguration


@asset(
    group_name="catalog",
    retry_policy=network_retry(),
    description=(
        "Every valid catalog row (url, label, source_id), URL-deduplicated, as Parquet parts under "
        f"catalog/<snapshot_id>/; {layout.CATALOG_CURRENT} names the latest complete snapshot."
    ),
)
def catalog_snapshot(
    context: AssetExecutionContext,
    config: CatalogSnapshotConfig,
    storage: StorageResource,
    catalog: CatalogResource,
) -> MaterializeResult:
    store = storage.store()
    try:
        source = catalog.catalog_source()  # first: a missing PSEUDOLABEL_CATALOG fails before any I/O
        summary = take_snapshot(
            source,
            store,
            chunk_rows=config.chunk_rows,
            keep_previous=config.keep_previous,
            allow_empty=config.allow_empty,
            log=context.log.info,
        )
    except CatalogError as exc:  # step retries only for a server that kept failing, never for config
        raise Failure(description=str(exc), allow_retries=exc.retryable) from exc
    return MaterializeResult(
        metadata=_metadata(summary, store.uri(layout.catalog_snapshot_dir(summary.snapshot_id)))
    )


def _metadata(summary: SnapshotSummary, snapshot_uri: str) -> dict[str, object]:
    return {
        "rows": MetadataValue.int(summary.rows),
        "pages": MetadataValue.int(summary.pages),
        "labels": MetadataValue.int(len(summary.label_histogram)),
        "label_histogram": MetadataValue.md(label_histogram_markdown(summary.label_histogram)),
        "duplicate_urls_dropped": MetadataValue.int(summary.duplicates_dropped),
        "invalid_rows": MetadataValue.int(summary.invalid_rows.total),
        "invalid_rows_by_reason": MetadataValue.md(reasons_markdown(summary.invalid_rows, "rows")),
        "malformed_pages": MetadataValue.int(summary.malformed_pages.total),
        "malformed_pages_by_reason": MetadataValue.md(reasons_markdown(summary.malformed_pages, "pages")),
        "elapsed_s": MetadataValue.float(round(summary.elapsed_s, 2)),
        "rows_per_s": MetadataValue.float(round(summary.rows_per_s, 1)),
        "snapshot_id": MetadataValue.text(summary.snapshot_id),
        "snapshot_path": MetadataValue.path(snapshot_uri),
        "source": MetadataValue.text(summary.source),
        "end_offset": MetadataValue.int(summary.end_offset),
    }
