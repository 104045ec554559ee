"""Taking a catalog snapshot: every batch, deduplicated by URL, written as chunked Parquet parts and
published by one pointer write; plus the snapshot's summary as markdown for the Dagster UI.

Rows stream through: at most ``chunk_rows`` raw rows are buffered (as Arrow data, not Python
objects), deduplicated against every URL seen so far, and written as ``catalog/<id>/part-NNNNN.parquet``.
``catalog/CURRENT.json`` is written only by :meth:`CatalogSnapshotWriter.commit`, after every part,
so a reader following the pointer never sees a half-written snapshot.

URLs seen are remembered as 64-bit hashes (~8 bytes each, no Python strings kept) in one sorted
numpy array; a chunk's new hashes are merged in with searchsorted + insert. With 15M URLs the chance
of any two distinct URLs colliding (and one being wrongly dropped as a duplicate) is about 6e-6.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pseudolabel import layout
from pseudolabel.catalog.pointer import delete_snapshot, prune_old_snapshots
from pseudolabel.catalog.reader import iter_catalog_batches
from pseudolabel.catalog.rows import CatalogBatch, ReasonTally
from pseudolabel.catalog.source import CatalogError, CatalogSource
from pseudolabel.storage import ObjectStore, write_parquet

POINTER_VERSION = 1
DEFAULT_CHUNK_ROWS = 250_000
PROGRESS_EVERY_S = 30.0
TOP_LABELS = 20


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


def new_snapshot_id(now: datetime | None = None) -> str:
    """Sorts by creation time (to the microsecond); the random tail keeps simultaneous runs apart."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S.%fZ}-{uuid.uuid4().hex[:6]}"


@dataclass
class SnapshotSummary:
    """What a snapshot holds and how reading it went; :meth:`pointer` is what gets published."""

    snapshot_id: str
    source: str  # redacted: no credentials, no query string
    parts: list[str] = field(default_factory=list)
    rows: int = 0
    pages: int = 0
    label_histogram: Counter[str] = field(default_factory=Counter)
    duplicates_dropped: int = 0
    invalid_rows: ReasonTally = field(default_factory=ReasonTally)
    malformed_pages: ReasonTally = field(default_factory=ReasonTally)
    end_offset: int = 0  # where an incremental reader would resume
    reported_total: int | None = None
    created_at: str = ""
    elapsed_s: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def pointer(self) -> dict[str, Any]:
        """The JSON written to ``catalog/CURRENT.json``."""
        return {
            "version": POINTER_VERSION,
            "snapshot_id": self.snapshot_id,
            "parts": self.parts,
            "rows": self.rows,
            "pages": self.pages,
            "label_histogram": dict(self.label_histogram.most_common()),
            "duplicates_dropped": self.duplicates_dropped,
            "invalid_rows": self.invalid_rows.as_dict(),
            "malformed_pages": self.malformed_pages.as_dict(),
            "end_offset": self.end_offset,
            "reported_total": self.reported_total,
            "source": self.source,
            "created_at": self.created_at,
            "elapsed_s": round(self.elapsed_s, 3),
        }


class CatalogSnapshotWriter:
    """Feed it batches with :meth:`add`, then :meth:`commit`; used as a context manager it aborts on error."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        source: str,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        snapshot_id: str | None = None,
    ):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.store = store
        self.chunk_rows = chunk_rows
        self.summary = SnapshotSummary(snapshot_id=snapshot_id or new_snapshot_id(), source=source)
        self._deduper = UrlDeduper()
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._started = time.monotonic()
        self._committed = False

    @property
    def snapshot_id(self) -> str:
        return self.summary.snapshot_id

    def add(self, batch: CatalogBatch) -> None:
        summary = self.summary
        summary.pages += batch.pages
        summary.invalid_rows.merge(batch.invalid_rows)
        summary.malformed_pages.merge(batch.malformed_pages)
        summary.end_offset = max(summary.end_offset, batch.end_offset)
        if batch.total is not None:
            summary.reported_total = batch.total
        if batch.num_rows:
            self._pending.append(batch.table)
            self._pending_rows += batch.num_rows
        while self._pending_rows >= self.chunk_rows:
            self._write_chunk(self.chunk_rows)

    def commit(self, allow_empty: bool = False) -> SnapshotSummary:
        """Write the last part, then the pointer (last of all); returns the final summary."""
        if self._pending_rows:
            self._write_chunk(self._pending_rows)
        summary = self.summary
        if summary.rows == 0 and not allow_empty:
            raise CatalogError(
                f"catalog {summary.source} produced no valid rows ({summary.pages} pages, "
                f"invalid: {dict(summary.invalid_rows.counts)}, malformed pages: "
                f"{dict(summary.malformed_pages.counts)}); {layout.CATALOG_CURRENT} left unchanged"
            )
        summary.elapsed_s = time.monotonic() - self._started
        summary.created_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.store.put_json(layout.CATALOG_CURRENT, summary.pointer())
        self._committed = True
        return summary

    def abort(self) -> None:
        """Delete the parts written so far (never the pointer: it still names the previous snapshot)."""
        if not self._committed:
            delete_snapshot(self.store, self.snapshot_id)

    def __enter__(self) -> CatalogSnapshotWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self.abort()

    def _write_chunk(self, raw_rows: int) -> None:
        pending = pa.concat_tables(self._pending)
        chunk, rest = pending.slice(0, raw_rows), pending.slice(raw_rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

        unique = chunk.filter(pa.array(self._deduper.first_occurrences(chunk.column("url"))))
        self.summary.duplicates_dropped += chunk.num_rows - unique.num_rows
        if not unique.num_rows:
            return
        key = layout.catalog_part(self.snapshot_id, len(self.summary.parts))
        write_parquet(self.store, key, unique)
        self.summary.parts.append(key)
        self.summary.rows += unique.num_rows
        counts = pc.value_counts(unique.column("label"))
        self.summary.label_histogram.update(
            dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))
        )


def url_hashes(urls: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Stable 64-bit hashes of ``urls`` (pandas' keyed SipHash, computed on the Arrow strings)."""
    return pd.util.hash_array(urls.to_pandas().array)


class UrlDeduper:
    """Keeps the first occurrence of each URL across every chunk it is shown, in order."""

    def __init__(self) -> None:
        self._seen = np.empty(0, dtype=np.uint64)

    @property
    def unique_count(self) -> int:
        return len(self._seen)

    def first_occurrences(self, urls: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Boolean mask over ``urls``: True where the URL was not seen before (in or before this chunk)."""
        hashes = url_hashes(urls)
        unique, first_index = np.unique(hashes, return_index=True)
        positions = np.searchsorted(self._seen, unique)
        if len(self._seen):
            seen_before = self._seen[np.minimum(positions, len(self._seen) - 1)] == unique
        else:
            seen_before = np.zeros(len(unique), dtype=bool)
        is_new = ~seen_before
        # Sorted values inserted at their sorted positions keep the array sorted (one O(n) copy).
        self._seen = np.insert(self._seen, positions[is_new], unique[is_new])
        keep = np.zeros(len(hashes), dtype=bool)
        keep[first_index[is_new]] = True
        return keep


# -- the summary as markdown for the Dagster UI -------------------------------------------------


def label_histogram_markdown(histogram: Mapping[str, int], top: int = TOP_LABELS) -> str:
    """Rows per label, the ``top`` labels first; the others summed on one line."""
    total = sum(histogram.values())
    ranked = sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))
    lines = ["| label | rows | share |", "| --- | ---: | ---: |"]
    for label, count in ranked[:top]:
        lines.append(f"| {_cell(label)} | {count:,} | {count / total:.1%} |")
    if len(ranked) > top:
        rest = sum(count for _, count in ranked[top:])
        lines.append(f"| *{len(ranked) - top} other labels* | {rest:,} | {rest / total:.1%} |")
    return "\n".join(lines)


def reasons_markdown(tally: ReasonTally, what: str = "rows") -> str:
    """Counts by reason with a few examples each (offset: value)."""
    if not tally.total:
        return f"No invalid {what}."
    lines = ["| reason | count | examples |", "| --- | ---: | --- |"]
    for reason, count in tally.counts.most_common():
        examples = "<br>".join(
            f"@{example['offset']}: `{_cell(example['value'])}`" for example in tally.examples.get(reason, [])
        )
        lines.append(f"| {reason} | {count:,} | {examples} |")
    return "\n".join(lines)


def _cell(text: object) -> str:
    # Pipes and newlines would break the table; backticks would break the inline code span.
    return str(text).replace("|", "\\|").replace("\n", " ").replace("`", "'")
