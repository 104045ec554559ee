"""Low-res mask logits -> full-resolution binary masks, computed only where they can be positive.

A bilinear output pixel is a convex combination (non-negative weights) of at most 2 x 2 low-res
logits, so where those are all <= 0 it is <= 0 too: :func:`positive_bounds` finds, per mask, the
low-res rows and columns holding a logit > 0, :func:`crop_boxes` the full-resolution rectangle they
can reach, and :func:`fill_crops` interpolates inside it only, with PyTorch's own source indices and
weights (:class:`BilinearAxis`) as two separable passes. Values equal ``F.interpolate(mode="bilinear",
align_corners=False)`` to within float rounding (a pixel can flip only where its logit is within
~1 ulp of 0). No host synchronisation: the caller copies the filled buffer once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from pseudolabel.models.interfaces import PreparedImage
from pseudolabel.models.runtime import to_device


@dataclass(frozen=True)
class BilinearAxis:
    """One axis of ``F.interpolate(mode="bilinear", align_corners=False)`` from ``source`` to ``size``
    pixels, with PyTorch's own index and weight rule (``compute_source_index_and_lambda``): output
    pixel i reads source pixels ``lo[i]`` and ``hi[i]`` with weights ``w_lo[i] = 1 - w_hi[i]``."""

    lo: np.ndarray  # (size,) int64, non-decreasing
    hi: np.ndarray  # (size,) int64, lo or lo + 1
    w_lo: np.ndarray  # (size,) float32, >= 0
    w_hi: np.ndarray  # (size,) float32, >= 0

    @staticmethod
    @lru_cache(maxsize=256)
    def of(source: int, size: int) -> BilinearAxis:
        if source == size:  # PyTorch copies when the size does not change
            index = np.arange(size, dtype=np.int64)
            return BilinearAxis(index, index, np.ones(size, np.float32), np.zeros(size, np.float32))
        scale = np.float32(source) / np.float32(size)
        real = np.maximum(scale * (np.arange(size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
        lo = np.minimum(np.floor(real).astype(np.int64), source - 1)
        w_hi = np.clip(real - lo.astype(np.float32), 0, 1).astype(np.float32)
        return BilinearAxis(lo, lo + (lo < source - 1), np.float32(1) - w_hi, w_hi)

    def span(self, first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per mask, the output pixels [start, stop) reading any source pixel in [first, last] (M,) each;
        empty (stop <= start) when first > last. Every other output pixel reads only pixels outside."""
        return np.searchsorted(self.hi, first, side="left"), np.searchsorted(self.lo, last, side="right")


class DeviceAxes:
    """:meth:`BilinearAxis.of` as device tensors (lo, hi, w_lo, w_hi), cached per (source, size)."""

    def __init__(self, device: torch.device, capacity: int = 64) -> None:
        self.device = device
        self.capacity = capacity
        self._axes: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def get(self, source: int, size: int) -> tuple[torch.Tensor, ...]:
        key = (source, size)
        if key not in self._axes:
            if len(self._axes) >= self.capacity:
                self._axes.clear()
            axis = BilinearAxis.of(source, size)
            self._axes[key] = tuple(
                to_device(a, self.device) for a in (axis.lo, axis.hi, axis.w_lo, axis.w_hi)
            )
        return self._axes[key]


def positive_bounds(low_res: torch.Tensor) -> torch.Tensor:
    """(N, s, s) logits -> (N, 4) int32: first and last row, first and last column holding a logit > 0
    (s, -1 for a mask without any). No host synchronisation."""
    positive = low_res > 0
    size = low_res.shape[-1]
    bounds = []
    for lines in (positive.any(dim=2), positive.any(dim=1)):  # (N, s) rows, then columns
        lines = lines.to(torch.uint8)
        found = lines.amax(dim=1).bool()
        first = lines.argmax(dim=1)  # index of the first maximum
        last = size - 1 - lines.flip(1).argmax(dim=1)
        bounds += [torch.where(found, first, size), torch.where(found, last, -1)]
    return torch.stack(bounds, dim=1).int()


def crop_boxes(
    low: int, batch: Sequence[PreparedImage], counts: Sequence[int], bounds: np.ndarray
) -> np.ndarray:
    """(N, 4) int64 ``x0, y0, w, h`` per mask: the full-resolution pixels that can be positive, from
    ``bounds`` (N, 4) = first/last low-res row, first/last low-res column with a logit > 0, for masks
    of ``low`` x ``low`` logits (``counts[i]`` of them belonging to ``batch[i]``, in order)."""
    crops = np.zeros((len(bounds), 4), np.int64)
    first = 0
    for item, count in zip(batch, counts, strict=True):
        rows = slice(first, first + count)
        first += count
        y0, y1 = BilinearAxis.of(low, item.height).span(bounds[rows, 0], bounds[rows, 1])
        x0, x1 = BilinearAxis.of(low, item.width).span(bounds[rows, 2], bounds[rows, 3])
        empty = (y1 <= y0) | (x1 <= x0)
        crops[rows] = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
        crops[np.flatnonzero(empty) + rows.start] = 0
    return crops


def fill_crops(
    axes: DeviceAxes,
    buffer: torch.Tensor,
    base: int,
    low_res: torch.Tensor,
    item: PreparedImage,
    crops: np.ndarray,
    slots: tuple[np.ndarray, np.ndarray, int],
) -> None:
    """One image's masks into ``buffer`` from ``base``: mask m's crop (w, h) column-major, i.e.
    ``out[j, i]`` = bilinear logit at pixel (x0 + j, y0 + i) > 0, with PyTorch's indices and weights:
    along x first (``lo * w_lo + hi * w_hi``), then along y on those rows."""
    low = low_res.shape[-1]
    y_lo, y_hi, wy_lo, wy_hi = axes.get(low, item.height)
    x_lo, x_hi, wx_lo, wx_hi = axes.get(low, item.width)
    rows_of = BilinearAxis.of(low, item.height)
    offsets, strides, _ = slots
    for m, ((x0, y0, w, h), offset, stride) in enumerate(
        zip(crops.tolist(), offsets.tolist(), strides.tolist(), strict=True)
    ):
        if not w:
            continue
        r0, r1 = int(rows_of.lo[y0]), int(rows_of.hi[y0 + h - 1])
        source = low_res[m, r0 : r1 + 1].t()  # (R, s) low-res rows the crop reads, as (s, R)
        cols = slice(x0, x0 + w)
        along_x = (
            source.index_select(0, x_lo[cols]) * wx_lo[cols, None]
            + source.index_select(0, x_hi[cols]) * wx_hi[cols, None]
        )  # (w, R)
        rows = slice(y0, y0 + h)
        logits = (
            along_x.index_select(1, y_lo[rows] - r0) * wy_lo[rows]
            + along_x.index_select(1, y_hi[rows] - r0) * wy_hi[rows]
        )  # (w, h)
        start = base + offset + 1
        torch.gt(logits, 0, out=buffer[start : start + w * stride].view(w, stride)[:, :h])
