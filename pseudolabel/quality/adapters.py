"""Adapt the pipeline's GPU-stage models to the evaluation protocols in :mod:`.candidates`.

Duck-typed over the stage interfaces (``prepare(image_id, data)``, ``detect(batch, captions, ...)``
returning per-image boxes/scores/phrases, ``segment(batch, boxes, multimask=...)`` returning RLE
masks + scores), so this module imports no model code. Models are created lazily through
factories, so binding an adapter as a Dagster resource loads no checkpoint until the evaluation runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from pseudolabel.quality.candidates import EvalImage


class StageModelCandidates:
    """Both evaluation protocols (``detect`` and ``segment``) over the stage models.

    ``captions`` are Grounding DINO captions (e.g. ``["plant ."]``); the floors should be at or
    below the lowest threshold the sweep explores, since candidates under them never exist.
    """

    def __init__(
        self,
        detector: Callable[[], Any],
        segmenter: Callable[[], Any],
        captions: Sequence[str],
        *,
        box_floor: float = 0.05,
        text_floor: float = 0.05,
        max_candidates: int = 300,
        multimask: bool = True,
    ):
        self._detector_factory = detector
        self._segmenter_factory = segmenter
        self.captions = list(captions)
        self.box_floor = box_floor
        self.text_floor = text_floor
        self.max_candidates = max_candidates
        self.multimask = multimask

    @cached_property
    def detector(self) -> Any:
        return self._detector_factory()

    @cached_property
    def segmenter(self) -> Any:
        return self._segmenter_factory()

    def detect(self, images: Sequence[EvalImage]) -> list[pd.DataFrame]:
        prepared = [self.detector.prepare(image.image_id, image.data) for image in images]
        found = self.detector.detect(
            prepared,
            self.captions,
            box_floor=self.box_floor,
            text_floor=self.text_floor,
            max_candidates=self.max_candidates,
        )
        frames = []
        for result in found:
            boxes = np.asarray(result.boxes, dtype=np.float32).reshape(-1, 4)
            frame = pd.DataFrame(
                {
                    "candidate_id": np.arange(len(boxes), dtype=np.int32),
                    "x0": boxes[:, 0],
                    "y0": boxes[:, 1],
                    "x1": boxes[:, 2],
                    "y1": boxes[:, 3],
                    "box_score": np.asarray(result.box_scores, dtype=np.float32),
                    "text_score": np.asarray(result.text_scores, dtype=np.float32),
                    "phrase": list(result.phrases),
                }
            )
            # The detector's output order: both_scores_agree scans in it, as in the pipeline.
            query_indices = getattr(result, "query_indices", None)
            if query_indices is not None:
                frame["query_index"] = np.asarray(query_indices, dtype=np.int32)
            frames.append(frame)
        return frames

    def segment(self, image: EvalImage, boxes: pd.DataFrame) -> pd.DataFrame:
        prepared = self.segmenter.prepare(image.image_id, image.data)
        xyxy = boxes[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.float32)
        (result,) = self.segmenter.segment([prepared], [xyxy], multimask=self.multimask)
        masks = result.masks
        return pd.DataFrame(
            {
                "candidate_id": boxes["candidate_id"].to_numpy(),
                "rle_counts": list(masks.counts),
                "height": masks.height,
                "width": masks.width,
                "mask_area": np.asarray(masks.areas, dtype=np.int64),
                "mask_score": np.asarray(result.scores, dtype=np.float32),
            }
        )
