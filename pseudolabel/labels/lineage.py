"""What made a shard's labels: the candidates ``pseudo_labels`` read, recorded when it read them.

The model workers write a provenance sidecar next to the detections and masks of a shard
(``layout.provenance``: model variant, backend, checkpoint digest, output fingerprint). ``pseudo_labels``
copies both into its own Parquet metadata (:data:`LINEAGE_METADATA_KEY`) as it labels the shard, so the
dataset and the exports credit the models that really made the labels, not whichever model last wrote
the sidecars. When the detections or masks change after the labels (``masks`` re-run with another
segmenter, and no relabel), the recorded fingerprints no longer match the stored ones: the labels are
stale (:func:`stale_shards`) and publishing from them is refused.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel import layout
from pseudolabel.storage import ObjectNotFound, ObjectStore

LINEAGE_METADATA_KEY = b"pseudolabel.lineage"
STAGES = {"detector": layout.detections, "segmenter": layout.masks}
PROVENANCE_FIELDS = ("model", "backend", "checkpoint_sha256", "fingerprint")
_CHECKPOINT_KEYS = ("checkpoint_sha256", "checkpoint_hash", "sha256")


def _first(mapping: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((mapping[k] for k in keys if mapping.get(k) is not None), None)


def model_variant(meta: dict[str, Any]) -> str | None:
    """Explicit ``model_variant``, else "model/variant" (either part alone when the other is missing)."""
    if meta.get("model_variant"):
        return str(meta["model_variant"])
    parts = [str(meta[k]) for k in ("model", "variant") if meta.get(k)]
    return "/".join(parts) or None


def stage_provenance(meta: dict[str, Any], stage: str, fingerprint: str | None = None) -> dict[str, Any]:
    """``<stage>_model``, ``_backend``, ``_checkpoint_sha256`` and ``_fingerprint`` from a sidecar entry."""
    return {
        f"{stage}_model": model_variant(meta),
        f"{stage}_backend": meta.get("backend"),
        f"{stage}_checkpoint_sha256": _first(meta, _CHECKPOINT_KEYS),
        f"{stage}_fingerprint": fingerprint if fingerprint is not None else meta.get("fingerprint"),
    }


def current_provenance(store: ObjectStore, shard: str) -> dict[str, Any]:
    """Provenance of the detections and masks stored for ``shard`` now (None where a sidecar is absent)."""
    out: dict[str, Any] = {}
    for stage, key_of in STAGES.items():
        try:
            meta = store.get_json(layout.provenance(key_of(shard)))
        except (ObjectNotFound, ValueError):
            meta = {}
        out.update(stage_provenance(meta if isinstance(meta, dict) else {}, stage))
    return out


def with_lineage(table: pa.Table, lineage: dict[str, Any]) -> pa.Table:
    metadata = {**(table.schema.metadata or {}), LINEAGE_METADATA_KEY: json.dumps(lineage).encode()}
    return table.replace_schema_metadata(metadata)


def recorded_lineage(schema: pa.Schema) -> dict[str, Any] | None:
    """The provenance ``pseudo_labels`` recorded in a labels table, or None (labels made before lineage
    was recorded)."""
    raw = (schema.metadata or {}).get(LINEAGE_METADATA_KEY)
    return json.loads(raw) if raw else None


def stored_lineage(store: ObjectStore, shard: str) -> dict[str, Any] | None:
    try:
        data = store.get_bytes(layout.pseudo_labels(shard))
    except ObjectNotFound:
        return None
    return recorded_lineage(pq.read_schema(io.BytesIO(data)))


def staleness(recorded: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """Why labels with ``recorded`` lineage do not match the candidates stored now, or None. Labels made
    before lineage was recorded (``recorded`` None) cannot be judged and are not called stale."""
    if recorded is None:
        return None
    changed = [
        stage
        for stage in STAGES
        if recorded.get(f"{stage}_fingerprint") != current.get(f"{stage}_fingerprint")
    ]
    if changed:
        what = " and ".join("detections" if s == "detector" else "masks" for s in changed)
        return f"{what} changed after the labels were made"
    return None


def stale_shards(store: ObjectStore, shards: Iterable[str]) -> dict[str, str]:
    """``{shard: reason}`` for every labelled shard whose labels were not made from its current candidates."""
    stale = {}
    for shard in shards:
        reason = staleness(stored_lineage(store, shard), current_provenance(store, shard))
        if reason:
            stale[shard] = reason
    return stale
