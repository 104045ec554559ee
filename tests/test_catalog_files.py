"""Local catalog files: CSV, JSONL and Parquet read through the same validation as the API."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pseudolabel.catalog import CatalogError, CatalogSource, fetch_total, iter_catalog_batches

ROWS = [
    {"image_url": "https://img.example/0.jpg", "label": "oak", "id": "a"},
    {"image_url": "https://img.example/1.jpg", "label": "007", "id": "b"},  # numeric-looking label
    {"image_url": "not-a-url", "label": "oak", "id": "c"},
    {"image_url": "https://img.example/3.jpg", "label": "pine, tall", "id": "d"},  # comma needs quoting
]
EXPECTED = [
    {"url": "https://img.example/0.jpg", "label": "oak", "source_id": "a"},
    {"url": "https://img.example/1.jpg", "label": "007", "source_id": "b"},
    {"url": "https://img.example/3.jpg", "label": "pine, tall", "source_id": "d"},
]


def write_csv(path, rows):
    pacsv.write_csv(pa.Table.from_pylist(rows), path)


def write_jsonl(path, rows):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)


WRITERS = {
    "catalog.csv": write_csv,
    "catalog.jsonl": write_jsonl,
    "catalog.jsonl.gz": write_jsonl,
    "catalog.parquet": write_parquet,
}


def read(path, **options):
    batches = list(iter_catalog_batches(CatalogSource(str(path), **options)))
    return batches, pa.concat_tables([b.table for b in batches])


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_format_yields_valid_rows_and_counts_invalid_ones(tmp_path, name):
    path = tmp_path / name
    WRITERS[name](path, ROWS)
    batches, table = read(path)
    assert table.to_pylist() == EXPECTED
    invalid = batches[0].invalid_rows
    assert dict(invalid.counts) == {"url_not_http": 1}
    assert invalid.examples["url_not_http"][0]["offset"] == 2


@pytest.mark.parametrize("name", ["catalog.csv", "catalog.jsonl", "catalog.parquet"])
def test_batches_and_start_offset(tmp_path, name):
    rows = [{"image_url": f"https://img.example/{i}.jpg", "label": "oak", "id": str(i)} for i in range(25)]
    WRITERS[name](tmp_path / name, rows)
    batches, table = read(tmp_path / name, file_batch_rows=10)
    assert table.num_rows == 25
    assert max(b.num_rows for b in batches) <= 10
    assert batches[-1].end_offset == 25
    resumed = list(
        iter_catalog_batches(CatalogSource(str(tmp_path / name), file_batch_rows=10), start_offset=13)
    )
    assert pa.concat_tables([b.table for b in resumed]).column("source_id").to_pylist() == [
        str(i) for i in range(13, 25)
    ]
    assert resumed[0].start_offset == 13


def test_csv_without_id_column_has_null_source_ids(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("image_url,label\nhttps://img.example/0.jpg,oak\n")
    _, table = read(path)
    assert table.to_pylist() == [{"url": "https://img.example/0.jpg", "label": "oak", "source_id": None}]


def test_csv_empty_cells_are_reported(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("image_url,label\nhttps://img.example/0.jpg,\n,oak\n")
    batches, table = read(path)
    assert table.num_rows == 0
    assert dict(batches[0].invalid_rows.counts) == {"missing_label": 1, "missing_url": 1}


def test_jsonl_lines_that_are_not_json_are_counted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"image_url": "https://img.example/0.jpg", "label": "oak"}\n{oops\n\n[1]\n')
    batches, table = read(path)
    assert table.num_rows == 1
    assert dict(batches[0].invalid_rows.counts) == {"invalid_json": 1, "not_an_object": 1}
    assert batches[0].invalid_rows.examples["invalid_json"] == [{"offset": 1, "value": "{oops"}]


def test_missing_required_column_is_a_clear_error(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("url,label\nhttps://img.example/0.jpg,oak\n")
    with pytest.raises(CatalogError, match="no 'image_url' column"):
        read(path)


def test_unknown_extension_is_a_clear_error(tmp_path):
    path = tmp_path / "catalog.xlsx"
    path.write_bytes(b"")
    with pytest.raises(CatalogError, match=r"unsupported catalog file .*catalog\.xlsx.*\.csv"):
        read(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CatalogError, match="catalog file not found"):
        read(tmp_path / "nope.csv")


def test_fetch_total_for_files(tmp_path):
    write_parquet(tmp_path / "c.parquet", ROWS)
    write_csv(tmp_path / "c.csv", ROWS)
    assert fetch_total(CatalogSource(str(tmp_path / "c.parquet"))) == 4
    assert fetch_total(CatalogSource(str(tmp_path / "c.csv"))) is None
