"""Synthetic test images and shards of them."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter

from pseudolabel import layout, schemas
from pseudolabel.ids import sha256_hex
from pseudolabel.storage import ObjectStore, write_parquet


def random_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A smooth random RGB JPEG (blurred noise compresses like a photo, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    image = image.filter(ImageFilter.GaussianBlur(2))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_image_shard(
    store: ObjectStore, shard: str, sizes: Sequence[tuple[int, int]], seed: int = 0, quarantined: int = 0
) -> list[str]:
    """A shard as ``normalized_images`` leaves it: one "ok" JPEG per size plus its IMAGE_INDEX rows, and
    ``quarantined`` rows without an image. Returns the ok image ids (``<seed:04x><n:012x>``, so shards
    of different seeds never share one)."""
    rows = []
    for i, (width, height) in enumerate(sizes):
        image_id = f"{seed:04x}{i:012x}"
        data = random_jpeg(width, height, seed=seed * 100 + i)
        store.put_bytes(layout.image(shard, image_id), data)
        rows.append(
            dict(
                image_id=image_id,
                url=f"http://x/{image_id}.jpg",
                label="plant",
                width=width,
                height=height,
                original_orientation=1,
                bytes=len(data),
                sha256=sha256_hex(data),
                status="ok",
                error=None,
            )
        )
    ok = [row["image_id"] for row in rows]
    for n in range(quarantined):
        image_id = f"ffff{seed:04x}{n:08x}"  # sorts after every ok image of the shard
        rows.append(
            dict(
                image_id=image_id,
                url=f"http://x/{image_id}.jpg",
                label="plant",
                width=0,
                height=0,
                original_orientation=1,
                bytes=0,
                sha256="",
                status="quarantined",
                error="not an image",
            )
        )
    write_parquet(store, layout.image_index(shard), pa.Table.from_pylist(rows, schema=schemas.IMAGE_INDEX))
    return ok


def materialize_images(storage_resource: Any, shard: str, *shards: str, **config: Any):
    """``normalized_images`` for ``shard`` in process (no download retries unless asked: failing items
    must not sleep through backoff); ``shards`` are further partitions to register."""
    from dagster import DagsterInstance, RunConfig, materialize

    from assets.normalized_images import NormalizedImagesConfig, normalized_images

    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", [shard, *shards])
    return materialize(
        [normalized_images],
        partition_key=shard,
        resources={"storage": storage_resource},
        instance=instance,
        run_config=RunConfig(
            ops={"normalized_images": NormalizedImagesConfig(**{"max_retries": 0, **config})}
        ),
        raise_on_error=False,
    )


def images_metadata(result) -> dict:
    (materialization,) = result.asset_materializations_for_node("normalized_images")
    return {key: value.value for key, value in materialization.metadata.items()}
