"""Content fingerprints that make "skip if up to date" safe.

A stage's output Parquet carries the fingerprint of everything that determined it (input rows,
settings, model identity) in its schema metadata; a re-run with an equal fingerprint would write
the same content, so it may be skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.storage import ObjectStore

METADATA_KEY = b"pseudolabel.fingerprint"
# Identity entries that do not change outputs: where the checkpoint came from (its sha256 is what
# matters) and how its digest was established.
_VOLATILE = {"checkpoint", "checkpoint_status", "smoke_run_note"}


def fingerprint(parts: dict[str, Any]) -> str:
    canonical = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def model_identity(describe: dict[str, Any]) -> dict[str, Any]:
    """The part of a model's ``describe()`` that determines its outputs."""
    return {k: v for k, v in describe.items() if k not in _VOLATILE}


def with_fingerprint(table: pa.Table, value: str) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: value.encode()})


def stored_fingerprint(store: ObjectStore, key: str) -> str | None:
    """The fingerprint written into ``key``'s Parquet metadata, or None if absent/unreadable."""
    if not store.exists(key):
        return None
    try:
        metadata = pq.read_schema(io.BytesIO(store.get_bytes(key))).metadata or {}
    except (pa.ArrowInvalid, OSError):
        return None
    value = metadata.get(METADATA_KEY)
    return value.decode() if value else None


def up_to_date(store: ObjectStore, keys: list[str], value: str) -> bool:
    return all(stored_fingerprint(store, key) == value for key in keys)
