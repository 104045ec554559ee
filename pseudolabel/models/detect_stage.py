"""The detections stage for one shard: images -> every Grounding DINO candidate above the floors.

The floors are deliberately low (0.05) and every surviving candidate is stored with its scores, so
the thresholds applied downstream can move anywhere above the floors without touching the GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from pseudolabel import schemas
from pseudolabel.models.captions import captions_for
from pseudolabel.models.fingerprint import fingerprint, model_identity, with_fingerprint
from pseudolabel.models.interfaces import Detector, ImageDetections
from pseudolabel.models.prefetch import prefetched_batches

STAGE_VERSION = "detections/2"  # bump when the stored content's meaning changes (2: + query_index)


@dataclass(frozen=True)
class DetectionSettings:
    prompt: str = "plant ."
    one_prompt_per_class: bool = False  # run "a . b ." as "a ." and "b ." and merge
    box_floor: float = 0.05
    text_floor: float = 0.05
    max_candidates: int = 300  # per image; images that hit it are counted in the result

    def captions(self) -> list[str]:
        return captions_for(self.prompt, self.one_prompt_per_class)


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    width: int
    height: int
    sha256: str = ""


def ok_images(index: pa.Table) -> list[ImageRef]:
    """Rows of an IMAGE_INDEX table with status "ok", sorted by image_id."""
    rows = index.select(["image_id", "width", "height", "sha256", "status"]).to_pylist()
    refs = [
        ImageRef(r["image_id"], int(r["width"] or 0), int(r["height"] or 0), r["sha256"] or "")
        for r in rows
        if r["status"] == "ok"
    ]
    return sorted(refs, key=lambda ref: ref.image_id)


def detection_fingerprint(images: Sequence[ImageRef], settings: DetectionSettings, model: dict) -> str:
    return fingerprint(
        {
            "stage": STAGE_VERSION,
            "images": [(ref.image_id, ref.sha256) for ref in images],
            "settings": asdict(settings),
            "model": model_identity(model),
        }
    )


@dataclass(frozen=True)
class DetectionResult:
    images: list[ImageDetections]  # one per input image, sorted by image_id
    seconds: float
    max_candidates: int

    @property
    def num_candidates(self) -> int:
        return sum(len(found) for found in self.images)

    @property
    def zero_candidate_images(self) -> int:
        return sum(1 for found in self.images if len(found) == 0)

    @property
    def capped_images(self) -> int:
        """Images whose candidate list was cut at max_candidates (thresholds below their last score are lossy)."""
        return sum(1 for found in self.images if len(found) >= self.max_candidates)

    def detections_table(self, fingerprint_value: str) -> pa.Table:
        """DETECTIONS: one row per candidate, by (image_id, box_score desc); candidate_id = rank in image,
        query_index = the detector's output order (see ``schemas.DETECTIONS``)."""
        found = self.images
        counts = [len(f) for f in found]
        boxes = (
            np.concatenate([f.boxes for f in found]).reshape(-1, 4) if found else np.zeros((0, 4), np.float32)
        )
        columns = {
            "image_id": [f.image_id for f in found for _ in range(len(f))],
            "candidate_id": np.concatenate([np.arange(n, dtype=np.int32) for n in counts]) if found else [],
            "x0": boxes[:, 0],
            "y0": boxes[:, 1],
            "x1": boxes[:, 2],
            "y1": boxes[:, 3],
            "box_score": np.concatenate([f.box_scores for f in found]) if found else [],
            "text_score": np.concatenate([f.text_scores for f in found]) if found else [],
            "phrase": [p for f in found for p in f.phrases],
            "query_index": np.concatenate([f.query_indices for f in found]).astype(np.int32) if found else [],
        }
        return with_fingerprint(pa.table(columns, schema=schemas.DETECTIONS), fingerprint_value)

    def images_table(self, fingerprint_value: str) -> pa.Table:
        """DETECTION_IMAGES: one row per image, zero-candidate images included."""
        columns = {
            "image_id": [f.image_id for f in self.images],
            "width": [f.width for f in self.images],
            "height": [f.height for f in self.images],
            "num_candidates": [len(f) for f in self.images],
        }
        return with_fingerprint(pa.table(columns, schema=schemas.DETECTION_IMAGES), fingerprint_value)


def run_detection(
    images: Sequence[ImageRef],
    read_image: Callable[[str], bytes],
    detector: Detector,
    settings: DetectionSettings,
    *,
    workers: int = 4,
) -> DetectionResult:
    """Detect on every image: CPU workers read + decode + resize ahead while the model runs a batch."""
    started = time.perf_counter()
    captions = settings.captions()
    # Similar aspect ratios share a batch, so padding to the batch's largest image wastes little.
    order = sorted(images, key=lambda ref: (ref.height / ref.width if ref.width else 1.0, ref.image_id))

    def load(ref: ImageRef):
        try:
            return detector.prepare(ref.image_id, read_image(ref.image_id))
        except Exception as exc:
            raise RuntimeError(f"image {ref.image_id}: {exc}") from exc

    found: dict[str, ImageDetections] = {}
    for batch in prefetched_batches(order, load, detector.batch_size, workers):
        for result in detector.detect(
            batch,
            captions,
            box_floor=settings.box_floor,
            text_floor=settings.text_floor,
            max_candidates=settings.max_candidates,
        ):
            found[result.image_id] = result
    ordered = [found[ref.image_id] for ref in sorted(images, key=lambda ref: ref.image_id)]
    return DetectionResult(ordered, time.perf_counter() - started, settings.max_candidates)
