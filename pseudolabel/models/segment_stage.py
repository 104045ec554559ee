"""The masks stage for one shard: every detection candidate -> a SAM2 mask as COCO RLE.

Every candidate above the detection floors gets a mask, so later threshold changes select among
stored masks instead of re-running SAM2.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from pseudolabel import schemas
from pseudolabel.models.fingerprint import fingerprint, model_identity, with_fingerprint
from pseudolabel.models.interfaces import ImageMasks, PreparedImage, Segmenter
from pseudolabel.models.prefetch import prefetched_batches

STAGE_VERSION = "masks/1"


@dataclass(frozen=True)
class SegmentationSettings:
    multimask: bool = False  # 3 masks per box, keep the best predicted IoU, store all 3 scores


@dataclass(frozen=True)
class ImageBoxes:
    """One image's candidates from the detections stage, in candidate_id order."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 xyxy, original pixels


def boxes_per_image(detections: pa.Table, images: pa.Table) -> list[ImageBoxes]:
    """Join DETECTIONS onto DETECTION_IMAGES; zero-candidate images get an empty (0, 4) array."""
    frame = detections.select(["image_id", "candidate_id", "x0", "y0", "x1", "y1"]).to_pandas()
    frame = frame.sort_values(["image_id", "candidate_id"], kind="stable")
    grouped = {
        image_id: group[["x0", "y0", "x1", "y1"]].to_numpy(np.float32)
        for image_id, group in frame.groupby("image_id", sort=False)
    }
    result = []
    for row in sorted(
        images.select(["image_id", "width", "height"]).to_pylist(), key=lambda r: r["image_id"]
    ):
        boxes = grouped.get(row["image_id"], np.zeros((0, 4), np.float32))
        result.append(ImageBoxes(row["image_id"], int(row["width"]), int(row["height"]), boxes))
    return result


def segmentation_fingerprint(detections_sha256: str, settings: SegmentationSettings, model: dict) -> str:
    return fingerprint(
        {
            "stage": STAGE_VERSION,
            "detections": detections_sha256,
            "settings": asdict(settings),
            "model": model_identity(model),
        }
    )


@dataclass(frozen=True)
class SegmentationResult:
    masks: list[ImageMasks]  # images with >= 1 candidate, sorted by image_id
    num_images: int  # all images of the shard, zero-candidate ones included
    seconds: float

    @property
    def num_masks(self) -> int:
        return sum(len(m.masks) for m in self.masks)

    @property
    def zero_candidate_images(self) -> int:
        return self.num_images - len(self.masks)

    def table(self, fingerprint_value: str) -> pa.Table:
        """MASKS: one row per candidate, same (image_id, candidate_id) order as DETECTIONS."""
        rows: dict[str, list] = {name: [] for name in schemas.MASKS.names}
        for item in self.masks:
            encoded = item.masks
            n = len(encoded)
            rows["image_id"] += [item.image_id] * n
            rows["candidate_id"] += list(range(n))
            rows["rle_counts"] += encoded.counts
            rows["height"] += [encoded.height] * n
            rows["width"] += [encoded.width] * n
            rows["mask_area"] += encoded.areas.tolist()
            for column, values in zip(
                ("mask_x", "mask_y", "mask_w", "mask_h"), encoded.bboxes.T, strict=True
            ):
                rows[column] += values.tolist()
            rows["mask_score"] += item.scores.tolist()
            rows["multimask_index"] += item.chosen.tolist()
            rows["multimask_scores"] += [scores.tolist() for scores in item.all_scores]
        return with_fingerprint(pa.table(rows, schema=schemas.MASKS), fingerprint_value)


def run_segmentation(
    images: Sequence[ImageBoxes],
    read_image: Callable[[str], bytes],
    segmenter: Segmenter,
    settings: SegmentationSettings,
    *,
    workers: int = 4,
) -> SegmentationResult:
    """Segment every candidate box; zero-candidate images are not even decoded."""
    started = time.perf_counter()
    todo = sorted((ref for ref in images if len(ref.boxes)), key=lambda ref: ref.image_id)
    by_id = {ref.image_id: ref for ref in todo}

    def load(ref: ImageBoxes) -> PreparedImage:
        try:
            prepared = segmenter.prepare(ref.image_id, read_image(ref.image_id))
        except Exception as exc:
            raise RuntimeError(f"image {ref.image_id}: {exc}") from exc
        if (prepared.width, prepared.height) != (ref.width, ref.height):
            # Boxes are in the detection stage's pixel frame; a different image would misplace every mask.
            raise RuntimeError(
                f"image {ref.image_id} is {prepared.width}x{prepared.height} but its detections were made on "
                f"{ref.width}x{ref.height}; re-run detections for this shard"
            )
        return prepared

    results: list[ImageMasks] = []
    for batch in prefetched_batches(todo, load, segmenter.batch_size, workers):
        results += segmenter.segment(
            batch, [by_id[item.image_id].boxes for item in batch], multimask=settings.multimask
        )
    return SegmentationResult(results, len(images), time.perf_counter() - started)
