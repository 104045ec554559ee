"""``masks``: a SAM2 mask (COCO RLE) for every detection candidate of a shard (GPU)."""

import io

import pyarrow.parquet as pq
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset

from dagster_project.policies import gpu_shard_asset_args
from pseudolabel import layout
from pseudolabel.ids import sha256_hex
from pseudolabel.markdown import markdown_image
from pseudolabel.models.fingerprint import up_to_date
from pseudolabel.models.overlay import draw_masks
from pseudolabel.models.report import model_metadata, throughput
from pseudolabel.models.segment_stage import (
    SegmentationSettings,
    boxes_per_image,
    run_segmentation,
    segmentation_fingerprint,
)
from pseudolabel.storage import read_parquet, write_parquet
from resources.models import SegmenterResource
from resources.storage import StorageResource

PREVIEW_MASKS = 10


class MasksConfig(Config):
    multimask: bool = False  # 3 masks per box; keep the best predicted IoU, store all 3 scores
    skip_if_up_to_date: bool = False  # skip when the stored output has the same fingerprint


@asset(
    **gpu_shard_asset_args(),
    deps=["detections"],
    kinds={"pytorch", "parquet"},
)
def masks(
    context: AssetExecutionContext,
    config: MasksConfig,
    storage: StorageResource,
    segmenter: SegmenterResource,
) -> MaterializeResult:
    """One SAM2 mask per detection candidate (box prompt), as COCO RLE with area, bbox and predicted IoU
    (masks/<shard>.parquet)."""
    shard = context.partition_key
    store = storage.store()
    detections_bytes = store.get_bytes(layout.detections(shard))
    detections = pq.read_table(io.BytesIO(detections_bytes))
    images = read_parquet(store, layout.detection_images(shard))
    settings = SegmentationSettings(multimask=config.multimask)
    identity = segmenter.describe()
    fingerprint = segmentation_fingerprint(sha256_hex(detections_bytes), settings, identity)
    key = layout.masks(shard)
    if config.skip_if_up_to_date and up_to_date(store, [key], fingerprint):
        context.log.info(f"{shard}: masks up to date ({fingerprint[:12]}), skipped")
        return MaterializeResult(
            metadata={"skipped": True, "fingerprint": fingerprint, "path": MetadataValue.path(store.uri(key))}
        )

    result = run_segmentation(
        boxes_per_image(detections, images),
        lambda image_id: store.get_bytes(layout.image(shard, image_id)),
        segmenter.segmenter(),
        settings,
        workers=segmenter.num_workers,
    )
    write_parquet(store, key, result.table(fingerprint))

    metadata = {
        "images": result.num_images,
        "candidates": result.num_masks,
        "zero_candidate_images": result.zero_candidate_images,
        "img_per_s": throughput(result.num_images - result.zero_candidate_images, result.seconds),
        "seconds": round(result.seconds, 3),
        "multimask": settings.multimask,
        **model_metadata(identity),
        "fingerprint": fingerprint,
        "skipped": False,
        "path": MetadataValue.path(store.uri(key)),
    }
    if result.masks:
        first = result.masks[0]
        counts = first.masks.counts[:PREVIEW_MASKS]
        png = draw_masks(
            store.get_bytes(layout.image(shard, first.image_id)),
            counts,
            first.masks.height,
            first.masks.width,
        )
        metadata["preview"] = MetadataValue.md(
            markdown_image(png, f"{first.image_id}: top {len(counts)} masks")
        )
    return MaterializeResult(metadata=metadata)
