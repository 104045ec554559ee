"""Low-res mask logits -> full-resolution binary masks, computed only where they can be positive.

A bilinear output pixel is a convex combination (non-negative weights) of at most 2 x 2 low-res
logits, so where those are all <= 0 it is <= 0 too: :func:`positive_bounds` finds, per mask, the
low-res rows and columns holding a logit > 0, :func:`crop_boxes` the full-resolution rectangle they
can reach, :func:`plan_crops` groups masks of similar crop sizes into buckets and :func:`fill_planned`
interpolates inside the (grown) rectangles only, one batched pass per bucket, with PyTorch's own
source indices and weights (:class:`BilinearAxis`) as two separable passes. Values equal
``F.interpolate(mode="bilinear", align_corners=False)`` to within float rounding (a pixel can flip
only where its logit is within ~1 ulp of 0). No host synchronisation until the one copy that
:func:`planned_changes` makes is waited on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from pseudolabel.models.interfaces import PreparedImage
from pseudolabel.models.runtime import HostCopy, to_device
from pseudolabel.rle import set_bits


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


def positive_bounds(low_res: torch.Tensor) -> torch.Tensor:
    """(N, s, s) logits -> (N, 4) int32: first and last row, first and last column holding a logit > 0
    (s, -1 for a mask without any). A row or column with a NaN counts as positive (upsampling it then
    decides), so no positive pixel is ever left out. Two reductions, no host synchronisation."""
    size = low_res.shape[-1]
    bounds = []
    for dim in (2, 1):  # (N, s) rows, then columns, holding a logit > 0: max > 0 (NaN counts as > 0)
        lines = (~(low_res.amax(dim=dim) <= 0)).to(torch.uint8)
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


@dataclass(frozen=True)
class _Bucket:
    """Masks filled by one batched pass: ``count`` masks of ``width`` x ``height`` output pixels, each
    reading ``rows`` consecutive low-res rows; their slots (``slot`` elements, columns ``stride`` apart)
    follow each other from ``start`` in the buffer; their indices and weights start at ``ints`` and
    ``floats`` in the plan's packed arrays."""

    count: int
    width: int
    height: int
    rows: int
    stride: int
    slot: int
    start: int
    ints: int
    floats: int


@dataclass(frozen=True)
class CropPlan:
    """Where a round of masks goes in one flat bool buffer, and how it is filled bucket by bucket.

    ``boxes`` (N, 4) int64 ``x0, y0, w, h``: the rectangle filled for each mask -- its :func:`crop_boxes`
    rectangle grown to its bucket's size (still inside the image; every added pixel reads only logits
    <= 0, so it is background either way), (0, 0, 0, 0) for a mask without a positive logit.
    ``offsets`` (N,): where each mask's slot starts, in the layout of :func:`pseudolabel.rle.crop_slots`
    but with the slots ordered by bucket. ``ints`` / ``floats``: every bucket's source rows, gather
    indices and weights, packed so that they reach the device in two copies.
    """

    boxes: np.ndarray
    offsets: np.ndarray
    total: int
    buckets: tuple[_Bucket, ...]
    ints: np.ndarray  # int64
    floats: np.ndarray  # float32


# What one bucket costs beyond its pixels (its ~12 device calls and its share of planning), in pixels
# upsampled, copied (1 bit each) and scanned on the host (64 to a word). CPU: measured with
# bench/gpu_host_overhead.py (a call ~10-20 us, a pixel ~1 ns). CUDA: estimated, not measured (no GPU
# run yet): ~12 launches + planning ~150 us of host time vs ~0.04 ns per pixel on an H100/H200
# (device passes, PCIe copy, host scan), so merging buckets pays off up to millions of extra pixels.
BUCKET_COST = {"cpu": 1 << 15, "cuda": 1 << 22}
MAX_BUCKET_PIXELS = 1 << 26  # per batched pass: bounds its float temporaries (~16 bytes a pixel)


def default_bucket_cost(device: torch.device) -> int:
    """:data:`BUCKET_COST` of ``device``'s type (a CPU's for any other type)."""
    return BUCKET_COST.get(device.type, BUCKET_COST["cpu"])


def plan_crops(
    low: int,
    crops: np.ndarray,
    heights: np.ndarray,
    widths: np.ndarray,
    steps_per_octave: int | None = None,
    bucket_cost: int = BUCKET_COST["cpu"],
    max_bucket_pixels: int = MAX_BUCKET_PIXELS,
) -> CropPlan:
    """Group masks whose crops have similar sizes, so that each group is upsampled in one batched pass.

    ``crops`` (N, 4) ``x0, y0, w, h`` from :func:`crop_boxes` for masks of ``low`` x ``low`` logits,
    mask m belonging to an image of ``heights[m]`` x ``widths[m]`` pixels. Masks share a bucket when
    their images have the same size and their crop widths and heights round up to the same power of
    2 ** (1 / ``steps_per_octave``) (0: any size); every crop of a bucket grows to the bucket's largest
    width and height (more pixels computed, fewer device calls). A bucket of more than
    ``max_bucket_pixels`` is split into several passes of the same shape.

    ``steps_per_octave=None`` picks it from (0, 1, 2, 4, 8), whichever costs least: buckets x
    ``bucket_cost`` + pixels computed (see :data:`BUCKET_COST`: few large buckets on a GPU, finer ones on
    a CPU).
    """
    crops = np.asarray(crops, np.int64).reshape(-1, 4)
    heights = np.asarray(heights, np.int64)
    widths = np.asarray(widths, np.int64)
    n = len(crops)
    boxes = np.zeros((n, 4), np.int64)
    offsets = np.zeros(n, np.int64)
    filled = np.flatnonzero(crops[:, 2] > 0)
    if not len(filled):
        groups = []
    else:
        choices = (0, 1, 2, 4, 8) if steps_per_octave is None else (steps_per_octave,)
        groupings = [
            _Grouping.of(filled, crops, heights, widths, steps, max_bucket_pixels) for steps in choices
        ]
        groups = min(groupings, key=lambda g: g.cost(bucket_cost)).buckets()
    buckets: list[_Bucket] = []
    ints: list[np.ndarray] = []
    floats: list[np.ndarray] = []
    position = n_ints = n_floats = 0
    for members in groups:
        height, width = int(heights[members[0]]), int(widths[members[0]])
        x0, y0, crop_w, crop_h = crops[members].T
        bw, bh = int(crop_w.max()), int(crop_h.max())
        x0 = np.minimum(x0, width - bw)  # grown to the bucket's size, shifted back inside the image
        y0 = np.minimum(y0, height - bh)
        xs, ys = BilinearAxis.of(low, width), BilinearAxis.of(low, height)
        cols = x0[:, None] + np.arange(bw)  # (M, bw) output columns
        lines = y0[:, None] + np.arange(bh)  # (M, bh) output rows
        r0 = ys.lo[lines[:, 0]]
        rows = int((ys.hi[lines[:, -1]] - r0).max()) + 1  # low-res rows any mask of the bucket reads
        r0 = np.minimum(r0, low - rows)
        stride = bh + 1 if bh < height else bh
        slot = bw * stride + 2
        boxes[members] = np.stack([x0, y0, np.full_like(x0, bw), np.full_like(x0, bh)], axis=1)
        offsets[members] = position + slot * np.arange(len(members))
        parts = [
            (members[:, None] * low + r0[:, None] + np.arange(rows)).reshape(-1),  # rows of (N * s, s)
            np.concatenate([xs.lo[cols], xs.hi[cols]], axis=1).reshape(-1),  # (M, 2 bw) columns
            # (M, 2 bh) rows of each mask's x-pass (R rows from r0)
            (np.concatenate([ys.lo[lines], ys.hi[lines]], axis=1) - r0[:, None]).reshape(-1),
        ]
        weights = [
            np.concatenate([xs.w_lo[cols], xs.w_hi[cols]], axis=1).reshape(-1),
            np.concatenate([ys.w_lo[lines], -ys.w_hi[lines]], axis=1).reshape(-1),  # note: -w_hi
        ]
        buckets.append(_Bucket(len(members), bw, bh, rows, stride, slot, position, n_ints, n_floats))
        ints += parts
        floats += weights
        n_ints += sum(len(part) for part in parts)
        n_floats += sum(len(weight) for weight in weights)
        position += slot * len(members)
    empty = np.flatnonzero(crops[:, 2] == 0)
    offsets[empty] = position + 2 * np.arange(len(empty))  # 2 zeros: a mask without any pixel
    return CropPlan(
        boxes,
        offsets,
        position + 2 * len(empty),
        tuple(buckets),
        np.concatenate(ints) if ints else np.zeros(0, np.int64),
        np.concatenate(floats) if floats else np.zeros(0, np.float32),
    )


@dataclass(frozen=True)
class _Grouping:
    """Masks sorted by bucket key: bucket b holds ``order[starts[b] : starts[b] + counts[b]]``, whose
    crops grow to ``width[b]`` x ``height[b]``; ``per_pass[b]`` of them fit in one pass."""

    order: np.ndarray
    starts: np.ndarray
    counts: np.ndarray
    width: np.ndarray
    height: np.ndarray
    per_pass: np.ndarray

    @staticmethod
    def of(
        filled: np.ndarray,
        crops: np.ndarray,
        heights: np.ndarray,
        widths: np.ndarray,
        steps_per_octave: int,
        max_pixels: int,
    ) -> _Grouping:
        w, h = crops[filled, 2], crops[filled, 3]
        key = np.stack(
            [
                heights[filled],
                widths[filled],
                np.ceil(np.log2(w) * steps_per_octave).astype(np.int64),
                np.ceil(np.log2(h) * steps_per_octave).astype(np.int64),
            ],
            axis=1,
        )
        sort = np.lexsort(key.T[::-1])
        key = key[sort]
        starts = np.flatnonzero(np.concatenate([[True], (key[1:] != key[:-1]).any(axis=1)]))
        width = np.maximum.reduceat(w[sort], starts)
        height = np.maximum.reduceat(h[sort], starts)
        counts = np.diff(np.append(starts, len(sort)))
        per_pass = np.maximum(1, max_pixels // (width * height))
        return _Grouping(filled[sort], starts, counts, width, height, per_pass)

    def cost(self, bucket_cost: int) -> int:
        """Passes x ``bucket_cost`` + pixels upsampled."""
        passes = -(-self.counts // self.per_pass)
        return int(passes.sum()) * bucket_cost + int((self.counts * self.width * self.height).sum())

    def buckets(self) -> list[np.ndarray]:
        """The masks of each pass, in order."""
        return [
            self.order[start + i : start + min(i + per_pass, count)]
            for start, count, per_pass in zip(
                self.starts.tolist(), self.counts.tolist(), self.per_pass.tolist(), strict=True
            )
            for i in range(0, count, per_pass)
        ]


def fill_planned(plan: CropPlan, low_res: torch.Tensor) -> torch.Tensor:
    """The flat bool buffer of ``plan`` (``plan.total`` elements, on ``low_res``'s device): mask m's
    rectangle ``plan.boxes[m]`` (w, h) column-major from ``plan.offsets[m] + 1``, i.e. ``out[j, i]`` =
    bilinear logit at pixel (x0 + j, y0 + i) > 0, with the :class:`BilinearAxis` indices and weights
    (along x on the source rows, then along y), one batched pass per bucket. ``low_res`` (N, s, s) fp32 holds the plan's masks in order.

    The last step compares ``a * w_lo > -(b * w_hi)`` instead of computing ``a * w_lo + b * w_hi > 0``:
    the rounded sum of two floats is > 0 exactly when their exact sum is, so the result is the same
    bit for bit, with one pass less. No host synchronisation: two host->device copies of the plan.
    """
    device = low_res.device
    buffer = torch.zeros(plan.total, dtype=torch.bool, device=device)
    if not plan.buckets:
        return buffer
    ints, floats = to_device(plan.ints, device), to_device(plan.floats, device)
    source = low_res.reshape(-1, low_res.shape[-1])  # (N * s, s)
    for b in plan.buckets:
        m, w, h, r = b.count, b.width, b.height, b.rows
        rows = ints[b.ints : b.ints + m * r]
        at = b.ints + m * r
        gather_x = ints[at : at + m * 2 * w]
        gather_y = ints[at + m * 2 * w : at + m * 2 * (w + h)]
        weight_x = floats[b.floats : b.floats + m * 2 * w]
        weight_y = floats[b.floats + m * 2 * w : b.floats + m * 2 * (w + h)]
        slots = buffer[b.start : b.start + m * b.slot].view(m, b.slot)[:, 1 : 1 + w * b.stride]
        # Column-major throughout, like the slots: (M, s, R) source columns -> (M, w, R) -> (M, w, h).
        read = source.index_select(0, rows).view(m, r, -1).transpose(1, 2)  # (M, s, R)
        pairs = torch.gather(read, 1, gather_x.view(m, 2 * w, 1).expand(m, 2 * w, r))  # lo | hi columns
        weight_x = weight_x.view(m, 2 * w, 1)
        along_x = pairs[:, :w] * weight_x[:, :w] + pairs[:, w:] * weight_x[:, w:]  # (M, w, R)
        pairs = torch.gather(along_x, 2, gather_y.view(m, 1, 2 * h).expand(m, w, 2 * h))  # lo | hi rows
        weight_y = weight_y.view(m, 1, 2 * h)
        lower = pairs[..., :h] * weight_y[..., :h]  # a * w_lo
        upper = pairs[..., h:] * weight_y[..., h:]  # b * -w_hi
        torch.gt(lower, upper, out=slots.view(m, w, b.stride)[:, :, :h])
    return buffer


def planned_changes(plan: CropPlan, low_res: torch.Tensor) -> HostCopy:
    """:func:`fill_planned`, then where its buffer changes value (``buffer[1:] != buffer[:-1]``),
    packed 8 to a byte on the device, copied to the host (one sync, when waited on) and turned into the
    ascending change positions ``rle.encode_crop_changes`` reads (``rle.set_bits``), once, by the first
    thread that waits: 1/8 of a byte per pixel crosses, and the host scans 64 pixels per word."""
    buffer = fill_planned(plan, low_res)
    edges = buffer[1:] != buffer[:-1]
    padded = torch.zeros(-(-len(edges) // 64) * 64, dtype=torch.uint8, device=edges.device)
    padded[: len(edges)] = edges
    shifts = torch.arange(8, dtype=torch.uint8, device=edges.device)
    packed = (padded.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)
    return HostCopy([packed], then=lambda arrays: [set_bits(arrays[0])])
