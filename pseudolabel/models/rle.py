"""Binary masks <-> COCO compressed RLE (pycocotools), encoded where the mask lives.

:func:`encode_device_masks` finds the run boundaries on the mask's own device (GPU in production),
so only the boundary indices -- O(perimeter), not O(pixels) -- cross to the host; pycocotools
then turns the run lengths into its compressed string. The result is byte-identical to
``pycocotools.mask.encode`` on the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils


@dataclass(frozen=True)
class EncodedMasks:
    """N masks of one image as COCO RLE, with pycocotools' area and xywh bbox."""

    counts: list[str]  # compressed RLE strings, utf-8
    height: int
    width: int
    areas: np.ndarray  # (N,) int64
    bboxes: np.ndarray  # (N, 4) float32, COCO xywh

    def __len__(self) -> int:
        return len(self.counts)

    @staticmethod
    def empty(height: int, width: int) -> EncodedMasks:
        return EncodedMasks([], height, width, np.zeros(0, np.int64), np.zeros((0, 4), np.float32))

    @staticmethod
    def concat(parts: list[EncodedMasks], height: int, width: int) -> EncodedMasks:
        """Masks of one image encoded in several chunks, in order."""
        if not parts:
            return EncodedMasks.empty(height, width)
        return EncodedMasks(
            counts=[c for part in parts for c in part.counts],
            height=height,
            width=width,
            areas=np.concatenate([part.areas for part in parts]),
            bboxes=np.concatenate([part.bboxes for part in parts]).reshape(-1, 4),
        )


def encode_device_masks(masks: torch.Tensor) -> EncodedMasks:
    """Encode ``masks`` (N, H, W) bool on any device as COCO RLE."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be (N, H, W), got {tuple(masks.shape)}")
    n, height, width = masks.shape
    if n == 0:
        return EncodedMasks.empty(height, width)
    # COCO RLE runs over the mask in column-major (Fortran) order.
    flat = masks.to(torch.bool).transpose(1, 2).reshape(n, height * width)
    boundaries = (flat[:, 1:] != flat[:, :-1]).nonzero()  # (K, 2): (mask, i) where pixel i+1 starts a run
    starts_on = flat[:, 0].cpu().numpy()
    boundaries = boundaries.cpu().numpy()
    # nonzero() is row-major, so each mask's boundaries are contiguous and ascending.
    splits = np.searchsorted(boundaries[:, 0], np.arange(n + 1))
    rles = []
    total = height * width
    for i in range(n):
        ends = boundaries[splits[i] : splits[i + 1], 1] + 1
        runs = np.diff(np.concatenate(([0], ends, [total])))
        if starts_on[i]:
            runs = np.concatenate(([0], runs))  # COCO counts always start with a (possibly empty) 0-run
        rles.append(mask_utils.frPyObjects({"counts": runs.tolist(), "size": [height, width]}, height, width))
    return _from_rles(rles, height, width)


def encode_host_masks(masks: np.ndarray) -> EncodedMasks:
    """Encode host masks (N, H, W) bool/uint8 with pycocotools directly."""
    n, height, width = masks.shape
    if n == 0:
        return EncodedMasks.empty(height, width)
    fortran = np.asfortranarray(masks.astype(np.uint8, copy=False).transpose(1, 2, 0))
    return _from_rles(mask_utils.encode(fortran), height, width)


def decode_rle(counts: str, height: int, width: int) -> np.ndarray:
    """One compressed RLE string -> (H, W) bool mask."""
    return mask_utils.decode({"counts": counts.encode("utf-8"), "size": [height, width]}).astype(bool)


def _from_rles(rles: list[dict], height: int, width: int) -> EncodedMasks:
    return EncodedMasks(
        counts=[rle["counts"].decode("utf-8") for rle in rles],
        height=height,
        width=width,
        areas=np.asarray(mask_utils.area(rles), dtype=np.int64).reshape(-1),
        bboxes=np.asarray(mask_utils.toBbox(rles), dtype=np.float32).reshape(-1, 4),
    )
