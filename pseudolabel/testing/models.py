"""Deterministic stand-ins for the detector and segmenter (same interfaces, no torch models).

For downstream tests and offline demos that need plausible, repeatable stage outputs fast; the
worker loads them by name (backend "fake", see :mod:`pseudolabel.models.loading`). Boxes
and scores derive from a hash of (image_id, caption), so results do not depend on batching; about
a quarter of the images get zero candidates. Masks are the ellipses inscribed in the boxes.

Like Grounding DINO, each box records the decoder "query" it came from (``query_indices``): distinct
hash-derived indices in 0..num_queries-1, offset by caption_index * num_queries, so the detector's
output order is deterministic but unrelated to the score order (the both_scores_agree policy scans
in it).
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from pseudolabel.models.interfaces import Candidates, PreparedImage, normalize_caption, phrases_of
from pseudolabel.rle import encode_host_masks


class OutOfMemoryError(RuntimeError):
    """Named like ``torch.cuda.OutOfMemoryError``, which is how workers recognise one."""


def _simulate(seconds_per_image: float, oom_above_batch: int, batch: Sequence[Any]) -> None:
    if oom_above_batch and len(batch) > oom_above_batch:
        raise OutOfMemoryError(f"fake: a batch of {len(batch)} does not fit (limit {oom_above_batch})")
    time.sleep(seconds_per_image * len(batch))


FAKE_WARNING = "fake model: outputs are synthetic (hash-derived), not predictions"


def _rng(*parts: str) -> np.random.Generator:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _describe(model: str, batch_size: int) -> dict[str, Any]:
    return {
        "backend": "fake",
        "model": model,
        "variant": "fake",
        "weights": "fake",
        "smoke_run": True,
        "note": FAKE_WARNING,
        "checkpoint_sha256": None,
        "device": "cpu",
        "precision": "fp32",
        "batch_size": batch_size,
    }


def _prepare(image_id: str, data: bytes) -> PreparedImage:
    with Image.open(io.BytesIO(data)) as image:  # header only: the fakes never look at pixels
        width, height = image.size
    return PreparedImage(image_id, width, height, None)


class FakeDetector:
    num_queries = 900  # as Grounding DINO: query indices per caption are 0..899

    def __init__(
        self,
        *,
        batch_size: int = 8,
        max_boxes_per_caption: int = 3,
        seconds_per_image: float = 0.0,
        oom_above_batch: int = 0,
    ) -> None:
        self.batch_size = batch_size
        self.max_boxes_per_caption = max_boxes_per_caption
        self.seconds_per_image = seconds_per_image  # simulated model time (tests of concurrency, kills)
        self.oom_above_batch = oom_above_batch  # simulated CUDA out-of-memory (tests of retries)

    @classmethod
    def from_spec(cls, spec: Any) -> FakeDetector:
        """From a ``DetectorSpec`` with backend "fake" (see :mod:`pseudolabel.models.loading`)."""
        return cls(
            batch_size=spec.batch_size,
            max_boxes_per_caption=spec.max_boxes_per_caption,
            seconds_per_image=spec.seconds_per_image,
            oom_above_batch=spec.oom_above_batch,
        )

    def describe(self) -> dict[str, Any]:
        return _describe("fake_detector", self.batch_size)

    def prepare(self, image_id: str, data: bytes) -> PreparedImage:
        return _prepare(image_id, data)

    def detect(
        self,
        batch: Sequence[PreparedImage],
        captions: Sequence[str],
        *,
        box_floor: float = 0.05,
        text_floor: float = 0.05,
        max_candidates: int = 300,
    ) -> list[Candidates]:
        _simulate(self.seconds_per_image, self.oom_above_batch, batch)
        return [self._one(item, captions, box_floor, text_floor, max_candidates) for item in batch]

    def _one(
        self,
        item: PreparedImage,
        captions: Sequence[str],
        box_floor: float,
        text_floor: float,
        max_candidates: int,
    ) -> Candidates:
        boxes, box_scores, text_scores, phrases, query_indices = [], [], [], [], []
        for caption_index, caption in enumerate(captions):
            rng = _rng(item.image_id, normalize_caption(caption))
            names = phrases_of(normalize_caption(caption))
            count = int(rng.integers(0, self.max_boxes_per_caption + 1))
            # A separate stream, so boxes and scores are what they were before query indices existed.
            queries = _rng(item.image_id, normalize_caption(caption), "queries").choice(
                self.num_queries, size=count, replace=False
            )
            query_indices.extend(caption_index * self.num_queries + queries)
            for _ in range(count):
                x0, x1 = np.sort(rng.uniform(0, item.width, 2))
                y0, y1 = np.sort(rng.uniform(0, item.height, 2))
                box_score = float(rng.uniform(0.0, 1.0))
                boxes.append([x0, y0, x1, y1])
                box_scores.append(box_score)
                text_scores.append(
                    box_score * float(rng.uniform(0.5, 1.0))
                )  # text_score <= box_score, as for real
                phrases.append(names[int(rng.integers(0, len(names)))])
        found = Candidates(
            item.image_id,
            item.width,
            item.height,
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            box_scores=np.asarray(box_scores, np.float32),
            text_scores=np.asarray(text_scores, np.float32),
            phrases=phrases,
            query_indices=np.asarray(query_indices, np.int32),
        )
        keep = (found.box_scores > box_floor) & (found.text_scores > text_floor)
        return found.take(np.flatnonzero(keep)).top(max_candidates)


class FakeSegmenter:
    def __init__(
        self, *, batch_size: int = 8, seconds_per_image: float = 0.0, oom_above_batch: int = 0
    ) -> None:
        self.batch_size = batch_size
        self.seconds_per_image = seconds_per_image
        self.oom_above_batch = oom_above_batch

    @classmethod
    def from_spec(cls, spec: Any) -> FakeSegmenter:
        """From a ``SegmenterSpec`` with backend "fake" (see :mod:`pseudolabel.models.loading`)."""
        return cls(
            batch_size=spec.batch_size,
            seconds_per_image=spec.seconds_per_image,
            oom_above_batch=spec.oom_above_batch,
        )

    def describe(self) -> dict[str, Any]:
        return _describe("fake_segmenter", self.batch_size)

    def prepare(self, image_id: str, data: bytes) -> PreparedImage:
        return _prepare(image_id, data)

    def segment(
        self, batch: Sequence[PreparedImage], candidates: Sequence[Candidates], *, multimask: bool = False
    ) -> list[Candidates]:
        _simulate(self.seconds_per_image, self.oom_above_batch, batch)
        return [self._one(item, found, multimask) for item, found in zip(batch, candidates, strict=True)]

    def _one(self, item: PreparedImage, found: Candidates, multimask: bool) -> Candidates:
        boxes = np.asarray(found.boxes, np.float32).reshape(-1, 4)
        ys, xs = np.mgrid[0 : item.height, 0 : item.width].astype(np.float32) + 0.5
        masks = np.zeros((len(boxes), item.height, item.width), bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            rx, ry = max((x1 - x0) / 2, 1e-6), max((y1 - y0) / 2, 1e-6)
            masks[i] = ((xs - (x0 + x1) / 2) / rx) ** 2 + ((ys - (y0 + y1) / 2) / ry) ** 2 <= 1.0
        best = np.array(
            [float(_rng(item.image_id, str(box.tolist())).uniform(0.5, 1.0)) for box in boxes], np.float32
        )
        if multimask:
            all_scores = np.stack([best - 0.1, best, best - 0.2], axis=1).astype(np.float32)
            chosen = np.ones(len(boxes), np.int8)
        else:
            all_scores = best.reshape(-1, 1)
            chosen = np.zeros(len(boxes), np.int8)
        return found.with_masks(encode_host_masks(masks), best, chosen, all_scores)


def box_prompts(image_id: str, width: int, height: int, boxes: np.ndarray) -> Candidates:
    """Candidates that are only boxes ((N, 4) xyxy, original pixels): a segmenter's input in tests.
    Scores are 1, phrases "box", query indices 0..N-1."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    ones = np.ones(len(boxes), np.float32)
    return Candidates(
        image_id,
        width,
        height,
        boxes,
        ones,
        ones,
        ["box"] * len(boxes),
        np.arange(len(boxes), dtype=np.int32),
    )
