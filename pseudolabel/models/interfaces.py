"""What the stages and the models exchange: captions in, :class:`Candidates` out.

A model splits its work in two: ``prepare`` (CPU, thread-safe: decode + resize one image, run in
background workers) and ``detect``/``segment`` (one batch on the accelerator). A detector returns
one :class:`Candidates` per image; a segmenter takes them and returns them with one mask per box.
The same type is read back from, and written to, the stage tables (``schemas.DETECTIONS``,
``DETECTION_IMAGES``, ``MASKS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from pseudolabel import schemas
from pseudolabel.rle import EncodedMasks

# ---- prompts: Grounding DINO's caption convention ---------------------------------------------


def normalize_caption(text: str) -> str:
    """Lower case, single spaces, ending in '.' (phrases are separated by ' . ')."""
    caption = " ".join(text.lower().split())
    if not caption.strip(" ."):
        raise ValueError(f"prompt has no words: {text!r}")
    return caption if caption.endswith(".") else caption + " ."


def split_caption(text: str) -> list[str]:
    """One caption per class: ``"plant . flower ."`` -> ``["plant .", "flower ."]``."""
    captions = [normalize_caption(part) for part in text.split(".") if part.strip()]
    if not captions:
        raise ValueError(f"prompt has no words: {text!r}")
    return captions


def captions_for(prompt: str, one_prompt_per_class: bool) -> list[str]:
    """The captions a detection run uses: the whole prompt, or one per class to merge afterwards."""
    return split_caption(prompt) if one_prompt_per_class else [normalize_caption(prompt)]


def phrases_of(caption: str) -> list[str]:
    """``"potted plant . flower ."`` -> ``["potted plant", "flower"]``."""
    return [part.strip() for part in caption.split(".") if part.strip()]


# ---- one image in, one image's candidates out ---------------------------------------------------


@dataclass(frozen=True)
class PreparedImage:
    """One decoded image, resized for a model. ``width``/``height`` are the ORIGINAL size."""

    image_id: str
    width: int
    height: int
    pixels: Any  # model-specific: e.g. a (3, h, w) uint8 tensor
    url: str = ""  # the image's source URL when known (ImageRef.url)


@dataclass(frozen=True)
class Candidates:
    """The N candidate objects of one image, from the detector through the segmenter to the tables.

    A candidate's segmenter prompt is its box, its clicks (``points`` with ``point_labels``), or both:
    ``box_prompt[i]`` False leaves the box out (it is then only the extent of the clicks). Rows with
    fewer clicks than P are padded with label -1.

    Row i is stored as ``candidate_id`` i: a detector returns them sorted by ``box_scores``
    descending. ``query_indices`` is the order the detector emitted them in (Grounding DINO's
    decoder query order, see ``schemas.DETECTIONS.query_index``), which the ``both_scores_agree``
    pick policy scans in. The mask fields are None until a segmenter adds them (:meth:`with_masks`).
    """

    image_id: str
    width: int  # original image size: the frame of every box and mask
    height: int
    boxes: np.ndarray  # (N, 4) float32, xyxy in original-image pixels
    box_scores: np.ndarray  # (N,) float32
    text_scores: np.ndarray  # (N,) float32
    phrases: list[str]  # (N,)
    query_indices: np.ndarray  # (N,) int32, unique within the image
    # Segmenter prompts beyond the box (None = box prompts only, the detectors' case):
    points: np.ndarray | None = None  # (N, P, 2) float32 clicks in original-image pixels
    point_labels: np.ndarray | None = None  # (N, P) int8: 1 object, 0 background, -1 padding (no click)
    box_prompt: np.ndarray | None = None  # (N,) bool: False = the box is not a prompt (clicks only)
    masks: EncodedMasks | None = None  # N RLE masks at (height, width)
    mask_scores: np.ndarray | None = None  # (N,) float32: predicted IoU of the chosen mask
    multimask_index: np.ndarray | None = None  # (N,) int8: index of the chosen output (0 without multimask)
    multimask_scores: np.ndarray | None = None  # (N, K) float32: every output's IoU (K = 3 multimask, else 1)

    def __len__(self) -> int:
        return len(self.phrases)

    @staticmethod
    def empty(image_id: str, width: int, height: int) -> Candidates:
        return Candidates(
            image_id,
            width,
            height,
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.float32),
            [],
            np.zeros(0, np.int32),
        )

    @staticmethod
    def concat(parts: Sequence[Candidates]) -> Candidates:
        """Candidates of one image found separately (e.g. one caption each), in order, without masks."""
        first = parts[0]
        if any((p.image_id, p.width, p.height) != (first.image_id, first.width, first.height) for p in parts):
            raise ValueError("concat joins candidates of one image only")
        return Candidates(
            first.image_id,
            first.width,
            first.height,
            boxes=np.concatenate([p.boxes for p in parts]).astype(np.float32).reshape(-1, 4),
            box_scores=np.concatenate([p.box_scores for p in parts]).astype(np.float32),
            text_scores=np.concatenate([p.text_scores for p in parts]).astype(np.float32),
            phrases=[phrase for p in parts for phrase in p.phrases],
            query_indices=np.concatenate([p.query_indices for p in parts]).astype(np.int32),
            **_concat_prompts(parts),
        )

    @property
    def has_clicks(self) -> bool:
        return self.point_labels is not None and bool((self.point_labels >= 0).any())

    def box_prompts(self) -> np.ndarray:
        """(N,) bool: which boxes are given to the segmenter."""
        return np.ones(len(self), bool) if self.box_prompt is None else self.box_prompt.astype(bool)

    def with_prompts(
        self, points: np.ndarray | None, point_labels: np.ndarray | None, box_prompt: np.ndarray | None = None
    ) -> Candidates:
        """These candidates with clicks (``(N, P, 2)`` points, ``(N, P)`` labels) and/or box-prompt flags."""
        n = len(self)
        if (points is None) != (point_labels is None):
            raise ValueError("points and point_labels go together")
        if points is not None:
            points = np.asarray(points, np.float32).reshape(n, -1, 2)
            point_labels = np.asarray(point_labels, np.int8).reshape(n, -1)
            if point_labels.shape != points.shape[:2]:
                raise ValueError(f"{points.shape[1]} points per candidate but labels {point_labels.shape}")
            if not np.isin(point_labels, (-1, 0, 1)).all():
                raise ValueError("point labels are 1 (object), 0 (background) or -1 (padding)")
        if box_prompt is not None:
            box_prompt = np.asarray(box_prompt, bool).reshape(n)
            clicks = (point_labels >= 0).any(axis=1) if point_labels is not None else np.zeros(n, bool)
            if (~box_prompt & ~clicks).any():
                raise ValueError("a candidate without a box prompt needs at least one click")
        return replace(self, points=points, point_labels=point_labels, box_prompt=box_prompt)

    def take(self, order: np.ndarray) -> Candidates:
        """The candidates at ``order`` (M,) indices, in that order, masks included."""
        order = np.asarray(order, np.int64)
        pick = lambda values: None if values is None else values[order]  # noqa: E731
        return replace(
            self,
            boxes=self.boxes[order].reshape(-1, 4),
            box_scores=self.box_scores[order],
            text_scores=self.text_scores[order],
            phrases=[self.phrases[i] for i in order],
            query_indices=self.query_indices[order],
            points=pick(self.points),
            point_labels=pick(self.point_labels),
            box_prompt=pick(self.box_prompt),
            masks=None if self.masks is None else self.masks.take(order),
            mask_scores=pick(self.mask_scores),
            multimask_index=pick(self.multimask_index),
            multimask_scores=pick(self.multimask_scores),
        )

    def top(self, k: int) -> Candidates:
        """The ``k`` best by box score, best first; ties keep their current order."""
        return self.take(np.argsort(-self.box_scores, kind="stable")[:k])

    def with_masks(
        self,
        masks: EncodedMasks,
        mask_scores: np.ndarray,
        multimask_index: np.ndarray,
        multimask_scores: np.ndarray,
    ) -> Candidates:
        """These candidates with one mask per box, in box order (what a segmenter returns)."""
        if (masks.height, masks.width) != (self.height, self.width):
            raise ValueError(f"masks are {masks.width}x{masks.height}, the image {self.width}x{self.height}")
        fields = (masks, mask_scores, multimask_index, multimask_scores)
        if any(len(values) != len(self) for values in fields):
            raise ValueError(f"{len(self)} candidates but masks/scores of {[len(v) for v in fields]}")
        return replace(
            self,
            masks=masks,
            mask_scores=np.asarray(mask_scores, np.float32),
            multimask_index=np.asarray(multimask_index, np.int8),
            multimask_scores=np.asarray(multimask_scores, np.float32),
        )

    def with_no_masks(self, outputs: int) -> Candidates:
        """A zero-candidate image as segmented with ``outputs`` masks per box (nothing to decode)."""
        if len(self):
            raise ValueError(f"image {self.image_id} has {len(self)} candidates to segment")
        empty = np.zeros(0, np.float32)
        return self.with_masks(
            EncodedMasks.empty(self.height, self.width), empty, empty, np.zeros((0, outputs), np.float32)
        )

    @staticmethod
    def from_tables(detections: pa.Table, images: pa.Table) -> list[Candidates]:
        """DETECTIONS joined onto DETECTION_IMAGES, sorted by image_id, rows in candidate_id order.

        Zero-candidate images get empty arrays. Shards stored before ``query_index`` existed read it
        as the candidate order (detector-score order).
        """
        table = detections.sort_by([("image_id", "ascending"), ("candidate_id", "ascending")])
        column = lambda name: table.column(name).to_numpy()  # noqa: E731
        ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
        boxes = np.stack([column(c) for c in ("x0", "y0", "x1", "y1")], axis=1).astype(np.float32)
        box_scores = column("box_score").astype(np.float32)
        text_scores = column("text_score").astype(np.float32)
        phrases = table.column("phrase").to_pylist()
        name = "query_index" if "query_index" in table.column_names else "candidate_id"
        query_indices = column(name).astype(np.int32)
        prompts = _prompts_from_table(table)
        # Row offsets where a new image starts, plus the end: [0, ..., len(ids)].
        bounds = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1], True]) if len(ids) else np.zeros(1, np.int64)
        spans = {ids[start]: slice(start, end) for start, end in zip(bounds[:-1], bounds[1:], strict=True)}
        result = []
        for row in sorted(
            images.select(["image_id", "width", "height"]).to_pylist(), key=lambda r: r["image_id"]
        ):
            image_id, width, height = row["image_id"], int(row["width"]), int(row["height"])
            if image_id not in spans:
                result.append(Candidates.empty(image_id, width, height))
                continue
            rows = spans[image_id]
            found = Candidates(
                image_id,
                width,
                height,
                boxes[rows],
                box_scores[rows],
                text_scores[rows],
                phrases[rows],
                query_indices[rows],
            )
            if prompts is not None:
                points, labels, box_prompt = prompts
                found = found.with_prompts(*_padded_clicks(points[rows], labels[rows]), box_prompt[rows])
            result.append(found)
        return result


# ---- stage tables --------------------------------------------------------------------------------


def detections_table(items: Sequence[Candidates]) -> pa.Table:
    """DETECTIONS: one row per candidate, by (image_id, candidate_id); candidate_id = row in its image."""
    boxes = _cat([c.boxes for c in items], np.float32).reshape(-1, 4)
    columns = {
        "image_id": [c.image_id for c in items for _ in range(len(c))],
        "candidate_id": _cat([np.arange(len(c), dtype=np.int32) for c in items], np.int32),
        "x0": boxes[:, 0],
        "y0": boxes[:, 1],
        "x1": boxes[:, 2],
        "y1": boxes[:, 3],
        "box_score": _cat([c.box_scores for c in items], np.float32),
        "text_score": _cat([c.text_scores for c in items], np.float32),
        "phrase": [p for c in items for p in c.phrases],
        "query_index": _cat([c.query_indices for c in items], np.int32),
        "box_prompt": _cat([c.box_prompts() for c in items], bool),
        "points": [clicks for c in items for clicks in _clicks(c)[0]],
        "point_labels": [labels for c in items for labels in _clicks(c)[1]],
    }
    return pa.table(columns, schema=schemas.DETECTIONS)


def _clicks(c: Candidates) -> tuple[list[list[float]], list[list[int]]]:
    """Per candidate, its real clicks (padding dropped) as flat [x, y, ...] and their labels."""
    if c.points is None:
        return [[] for _ in range(len(c))], [[] for _ in range(len(c))]
    keep = c.point_labels >= 0
    return (
        [c.points[i][keep[i]].reshape(-1).tolist() for i in range(len(c))],
        [c.point_labels[i][keep[i]].tolist() for i in range(len(c))],
    )


def _prompts_from_table(table: pa.Table) -> tuple[list, list, np.ndarray] | None:
    """(flat points per row, labels per row, box_prompt) when the table stores any click; else None."""
    if "point_labels" not in table.column_names:
        return None
    labels = table.column("point_labels").to_pylist()
    box_prompt = table.column("box_prompt").to_numpy(zero_copy_only=False).astype(bool)
    if not any(labels) and box_prompt.all():
        return None
    return _ragged(table.column("points").to_pylist()), _ragged(labels), box_prompt


def _ragged(rows: list) -> np.ndarray:
    """A 1-D object array of lists (np.asarray makes a 2-D array when every row has the same length)."""
    out = np.empty(len(rows), dtype=object)
    out[:] = rows
    return out


def _padded_clicks(points: Sequence, labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per-row clicks -> (N, P, 2) points and (N, P) labels padded with -1."""
    width = max((len(row) for row in labels), default=0)
    out_points = np.zeros((len(labels), width, 2), np.float32)
    out_labels = np.full((len(labels), width), -1, np.int8)
    for i, (flat, row) in enumerate(zip(points, labels, strict=True)):
        if row:
            out_points[i, : len(row)] = np.asarray(flat, np.float32).reshape(-1, 2)
            out_labels[i, : len(row)] = row
    return out_points, out_labels


def _concat_prompts(parts: Sequence[Candidates]) -> dict[str, np.ndarray | None]:
    """The prompt fields of concatenated parts: None when no part has clicks or box-less rows."""
    if all(p.points is None and p.box_prompt is None for p in parts):
        return {"points": None, "point_labels": None, "box_prompt": None}
    width = max((p.points.shape[1] for p in parts if p.points is not None), default=0)
    points, labels = [], []
    for p in parts:
        padded_points = np.zeros((len(p), width, 2), np.float32)
        padded_labels = np.full((len(p), width), -1, np.int8)
        if p.points is not None:
            padded_points[:, : p.points.shape[1]] = p.points
            padded_labels[:, : p.points.shape[1]] = p.point_labels
        points.append(padded_points)
        labels.append(padded_labels)
    return {
        "points": np.concatenate(points),
        "point_labels": np.concatenate(labels),
        "box_prompt": np.concatenate([p.box_prompts() for p in parts]),
    }


def detection_images_table(items: Sequence[Candidates]) -> pa.Table:
    """DETECTION_IMAGES: one row per image, zero-candidate images included."""
    columns = {
        "image_id": [c.image_id for c in items],
        "width": [c.width for c in items],
        "height": [c.height for c in items],
        "num_candidates": [len(c) for c in items],
    }
    return pa.table(columns, schema=schemas.DETECTION_IMAGES)


def masks_table(items: Sequence[Candidates]) -> pa.Table:
    """MASKS: one row per candidate, same (image_id, candidate_id) order as DETECTIONS."""
    rows: dict[str, list] = {name: [] for name in schemas.MASKS.names}
    for item in items:
        encoded = item.masks
        if encoded is None:
            raise ValueError(f"image {item.image_id}: candidates have no masks yet")
        n = len(encoded)
        rows["image_id"] += [item.image_id] * n
        rows["candidate_id"] += list(range(n))
        rows["rle_counts"] += encoded.counts
        rows["height"] += [encoded.height] * n
        rows["width"] += [encoded.width] * n
        rows["mask_area"] += encoded.areas.tolist()
        for column, values in zip(("mask_x", "mask_y", "mask_w", "mask_h"), encoded.bboxes.T, strict=True):
            rows[column] += values.tolist()
        rows["mask_score"] += item.mask_scores.tolist()
        rows["multimask_index"] += item.multimask_index.tolist()
        rows["multimask_scores"] += [scores.tolist() for scores in item.multimask_scores]
    return pa.table(rows, schema=schemas.MASKS)


def _cat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)


# ---- the models ----------------------------------------------------------------------------------


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
    ) -> list[Candidates]:
        """Candidates of every caption, merged per image and sorted by box score, without masks."""
        ...


class Segmenter(Protocol):
    batch_size: int

    def describe(self) -> dict[str, Any]: ...

    def prepare(self, image_id: str, data: bytes) -> PreparedImage: ...

    def segment(
        self, batch: Sequence[PreparedImage], candidates: Sequence[Candidates], *, multimask: bool
    ) -> list[Candidates]:
        """``candidates[i]`` are boxes on ``batch[i]``; returned with one mask per box."""
        ...
