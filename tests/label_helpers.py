"""Shards as the GPU stages leave them in storage, for tests of the label, review and dataset assets."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from pseudolabel import layout
from pseudolabel.storage import write_parquet
from pseudolabel.testing.labels import synthetic_candidates

SHARDS = ["shard-00000", "shard-00001"]
H, W = 96, 128


def seed_shard(store, shard: str, images: int, seed: int) -> None:
    """What the images / detections / masks stages leave in storage for one shard."""
    data = synthetic_candidates(
        images, candidates_per_image=4.0, height=H, width=W, seed=seed, id_prefix=f"{shard}-"
    )
    write_parquet(store, layout.detections(shard), data.detections)
    write_parquet(store, layout.masks(shard), data.masks)
    write_parquet(store, layout.detection_images(shard), data.images)
    write_provenance(store, shard, detector="fake/caption", segmenter="fake/blobs", seed=seed)
    ids = data.images["image_id"]
    write_parquet(
        store,
        layout.image_index(shard),
        pd.DataFrame(
            {
                "image_id": ids,
                "url": "https://example.com/" + ids + ".jpg",
                "label": np.where(np.arange(len(ids)) % 3, "cat", "dog"),
                "width": W,
                "height": H,
                "sha256": "sha-" + ids,
                "status": "ok",
            }
        ),
    )
    for n, image_id in enumerate(ids):
        pixels = np.full((H, W, 3), (n * 7) % 255, np.uint8)
        store.put_bytes(layout.image(shard, image_id), cv2.imencode(".jpg", pixels)[1].tobytes())


def write_provenance(store, shard: str, *, detector: str, segmenter: str, seed: int = 0) -> None:
    """The sidecars a model worker writes before the detections and masks (what made them)."""
    for key, model in ((layout.detections(shard), detector), (layout.masks(shard), segmenter)):
        backend, variant = model.split("/")
        store.put_json(
            layout.provenance(key),
            {"backend": backend, "model": backend, "variant": variant, "fingerprint": f"{model}-{seed}"},
        )
