"""What the evaluation needs from the models, and running them over a set of images.

The real Grounding DINO / SAM2 resources are adapted to these two small protocols; tests use fakes
with known geometry. Candidates are produced once and then re-thresholded many times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from pseudolabel.labels.relabel import Candidates

_DETECTION_REQUIRED = ("x0", "y0", "x1", "y1", "box_score", "text_score", "phrase")
_MASK_REQUIRED = ("candidate_id", "rle_counts", "height", "width", "mask_area", "mask_score")


@dataclass(frozen=True)
class EvalImage:
    """One upright image: its id, encoded bytes (as stored) and RGB pixels (H, W, 3) uint8."""

    image_id: str
    data: bytes
    pixels: np.ndarray

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


class CandidateDetector(Protocol):
    def detect(self, images: Sequence[EvalImage]) -> Sequence[pd.DataFrame]:
        """One DataFrame of DETECTIONS rows per image (boxes xyxy in original pixels), in order.

        ``candidate_id`` and ``query_index`` are optional; with ``query_index`` (the detector's output
        order) the both_scores_agree policy scans in it, as in the pipeline (see ``relabel_shard``)."""
        ...


class CandidateSegmenter(Protocol):
    def segment(self, image: EvalImage, boxes: pd.DataFrame) -> pd.DataFrame:
        """MASKS rows for ``boxes`` (DETECTIONS rows of ``image``), matched by candidate_id."""
        ...


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} is missing columns {missing}")


def run_candidates(
    images: Sequence[EvalImage],
    detector: CandidateDetector,
    segmenter: CandidateSegmenter,
    batch_size: int = 8,
) -> Candidates:
    """Detect and segment every image; returns the same tables the pipeline stores per shard."""
    detection_parts, mask_parts = [], []
    for start in range(0, len(images), batch_size):
        batch = list(images[start : start + batch_size])
        frames = list(detector.detect(batch))
        if len(frames) != len(batch):
            raise ValueError(f"detector returned {len(frames)} results for {len(batch)} images")
        for image, frame in zip(batch, frames, strict=True):
            frame = frame.reset_index(drop=True).copy()
            _require(frame, _DETECTION_REQUIRED, "detector output")
            frame["image_id"] = image.image_id  # the evaluation owns ids, whatever the model echoes
            if "candidate_id" not in frame:
                frame["candidate_id"] = np.arange(len(frame), dtype=np.int32)
            detection_parts.append(frame)
            if len(frame):
                masks = segmenter.segment(image, frame).copy()
                _require(masks, _MASK_REQUIRED, "segmenter output")
                masks["image_id"] = image.image_id
                mask_parts.append(masks)
    image_table = pd.DataFrame(
        {
            "image_id": [i.image_id for i in images],
            "width": [i.width for i in images],
            "height": [i.height for i in images],
            "num_candidates": [len(f) for f in detection_parts],  # one part per image, empty or not
        }
    )
    detections = (
        pd.concat(detection_parts, ignore_index=True)
        if detection_parts
        else pd.DataFrame(columns=["image_id", "candidate_id", *_DETECTION_REQUIRED])
    )
    masks = (
        pd.concat(mask_parts, ignore_index=True)
        if mask_parts
        else pd.DataFrame(columns=["image_id", *_MASK_REQUIRED, "mask_x", "mask_y", "mask_w", "mask_h"])
    )
    for column in ("mask_x", "mask_y", "mask_w", "mask_h"):  # not needed for evaluation
        if column not in masks:
            masks[column] = np.nan
    return Candidates(detections=detections, images=image_table, masks=masks)
