"""The snapshot writer: chunked parts, URL dedupe across chunks, pointer published last (local and S3)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pseudolabel import layout
from pseudolabel.catalog import (
    CatalogBatch,
    CatalogError,
    CatalogSnapshotWriter,
    CatalogSource,
    iter_current_parts,
    prune_old_snapshots,
    read_current,
    snapshot_ids,
    take_snapshot,
)
from pseudolabel.catalog.rows import ReasonTally
from pseudolabel.catalog.snapshot import UrlDeduper
from pseudolabel.schemas import CATALOG_ROWS
from pseudolabel.storage import LocalObjectStore, ObjectStore
from pseudolabel.testing.catalogs import SyntheticCatalog


def batch(urls: list[str], start: int = 0, label: str = "oak") -> CatalogBatch:
    table = pa.Table.from_pydict(
        {"url": urls, "label": [label] * len(urls), "source_id": [None] * len(urls)}, schema=CATALOG_ROWS
    )
    return CatalogBatch(table=table, start_offset=start, end_offset=start + len(urls))


def urls(numbers) -> list[str]:
    return [f"https://img.example/{n}.jpg" for n in numbers]


def stored_urls(store: ObjectStore) -> list[str]:
    return [url for part in iter_current_parts(store) for url in part.column("url").to_pylist()]


def test_rows_are_split_into_parts_of_at_most_chunk_rows(store):
    with CatalogSnapshotWriter(store, source="test", chunk_rows=7) as writer:
        for start in range(0, 30, 4):
            writer.add(batch(urls(range(start, min(start + 4, 30))), start))
        summary = writer.commit()
    sizes = [part.num_rows for part in iter_current_parts(store)]
    assert sizes == [7, 7, 7, 7, 2]
    assert summary.parts == [layout.catalog_part(summary.snapshot_id, i) for i in range(5)]
    assert stored_urls(store) == urls(range(30))
    assert summary.rows == 30 and summary.pages == 8 and summary.end_offset == 30


def test_duplicate_urls_are_dropped_across_and_within_chunks(store):
    with CatalogSnapshotWriter(store, source="test", chunk_rows=5) as writer:
        writer.add(batch(urls([0, 1, 2, 1, 3])))  # 1 repeated within the first chunk
        writer.add(batch(urls([4, 0, 5, 6, 2])))  # 0 and 2 repeated from the first chunk
        writer.add(batch(urls([7, 7, 4])))  # repeated within and across, in the last (partial) chunk
        summary = writer.commit()
    assert stored_urls(store) == urls([0, 1, 2, 3, 4, 5, 6, 7])
    assert summary.duplicates_dropped == 5
    assert summary.rows == 8


def test_pointer_is_written_last_and_describes_the_snapshot():
    store = RecordingStore()
    invalid = ReasonTally()
    invalid.add("url_not_http", 3, {"image_url": "ftp://x"})
    with CatalogSnapshotWriter(store, source="https://api.example/trees", chunk_rows=2) as writer:
        first = batch(urls([0, 1, 2]), label="oak")
        first.invalid_rows, first.total = invalid, 5
        writer.add(first)
        writer.add(batch(urls([3, 0]), start=3, label="pine"))
        summary = writer.commit()
    assert store.puts[-1] == layout.CATALOG_CURRENT
    assert store.puts[:-1] == summary.parts and len(summary.parts) == 2
    pointer = store.get_json(layout.CATALOG_CURRENT)
    assert pointer["snapshot_id"] == summary.snapshot_id
    assert pointer["parts"] == summary.parts
    assert pointer["rows"] == 4 and pointer["pages"] == 2 and pointer["duplicates_dropped"] == 1
    assert pointer["label_histogram"] == {"oak": 3, "pine": 1}
    assert pointer["invalid_rows"]["counts"] == {"url_not_http": 1}
    assert pointer["source"] == "https://api.example/trees"
    assert pointer["reported_total"] == 5 and pointer["end_offset"] == 5
    assert pointer["created_at"]


def test_a_failed_run_leaves_the_previous_snapshot_current(store):
    with CatalogSnapshotWriter(store, source="test", chunk_rows=2) as writer:
        writer.add(batch(urls([0, 1, 2])))
        previous = writer.commit()

    with (
        pytest.raises(RuntimeError, match="network gone"),
        CatalogSnapshotWriter(store, source="test", chunk_rows=2) as writer,
    ):
        writer.add(batch(urls([10, 11, 12, 13, 14])))  # two parts already written
        raise RuntimeError("network gone")
    assert read_current(store)["snapshot_id"] == previous.snapshot_id
    assert stored_urls(store) == urls([0, 1, 2])
    assert snapshot_ids(store) == [previous.snapshot_id]  # the aborted run's parts are gone


def test_an_empty_catalog_is_refused_unless_allowed(store):
    with (
        pytest.raises(CatalogError, match="no valid rows"),
        CatalogSnapshotWriter(store, source="t") as writer,
    ):
        writer.commit()
    assert read_current(store) is None
    with CatalogSnapshotWriter(store, source="t") as writer:
        summary = writer.commit(allow_empty=True)
    assert read_current(store)["rows"] == 0 and summary.parts == []


def test_prune_keeps_current_and_newest_previous(store):
    ids = [f"2025010{day}T000000Z-aaaaaa" for day in range(1, 5)]
    for snapshot_id in ids:
        with CatalogSnapshotWriter(store, source="t", snapshot_id=snapshot_id) as writer:
            writer.add(batch(urls([0])))
            writer.commit()
    store.put_bytes(layout.catalog_part("20250109T000000Z-bbbbbb", 0), b"in progress elsewhere")
    store.put_bytes(f"catalog/{ids[0]}.notes", b"not part of the snapshot dir")
    assert prune_old_snapshots(store, keep_previous=1) == ids[:2]
    assert snapshot_ids(store) == [ids[2], ids[3], "20250109T000000Z-bbbbbb"]
    assert store.exists(f"catalog/{ids[0]}.notes")
    assert prune_old_snapshots(store, keep_previous=0) == [ids[2]]


def test_take_snapshot_from_the_api(store, dev_server):
    catalog = SyntheticCatalog(total=2_000, duplicate_every=10)
    server = dev_server(catalog, total=catalog.total)
    source = CatalogSource(server.catalog_url, page_size=100, max_concurrency=4)
    summary = take_snapshot(source, store, chunk_rows=500)
    assert summary.rows == catalog.unique_urls() == read_current(store)["rows"]
    assert summary.duplicates_dropped == catalog.total - catalog.unique_urls()
    assert summary.pages == 20
    assert sum(summary.label_histogram.values()) == summary.rows
    assert len(set(stored_urls(store))) == summary.rows


def test_url_deduper_remembers_across_calls():
    deduper = UrlDeduper()
    assert deduper.first_occurrences(pa.array(urls([3, 1, 3, 2]))).tolist() == [True, True, False, True]
    assert deduper.first_occurrences(pa.array(urls([2, 4, 4, 0]))).tolist() == [False, True, False, True]
    assert deduper.first_occurrences(pa.array([], pa.string())).tolist() == []
    assert deduper.unique_count == 5


class RecordingStore(LocalObjectStore):
    """A local store that remembers the order of writes."""

    def __init__(self) -> None:
        import tempfile

        self._tmp = tempfile.TemporaryDirectory()
        super().__init__(self._tmp.name)
        self.puts: list[str] = []

    def put_bytes(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        super().put_bytes(key, data)
