"""A shard's stored candidates as the label decision reads them: detections, their images, their masks."""

from __future__ import annotations

from pseudolabel import layout
from pseudolabel.labels.relabel import MASK_INPUT_COLUMNS, ShardCandidates, read_detections
from pseudolabel.storage import ObjectStore, read_parquet


def read_candidates(store: ObjectStore, shard: str) -> ShardCandidates:
    """The columns of ``detections``, ``detections.images`` and ``masks`` that re-thresholding needs."""
    detections = read_detections(store.get_bytes(layout.detections(shard)))
    masks = read_parquet(store, layout.masks(shard), columns=MASK_INPUT_COLUMNS).to_pandas()
    images = read_parquet(
        store, layout.detection_images(shard), columns=["image_id", "width", "height"]
    ).to_pandas()
    return ShardCandidates(detections=detections, images=images, masks=masks)
