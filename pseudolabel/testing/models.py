"""Deterministic stand-ins for the detector and segmenter (same interfaces, no torch models).

For downstream tests and offline demos that need plausible, repeatable stage outputs fast; the
worker loads them by name (backend "fake", see :mod:`pseudolabel.models.loading`). Boxes
and scores derive from a hash of (image_id, caption), so results do not depend on batching; about
a quarter of the images get zero candidates. Masks are the ellipses inscribed in the boxes,
with a disc added around each object click and cut out around each background click.

Like Grounding DINO, each box records the decoder "query" it came from (``query_indices``): distinct
hash-derived indices in 0..num_queries-1, offset by caption_index * num_queries, so the detector's
output order is deterministic but unrelated to the score order (the both_scores_agree policy scans
in it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pseudolabel.models.interfaces import Candidates, PreparedImage, normalize_caption, phrases_of
from pseudolabel.rle import encode_host_masks

# When set, every forward call of a fake model appends one JSON line to this file: {"model", "pid",
# "images" (the batch's image ids), "oom"}. Tests count the model work a run did across worker processes
# (a killed worker's included): shards recomputed, shards reused.
CALLS_LOG_ENV = "PSEUDOLABEL_FAKE_CALLS_LOG"


class OutOfMemoryError(RuntimeError):
    """Named like ``torch.cuda.OutOfMemoryError``, which is how workers recognise one."""


def _simulate(model: str, seconds_per_image: float, oom_above_batch: int, batch: Sequence[Any]) -> None:
    oom = bool(oom_above_batch and len(batch) > oom_above_batch)
    _log_call(model, batch, oom)
    if oom:
        raise OutOfMemoryError(f"fake: a batch of {len(batch)} does not fit (limit {oom_above_batch})")
    time.sleep(seconds_per_image * len(batch))


def _log_call(model: str, batch: Sequence[Any], oom: bool) -> None:
    path = os.environ.get(CALLS_LOG_ENV)
    if not path:
        return
    record = {"model": model, "pid": os.getpid(), "images": [item.image_id for item in batch], "oom": oom}
    with open(path, "a", encoding="utf-8") as log:  # one short O_APPEND write per call
        log.write(json.dumps(record) + "\n")


def forward_calls(path: str | Path) -> list[dict[str, Any]]:
    """The forward calls logged to ``path`` (see :data:`CALLS_LOG_ENV`), oldest first; [] if none."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
        _simulate("fake_detector", self.seconds_per_image, self.oom_above_batch, batch)
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
        _simulate("fake_segmenter", self.seconds_per_image, self.oom_above_batch, batch)
        return [self._one(item, found, multimask) for item, found in zip(batch, candidates, strict=True)]

    def _one(self, item: PreparedImage, found: Candidates, multimask: bool) -> Candidates:
        """Each mask: the ellipse inscribed in the box (with ``box_prompt`` False the box is the clicks'
        extent, still a plausible region), plus a disc around each object click, minus a disc around
        each background click (radius 5 % of the short side). Box-only candidates: the ellipse alone."""
        boxes = np.asarray(found.boxes, np.float32).reshape(-1, 4)
        ys, xs = np.mgrid[0 : item.height, 0 : item.width].astype(np.float32) + 0.5
        masks = np.zeros((len(boxes), item.height, item.width), bool)
        radius = max(2.0, 0.05 * min(item.height, item.width))
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            rx, ry = max((x1 - x0) / 2, 1e-6), max((y1 - y0) / 2, 1e-6)
            masks[i] = ((xs - (x0 + x1) / 2) / rx) ** 2 + ((ys - (y0 + y1) / 2) / ry) ** 2 <= 1.0
            if found.points is None:
                continue
            for label in (1, 0):  # object clicks add, then background clicks remove
                for x, y in found.points[i][found.point_labels[i] == label]:
                    disc = (xs - x) ** 2 + (ys - y) ** 2 <= radius**2
                    masks[i] = masks[i] | disc if label else masks[i] & ~disc
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


# ---- video: a detector and a tracker that really look at the pixels of simple synthetic scenes ----------


def _colourful(pixels: np.ndarray, min_chroma: int) -> np.ndarray:
    """(H, W) bool: pixels whose channels differ by at least ``min_chroma`` (the shapes, not the grey)."""
    return (pixels.max(axis=2).astype(np.int16) - pixels.min(axis=2)) >= min_chroma


def _hue_groups(pixels: np.ndarray, where: np.ndarray) -> dict[int, np.ndarray]:
    """Colourful pixels within ``where``, grouped by their dominant channel: {channel: (H, W) bool}."""
    colourful = where & _colourful(pixels, BlobDetector.min_chroma)
    dominant = pixels.argmax(axis=2)
    return {int(c): colourful & (dominant == c) for c in np.unique(dominant[colourful])}


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


class BlobDetector:
    """Finds the flat-coloured shapes of synthetic scenes (``pseudolabel.testing.videos``): one box per
    dominant colour channel (so at most a red, a green and a blue object per frame) over the colourful
    pixels of that colour, when there are at least ``min_pixels`` of them.

    Scores derive from the colour: ``box_score`` = chroma / 255 (the channel spread: a saturated red
    scores ~0.8, a dull one low, which tests of thresholds use), ``text_score`` = 0.9 x that; the
    phrase is the caption's first. Deterministic, no model: backend ``fake_blobs``.
    """

    min_chroma = 40
    min_pixels = 12

    def __init__(self, *, batch_size: int = 8) -> None:
        self.batch_size = batch_size

    @classmethod
    def from_spec(cls, spec: Any) -> BlobDetector:
        return cls(batch_size=spec.batch_size)

    def describe(self) -> dict[str, Any]:
        return _describe("fake_blob_detector", self.batch_size)

    def prepare(self, image_id: str, data: bytes) -> PreparedImage:
        pixels = _decode(data)
        return PreparedImage(image_id, pixels.shape[1], pixels.shape[0], pixels)

    def detect(
        self,
        batch: Sequence[PreparedImage],
        captions: Sequence[str],
        *,
        box_floor: float = 0.05,
        text_floor: float = 0.05,
        max_candidates: int = 300,
    ) -> list[Candidates]:
        phrase = phrases_of(normalize_caption(captions[0]))[0]
        return [self._one(item, phrase, box_floor, text_floor, max_candidates) for item in batch]

    def _one(
        self, item: PreparedImage, phrase: str, box_floor: float, text_floor: float, top: int
    ) -> Candidates:
        pixels = item.pixels
        boxes, scores = [], []
        for group in _hue_groups(pixels, np.ones(pixels.shape[:2], bool)).values():
            ys, xs = np.nonzero(group)
            if len(ys) < self.min_pixels:
                continue
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            colour = pixels[ys, xs].astype(np.float32).mean(axis=0)
            scores.append(float(colour.max() - colour.min()) / 255.0)
        scores_array = np.asarray(scores, np.float32)
        found = Candidates(
            item.image_id,
            item.width,
            item.height,
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            box_scores=scores_array,
            text_scores=scores_array * 0.9,
            phrases=[phrase] * len(boxes),
            query_indices=np.arange(len(boxes), dtype=np.int32),
        )
        keep = (found.box_scores > box_floor) & (found.text_scores > text_floor)
        return found.take(np.flatnonzero(keep)).top(top)


class FakeTracker:
    """Follows a prompted object by its colour (backend ``fake``; see ``pseudolabel.video.tracking``).

    A prompt (box or mask) fixes the object's colour: the mean of the colourful pixels it covers of
    the dominant colour most of them share (so a box overlapping another shape still picks its own). On
    each following frame (in either direction) the mask is every pixel within ``tolerance`` of that
    colour inside the previous mask's bbox grown by ``margin`` (a fraction of its size, at least 4 px),
    so it follows a shape that moves less than that per frame and vanishes when the shape leaves.
    Score: 1 - mean colour distance / (2 x tolerance). Frames are decoded on demand and kept until
    ``reset``; ``max_live_frames`` records the most ever held at once (tests of bounded memory).
    """

    def __init__(self, *, tolerance: float = 60.0, margin: float = 0.5) -> None:
        self.tolerance = tolerance
        self.margin = margin
        self.max_live_frames = 0
        self.windows = 0  # init calls
        self._paths: list[Path] = []
        self._frames: dict[int, np.ndarray] = {}
        self._prompts: dict[int, tuple[int, np.ndarray]] = {}  # track_id -> (frame, mask)

    @classmethod
    def from_spec(cls, spec: Any) -> FakeTracker:
        return cls()

    def describe(self) -> dict[str, Any]:
        return _describe("fake_tracker", 1) | {"tolerance": self.tolerance, "margin": self.margin}

    def init(self, frames_dir: str) -> None:
        self.reset()
        self.windows += 1
        self._paths = sorted(Path(frames_dir).glob("*.jpg"), key=lambda p: int(p.stem))

    def _frame(self, index: int) -> np.ndarray:
        if index not in self._frames:
            self._frames[index] = _decode(self._paths[index].read_bytes())
            self.max_live_frames = max(self.max_live_frames, len(self._frames))
        return self._frames[index]

    def add_box(self, frame: int, track_id: int, box: np.ndarray) -> None:
        height, width = self._frame(frame).shape[:2]
        x0, y0, x1, y1 = np.round(np.asarray(box, np.float64)).astype(int).tolist()
        mask = np.zeros((height, width), bool)
        mask[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
        self.add_mask(frame, track_id, mask)

    def add_mask(self, frame: int, track_id: int, mask: np.ndarray) -> None:
        self._prompts[track_id] = (frame, np.asarray(mask, bool))

    def propagate(self, start: int, *, reverse: bool = False) -> Iterator[Any]:
        from pseudolabel.video.tracking import TrackedFrame

        ids = sorted(self._prompts)
        colours = {}
        for track_id in ids:
            frame, region = self._prompts[track_id]
            pixels = self._frame(frame)
            groups = sorted(_hue_groups(pixels, region).values(), key=lambda g: -int(g.sum()))
            colours[track_id] = pixels[groups[0]].astype(np.float32).mean(axis=0) if groups else None
        previous = {track_id: self._prompts[track_id][1] for track_id in ids}
        order = range(start, -1, -1) if reverse else range(start, len(self._paths))
        for index in order:
            pixels = self._frame(index).astype(np.float32)
            masks, scores = [], []
            for track_id in ids:
                mask, score = self._follow(pixels, previous[track_id], colours[track_id])
                previous[track_id] = mask
                masks.append(mask)
                scores.append(score)
            stacked = np.stack(masks) if masks else np.zeros((0, *pixels.shape[:2]), bool)
            yield TrackedFrame(index, ids, encode_host_masks(stacked), np.asarray(scores, np.float32))

    def _follow(
        self, pixels: np.ndarray, previous: np.ndarray, colour: np.ndarray | None
    ) -> tuple[np.ndarray, float]:
        mask = np.zeros(pixels.shape[:2], bool)
        if colour is None or not previous.any():
            return mask, 0.0
        ys, xs = np.nonzero(previous)
        grow_y = max(4, int(self.margin * (ys.max() - ys.min() + 1)))
        grow_x = max(4, int(self.margin * (xs.max() - xs.min() + 1)))
        y0, y1 = max(0, ys.min() - grow_y), ys.max() + 1 + grow_y
        x0, x1 = max(0, xs.min() - grow_x), xs.max() + 1 + grow_x
        distance = np.linalg.norm(pixels[y0:y1, x0:x1] - colour, axis=2)
        mask[y0:y1, x0:x1] = distance < self.tolerance
        if not mask.any():
            return mask, 0.0
        return mask, float(1.0 - distance[mask[y0:y1, x0:x1]].mean() / (2 * self.tolerance))

    def reset(self) -> None:
        self._frames.clear()
        self._prompts.clear()
        self._paths = []
