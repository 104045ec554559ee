"""Reading any catalog source in validated batches, in catalog order: the REST API (``client.py``) or
a local CSV, JSONL or Parquet file (here), streamed.

File rows go through the same validation as API items, so a file and an API catalog are reported
alike. CSV values are read as strings (a numeric-looking label stays a label); JSONL lines that
are not JSON are counted as ``invalid_json`` rows.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pseudolabel.catalog.client import fetch_reported_total, iter_http_batches
from pseudolabel.catalog.rows import CatalogBatch, UnparsedItem, validated_batch
from pseudolabel.catalog.source import CatalogError, CatalogSource, ItemFields

FileFormat = Literal["csv", "jsonl", "parquet"]

_FORMATS: dict[str, FileFormat] = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl",
    ".ndjson.gz": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def iter_catalog_batches(source: CatalogSource, start_offset: int = 0) -> Iterator[CatalogBatch]:
    """Validated batches (url, label, source_id + stats) in catalog order, from ``start_offset``.

    The last batch's ``end_offset`` is where an incremental reader resumes next time.
    """
    if source.is_http:
        return iter_http_batches(source, start_offset)
    return iter_file_batches(source, start_offset)


def fetch_total(source: CatalogSource) -> int | None:
    """The catalog's size when known up front (API ``total`` or Parquet metadata), else None."""
    return fetch_reported_total(source) if source.is_http else count_file_rows(source)


def catalog_file_format(path: str | Path) -> FileFormat:
    name = Path(path).name.lower()
    for suffix, file_format in sorted(_FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return file_format
    raise CatalogError(
        f"unsupported catalog file {str(path)!r}: use a .csv, .jsonl/.ndjson (optionally .gz) or "
        ".parquet file with image_url,label[,id] columns, or an http(s) URL of the catalog API"
    )


def iter_file_batches(source: CatalogSource, start_offset: int = 0) -> Iterator[CatalogBatch]:
    """Validated batches of about ``source.file_batch_rows`` rows, skipping the first ``start_offset``."""
    path = Path(source.location).expanduser()
    file_format = catalog_file_format(path)
    if not path.is_file():
        raise CatalogError(f"catalog file not found: {path.resolve()}")
    readers = {"csv": _csv_rows, "jsonl": _jsonl_rows, "parquet": _parquet_rows}
    offset = 0
    for items in readers[file_format](path, source.fields, source.file_batch_rows):
        batch_start = offset
        offset += len(items)
        if offset <= start_offset:
            continue
        skip = max(0, start_offset - batch_start)
        yield validated_batch(items[skip:], source.fields, batch_start + skip, offset)


def count_file_rows(source: CatalogSource) -> int | None:
    """Row count when the file knows it cheaply (Parquet metadata); None for CSV/JSONL."""
    path = Path(source.location).expanduser()
    if catalog_file_format(path) == "parquet" and path.is_file():
        return pq.ParquetFile(path).metadata.num_rows
    return None


def _require_columns(path: Path, columns: Iterable[str], fields: ItemFields) -> list[str]:
    present = list(columns)
    missing = [name for name in (fields.url, fields.label) if name not in present]
    if missing:
        raise CatalogError(
            f"catalog file {path} has no {', '.join(map(repr, missing))} column (columns: {present[:20]}); "
            "rename the columns or set url_field/label_field"
        )
    return [name for name in (fields.url, fields.label, fields.id) if name and name in present]


def _csv_rows(path: Path, fields: ItemFields, batch_rows: int) -> Iterator[list[dict[str, Any]]]:
    wanted = {name: pa.string() for name in (fields.url, fields.label, fields.id) if name}
    reader = pacsv.open_csv(
        str(path),  # pyarrow decompresses .gz by extension
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types=wanted, strings_can_be_null=True),
    )
    columns = _require_columns(path, reader.schema.names, fields)
    for record_batch in reader:
        yield from _chunks(record_batch.select(columns).to_pylist(), batch_rows)


def _parquet_rows(path: Path, fields: ItemFields, batch_rows: int) -> Iterator[list[dict[str, Any]]]:
    parquet = pq.ParquetFile(path)
    columns = _require_columns(path, parquet.schema_arrow.names, fields)
    for record_batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
        yield record_batch.to_pylist()


def _jsonl_rows(path: Path, fields: ItemFields, batch_rows: int) -> Iterator[list[Any]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    items: list[Any] = []
    with opener(path, "rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except ValueError:
                items.append(UnparsedItem(line.strip().decode("utf-8", "replace")))
            if len(items) >= batch_rows:
                yield items
                items = []
    if items:
        yield items


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
