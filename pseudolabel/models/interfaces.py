"""What the detection and mask stages need from a model: the real ones and the fakes alike.

A model splits its work in two: ``prepare`` (CPU, thread-safe: decode + resize one image, run in
background workers) and ``detect``/``segment`` (one batch on the accelerator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pseudolabel.rle import EncodedMasks


@dataclass(frozen=True)
class PreparedImage:
    """One decoded image, resized for a model. ``width``/``height`` are the ORIGINAL size."""

    image_id: str
    width: int
    height: int
    pixels: Any  # model-specific: e.g. a (3, h, w) uint8 tensor


@dataclass(frozen=True)
class ImageDetections:
    """All candidates of one image, sorted by ``box_scores`` descending.

    ``query_indices`` records the order the detector emitted them in (what Grounding DINO's
    ``predict`` returns: decoder query order, see ``schemas.DETECTIONS.query_index``), which the
    ``both_scores_agree`` pick policy scans in.
    """

    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32, xyxy in original-image pixels
    box_scores: np.ndarray  # (N,) float32
    text_scores: np.ndarray  # (N,) float32
    phrases: list[str]
    query_indices: np.ndarray  # (N,) int32, unique within the image

    def __len__(self) -> int:
        return len(self.phrases)


@dataclass(frozen=True)
class ImageMasks:
    """One mask per input box of one image, in box order."""

    image_id: str
    masks: EncodedMasks  # RLE at the original size
    scores: np.ndarray  # (N,) float32: predicted IoU of the chosen mask
    chosen: np.ndarray  # (N,) int8: index of the chosen mask among the outputs (0 without multimask)
    all_scores: np.ndarray  # (N, K) float32: predicted IoU of every output (K = 3 with multimask, else 1)


class Detector(Protocol):
    batch_size: int

    def describe(self) -> dict[str, Any]:
        """Model identity for metadata and fingerprints (variant, checkpoint sha256, device, ...)."""
        ...

    def prepare(self, image_id: str, data: bytes) -> PreparedImage: ...

    def detect(
        self,
        batch: Sequence[PreparedImage],
        captions: Sequence[str],
        *,
        box_floor: float,
        text_floor: float,
        max_candidates: int,
    ) -> list[ImageDetections]:
        """Candidates of every caption, merged per image and sorted by box score."""
        ...


class Segmenter(Protocol):
    batch_size: int

    def describe(self) -> dict[str, Any]: ...

    def prepare(self, image_id: str, data: bytes) -> PreparedImage: ...

    def segment(
        self, batch: Sequence[PreparedImage], boxes: Sequence[np.ndarray], *, multimask: bool
    ) -> list[ImageMasks]:
        """``boxes[i]`` is (N_i, 4) xyxy in original pixels of ``batch[i]``; one mask per box."""
        ...
