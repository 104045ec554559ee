"""Segmenter prompts: each candidate's box and/or clicks, grouped so one decoder call needs no padding.

SAM-family prompt encoders embed a prompt as a sequence of tokens (box corners, clicks, a padding
token) and the mask decoder attends over all of them: padding a shorter prompt to batch it with longer
ones adds tokens, and so changes the mask. :func:`prompt_groups` splits a batch's candidates by
layout (box prompt or not, number of real clicks) so each decoder call holds prompts of one length.
Numpy only: shared by the SAM2 and the transformers segmenters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pseudolabel.models.interfaces import Candidates


@dataclass(frozen=True)
class PromptGroup:
    """Candidates of a batch whose prompts have one layout: the same tokens count, so one decoder call
    takes them without padding. ``points`` / ``labels`` are what SAM2's prompt encoder reads, in
    original pixels: the box corners first (labels 2, 3) when ``boxed``, then ``clicks`` clicks (1 / 0)."""

    rows: np.ndarray  # (M,) int64: rows of the batch's concatenated candidates, ascending
    points: np.ndarray  # (M, 2 * boxed + clicks, 2) float32
    labels: np.ndarray  # (M, 2 * boxed + clicks) int32
    boxed: bool
    clicks: int

    @property
    def boxes(self) -> np.ndarray | None:
        """(M, 4) float32 xyxy box prompts, or None when the group has none."""
        return self.points[:, :2].reshape(-1, 4) if self.boxed else None

    @property
    def click_points(self) -> np.ndarray:
        """(M, clicks, 2) float32: the clicks alone, without the box corners."""
        return self.points[:, 2 * self.boxed :]

    @property
    def click_labels(self) -> np.ndarray:
        """(M, clicks) int32: 1 object, 0 background."""
        return self.labels[:, 2 * self.boxed :]


def prompt_groups(candidates: Sequence[Candidates]) -> list[PromptGroup]:
    """The batch's candidates (concatenated in order) grouped by prompt layout (box or not, number of
    clicks), box-only first. Padding clicks (label -1) are dropped; a candidate with neither a box
    prompt nor a click is an error."""
    boxes = np.concatenate([np.asarray(found.boxes, np.float32).reshape(-1, 4) for found in candidates])
    boxed = np.concatenate([found.box_prompts() for found in candidates])
    width = max((found.points.shape[1] for found in candidates if found.points is not None), default=0)
    points = np.zeros((len(boxes), width, 2), np.float32)
    labels = np.full((len(boxes), width), -1, np.int32)
    first = 0
    for found in candidates:
        if found.points is not None:
            rows = slice(first, first + len(found))
            points[rows, : found.points.shape[1]] = found.points
            labels[rows, : found.points.shape[1]] = found.point_labels
        first += len(found)
    real = labels >= 0
    clicks = real.sum(axis=1)
    empty = ~boxed & (clicks == 0)
    if empty.any():
        raise ValueError(f"{int(empty.sum())} candidates have neither a box prompt nor a click")
    groups = []
    for has_box, count in sorted(
        {(bool(b), int(c)) for b, c in zip(boxed, clicks, strict=True)}, key=lambda k: (not k[0], k[1])
    ):
        rows = np.flatnonzero((boxed == has_box) & (clicks == count))
        # Each row has exactly `count` real clicks: boolean indexing keeps them in row order.
        group_points = points[rows][real[rows]].reshape(len(rows), count, 2)
        group_labels = labels[rows][real[rows]].reshape(len(rows), count)
        if has_box:
            group_points = np.concatenate([boxes[rows].reshape(-1, 2, 2), group_points], axis=1)
            corners = np.broadcast_to(np.array([2, 3], np.int32), (len(rows), 2))
            group_labels = np.concatenate([corners, group_labels], axis=1)
        groups.append(PromptGroup(rows, group_points, group_labels.astype(np.int32), has_box, count))
    return groups
