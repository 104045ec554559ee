"""The object-store interface every stage writes through, and Parquet tables to and from any store.

Keys are always relative, '/'-separated paths (built by :mod:`pseudolabel.layout`); a backend
maps them onto a directory or an S3 prefix. Writes are atomic: a reader sees the old object or
the new one, never half of one. What a killed writer leaves behind (a local temp file, an
incomplete S3 multipart upload) is never visible under a key; :meth:`ObjectStore.remove_stale_temp`
removes it.
"""

from __future__ import annotations

import io
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


class ObjectNotFound(FileNotFoundError):
    """Raised when a key does not exist in the store."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class ObjectStore(ABC):
    """Minimal blob store: bytes in, bytes out, listing by prefix."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (replacing any previous object)."""

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Store the local file at ``path`` under ``key`` atomically, like :meth:`put_bytes`.

        For big files (a dataset export's COCO JSON): the backends override it to stream the file
        (local: copied next to the target and renamed; S3: a managed multipart upload), so it is never
        one bytes object in memory. This default reads it whole.
        """
        self.put_bytes(key, Path(path).read_bytes())

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Return the object's bytes; raise :class:`ObjectNotFound` if missing."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix`` (recursively), sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""

    @abstractmethod
    def remove_stale_temp(self, prefix: str) -> int:
        """Remove what dead writers left half-written under ``prefix``; returns how many were removed.

        Only leftovers whose writer is gone are touched, so calling this while other processes write
        under the same prefix is safe. A step calls it for its own prefixes when it starts.
        """

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """Human/tool-facing location of ``key`` (a filesystem path or an ``s3://`` URI)."""

    def delete_prefix(self, prefix: str) -> int:
        keys = [info.key for info in self.list(prefix)]
        for key in keys:
            self.delete(key)
        return len(keys)

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode())

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode()


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


def clean_key(key: str) -> str:
    """Normalise a key and refuse anything that could escape the store's root."""
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError(f"storage key must not contain '..': {key!r}")
    return "/".join(parts)


def clean_prefix(prefix: str) -> str:
    """Like :func:`clean_key`, but a trailing '/' survives: ``"images/a/"`` must not match ``images/a.parquet``."""
    cleaned = clean_key(prefix) if prefix else ""
    return f"{cleaned}/" if cleaned and prefix.endswith("/") else cleaned
