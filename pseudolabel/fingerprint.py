"""Content fingerprints: the one way the project hashes "everything that determined an output".

A stage's output Parquet carries the fingerprint of its inputs, settings and model identity in its
schema metadata; a re-run with an equal fingerprint would write the same content, so it may be skipped.
The thresholds use the same hash (shortened) as the labels' fingerprint and ``pseudo_labels``' code
version, stored under their own metadata key.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.storage import ObjectStore

METADATA_KEY = b"pseudolabel.fingerprint"  # model stages' outputs
THRESHOLDS_METADATA_KEY = b"pseudolabel.thresholds_fingerprint"  # pseudo_labels tables
# Identity entries that do not change outputs: where the checkpoint came from (its sha256 is what
# matters) and how its digest was established.
_VOLATILE = {"checkpoint", "checkpoint_status", "smoke_run_note"}


def fingerprint(parts: dict[str, Any], length: int | None = None) -> str:
    """sha256 hex of ``parts`` as canonical JSON (sorted keys, repr-exact floats), cut to ``length``."""
    canonical = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def model_identity(describe: dict[str, Any]) -> dict[str, Any]:
    """The part of a model's ``describe()`` that determines its outputs."""
    return {k: v for k, v in describe.items() if k not in _VOLATILE}


def with_fingerprint(table: pa.Table, value: str, key: bytes = METADATA_KEY) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), key: value.encode()})


def table_fingerprint(table_or_schema: pa.Table | pa.Schema, key: bytes = METADATA_KEY) -> str | None:
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    value = (schema.metadata or {}).get(key)
    return value.decode() if value else None


def stored_fingerprint(store: ObjectStore, key: str) -> str | None:
    """The fingerprint written into ``key``'s Parquet metadata, or None if absent/unreadable."""
    if not store.exists(key):
        return None
    try:
        return table_fingerprint(pq.read_schema(io.BytesIO(store.get_bytes(key))))
    except (pa.ArrowInvalid, OSError):
        return None


def up_to_date(store: ObjectStore, keys: list[str], value: str) -> bool:
    return all(stored_fingerprint(store, key) == value for key in keys)
