"""Parquet tables to and from an object store."""

from __future__ import annotations

import io

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.storage.base import ObjectStore


def write_parquet(store: ObjectStore, key: str, table: pa.Table | pd.DataFrame) -> int:
    """Write a table atomically; returns the number of bytes written."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    data = buffer.getvalue()
    store.put_bytes(key, data)
    return len(data)


def read_parquet(store: ObjectStore, key: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(store.get_bytes(key)), columns=columns)
