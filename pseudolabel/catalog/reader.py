"""One entry point for reading any catalog source, API or file."""

from __future__ import annotations

from collections.abc import Iterator

from pseudolabel.catalog.batch import CatalogBatch
from pseudolabel.catalog.client import fetch_total as fetch_api_total
from pseudolabel.catalog.client import iter_http_batches
from pseudolabel.catalog.files import count_file_rows, iter_file_batches
from pseudolabel.catalog.source import CatalogSource


def iter_catalog_batches(source: CatalogSource, start_offset: int = 0) -> Iterator[CatalogBatch]:
    """Validated batches (url, label, source_id + stats) in catalog order, from ``start_offset``.

    The last batch's ``end_offset`` is where an incremental reader resumes next time.
    """
    if source.is_http:
        return iter_http_batches(source, start_offset)
    return iter_file_batches(source, start_offset)


def fetch_total(source: CatalogSource) -> int | None:
    """The catalog's size when known up front (API ``total`` or Parquet metadata), else None."""
    return fetch_api_total(source) if source.is_http else count_file_rows(source)
