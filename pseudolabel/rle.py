"""COCO compressed RLE for the whole project (pycocotools), torch-free except for the device encoder.

Masks are stored as ``rle_counts`` strings plus height and width. :func:`encode_device_masks` finds run
boundaries on the mask's own device (GPU in production), so only O(perimeter) indices cross to the
host; its output is byte-identical to ``pycocotools.mask.encode``. :func:`encode_crops` encodes masks
that are zero outside a rectangle from just that rectangle (the segmenters' layout, see
:func:`crop_slots`), equally byte-identical; :func:`encode_crop_changes` does the same from the
positions where such a buffer changes value (what the segmenters copy from the device). Area and bbox always go through
:func:`rle_areas` / :func:`rle_bboxes`, which chunk pycocotools' calls (2.0.11 + numpy 2 overflows
above 255 RLEs per ``area`` call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools import mask as mask_utils

if TYPE_CHECKING:
    import torch

# pycocotools 2.0.11 + numpy 2 raises OverflowError in area() for more than 255 RLEs at once.
_AREA_CHUNK = 255


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

    def take(self, order: np.ndarray) -> EncodedMasks:
        """The masks at ``order`` (M,) indices, in that order."""
        order = np.asarray(order, np.int64)
        return EncodedMasks(
            [self.counts[i] for i in order], self.height, self.width, self.areas[order], self.bboxes[order]
        )

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
    import torch

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
        rles.append(_runs_to_rle(runs, height, width))
    return _from_rles(rles, height, width)


def crop_slots(widths: np.ndarray, heights: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Where :func:`encode_crops` expects each crop in one flat bool buffer: (offsets (M,), strides (M,), total).

    Crop m is ``widths[m]`` columns of ``heights[m]`` pixels, stored column by column (COCO's pixel
    order) as ``buffer[offsets[m] + 1 : offsets[m] + 1 + widths[m] * strides[m]].view(w, stride)[:, :h]``.
    Everything else in its slot stays 0: one leading element, one trailing element, and, when the crop
    is shorter than the image, one element after each column (``strides[m] = h + 1``) -- the pixel
    below the crop or, at the bottom edge, above the next column's crop, which is 0 in the full mask too.
    """
    widths = np.asarray(widths, np.int64)
    heights = np.asarray(heights, np.int64)
    strides = np.where(heights < height, heights + 1, heights)
    sizes = widths * strides + 2
    offsets = np.cumsum(sizes) - sizes
    return offsets, strides, int(sizes.sum())


def encode_crops(
    buffer: np.ndarray, boxes: np.ndarray, height: int, width: int, offsets: np.ndarray | None = None
) -> EncodedMasks:
    """Masks that are 0 outside ``boxes`` (M, 4) int ``x0, y0, w, h`` -> COCO RLE at ``height`` x ``width``.

    ``buffer``: the flat bool crops laid out by :func:`crop_slots` (``boxes[:, 2]``, ``boxes[:, 3]``,
    ``height``), or, with ``offsets`` (M,), slots of that shape starting wherever ``offsets`` says (in
    any order, e.g. grouped by size as ``mask_upsample.plan_crops`` does). Byte-identical to
    :func:`encode_host_masks` of the full masks, at a cost that grows with the crop area, not the
    image area.
    """
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    if offsets is None:
        offsets = crop_slots(boxes[:, 2], boxes[:, 3], height)[0]
    return encode_crop_changes(crop_changes(buffer), boxes, height, width, offsets)


def crop_changes(buffer: np.ndarray) -> np.ndarray:
    """Where a flat crop buffer changes value: ``i`` such that ``buffer[i] != buffer[i + 1]`` (K,) int64,
    ascending (``mask_upsample.planned_changes`` finds the same on the device)."""
    return np.flatnonzero(buffer[1:] != buffer[:-1])


def set_bits(packed: np.ndarray) -> np.ndarray:
    """Positions of the set bits of ``packed`` (uint8, little-endian bit order: bit j of byte i is
    position 8 i + j; a whole number of 8-byte words), ascending. Scans one 64-bit word per 64
    positions, then the bytes of the words holding a set bit, and unpacks only the bytes holding one:
    O(len / 64 + 8 x set bits)."""
    words = np.flatnonzero(packed.view(np.uint64))
    candidates = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    hit = candidates[packed[candidates] != 0]
    byte, bit = np.nonzero(np.unpackbits(packed[hit, None], axis=1, bitorder="little"))
    return hit[byte] * 8 + bit


def encode_crop_changes(
    changes: np.ndarray, boxes: np.ndarray, height: int, width: int, offsets: np.ndarray
) -> EncodedMasks:
    """:func:`encode_crops` from :func:`crop_changes` of the buffer (of a whole round of masks: only the
    changes inside these masks' slots are read), all masks at once: O(changes), not O(pixels)."""
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    offsets = np.asarray(offsets, np.int64)
    if not len(boxes):
        return EncodedMasks.empty(height, width)
    total = height * width
    strides = np.where(boxes[:, 3] < height, boxes[:, 3] + 1, boxes[:, 3])
    # Slot m spans offsets[m] .. offsets[m] + w * stride + 1; the changes between its elements e and e + 1
    # (e = change - offset) start a run at body element e, pixel (x0 + e // stride, y0 + e % stride).
    first = np.searchsorted(changes, offsets)
    last = np.searchsorted(changes, offsets + boxes[:, 2] * strides + 1)
    owner = np.repeat(np.arange(len(boxes)), last - first)
    at = changes[_ranges(first, last)] - offsets[owner]
    column, row = np.divmod(at, strides[owner])
    starts = (boxes[owner, 0] + column) * height + boxes[owner, 1] + row
    inside = starts < total
    starts, owner = starts[inside], owner[inside]
    # Per mask the edges 0, starts..., total -> run lengths (a 0-run first, as COCO counts do).
    per_mask = np.bincount(owner, minlength=len(boxes))
    block = np.cumsum(per_mask + 2) - (per_mask + 2)  # where mask m's edges begin
    edges = np.full(int((per_mask + 2).sum()), total, np.int64)
    edges[block] = 0
    edges[block[owner] + 1 + np.arange(len(starts)) - (np.cumsum(per_mask) - per_mask)[owner]] = starts
    runs = np.diff(edges).tolist()
    counts = [
        {"counts": runs[b : b + n + 1], "size": [height, width]}
        for b, n in zip(block.tolist(), per_mask.tolist(), strict=True)
    ]
    return _from_rles(mask_utils.frPyObjects(counts, height, width), height, width)  # one call for all


def _ranges(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(first[i], last[i])`` for every i, without a Python loop."""
    lengths = last - first
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, np.int64)
    steps = np.ones(total, np.int64)
    starts = np.cumsum(lengths) - lengths
    nonempty = lengths > 0
    steps[0] = first[nonempty][0]
    # At each range's start, jump from the previous range's last value to this range's first.
    jumps = first[nonempty][1:] - (last[nonempty][:-1] - 1)
    steps[starts[nonempty][1:]] = jumps
    return np.cumsum(steps)


def _runs_to_rle(runs: np.ndarray, height: int, width: int) -> dict:
    """Uncompressed COCO counts (a 0-run first) -> pycocotools' compressed RLE dict."""
    return mask_utils.frPyObjects({"counts": runs.tolist(), "size": [height, width]}, height, width)


def encode_host_masks(masks: np.ndarray) -> EncodedMasks:
    """Encode host masks (N, H, W) bool/uint8 with pycocotools directly."""
    n, height, width = masks.shape
    if n == 0:
        return EncodedMasks.empty(height, width)
    fortran = np.asfortranarray(masks.astype(np.uint8, copy=False).transpose(1, 2, 0))
    return _from_rles(mask_utils.encode(fortran), height, width)


def decode_rle(counts: str, height: int, width: int) -> np.ndarray:
    """One compressed RLE string -> (H, W) bool mask."""
    return mask_utils.decode(rle_object(counts, height, width)).astype(bool)


def _from_rles(rles: list[dict], height: int, width: int) -> EncodedMasks:
    return EncodedMasks(
        counts=[rle["counts"].decode("utf-8") for rle in rles],
        height=height,
        width=width,
        areas=rle_areas(rles),
        bboxes=rle_bboxes(rles).astype(np.float32),
    )


def rle_object(counts: str | bytes, height: int, width: int) -> dict[str, Any]:
    """A pycocotools RLE dict; ``counts`` as bytes, as its C API wants.

    Every compressed string read back from a table or file reaches pycocotools through here or
    :func:`rle_objects`. One with a character outside COCO's alphabet (``'0'`` .. ``'o'``; a NUL byte
    included) or whose last character says "more chunks follow" raises ValueError: pycocotools'
    ``rleFrString`` would parse on past the string's end and write counts beyond its buffer (heap
    corruption that surfaces later as a crash somewhere else). Any other garbage stays in bounds;
    :func:`rle_run_totals` tells whether a string is a valid mask of its size.
    """
    data = counts if isinstance(counts, bytes) else counts.encode("ascii")
    if data.translate(None, _RLE_ALPHABET):
        raise ValueError(f"malformed RLE string: characters outside '0'..'o' ({data[:16]!r}...)")
    if data and (data[-1] - 48) & 0x20:  # a continuation chunk: the count goes on past the end
        raise ValueError(f"malformed RLE string: it ends inside a count (...{data[-8:]!r})")
    return {"size": [int(height), int(width)], "counts": data}


_RLE_ALPHABET = bytes(range(48, 48 + 64))  # chr(48 + 5-bit chunk + 0x20 continuation flag)


def rle_objects(counts: Sequence[str], heights: Sequence[int], widths: Sequence[int]) -> list[dict[str, Any]]:
    """:func:`rle_object` of each string; a malformed one raises ValueError naming its position."""
    objects = []
    for i, (c, h, w) in enumerate(zip(counts, heights, widths, strict=True)):
        try:
            objects.append(rle_object(c, h, w))
        except ValueError as exc:  # UnicodeEncodeError included
            raise ValueError(f"RLE string #{i} of {len(counts)} ({h}x{w}): {exc}") from exc
    return objects


def rle_areas(rles: Sequence[dict[str, Any]]) -> np.ndarray:
    """Foreground pixels of each RLE, computed on the runs (no decoding)."""
    if not rles:
        return np.zeros(0, dtype=np.int64)
    parts = [mask_utils.area(list(rles[i : i + _AREA_CHUNK])) for i in range(0, len(rles), _AREA_CHUNK)]
    return np.concatenate(parts).astype(np.int64)


def rle_bboxes(rles: Sequence[dict[str, Any]]) -> np.ndarray:
    """COCO xywh bbox of each RLE, computed on the runs (no decoding)."""
    if not rles:
        return np.zeros((0, 4), dtype=np.float64)
    return np.asarray(mask_utils.toBbox(list(rles)), dtype=np.float64).reshape(-1, 4)


def decode_union(rles: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Binary HxW uint8 mask of the union of ``rles`` (all zeros when there are none)."""
    if not rles:
        return np.zeros((height, width), dtype=np.uint8)
    merged = rles[0] if len(rles) == 1 else mask_utils.merge(list(rles), intersect=False)
    return mask_utils.decode(merged)


def union_area(rles: Sequence[dict[str, Any]]) -> int:
    """Pixels covered by any of ``rles``; overlaps count once (merged as runs, no decoding)."""
    if not rles:
        return 0
    merged = rles[0] if len(rles) == 1 else mask_utils.merge(list(rles), intersect=False)
    return int(mask_utils.area(merged))


# Chunks per count beyond which a string is garbage (12 x 5 bits is far beyond any image size) and
# int64 shifts would overflow.
_MAX_TOKEN_CHUNKS = 12
_PARSE_BATCH = 4096  # strings per vectorised pass (bounds temporary arrays)


def rle_run_totals(counts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse COCO compressed RLE strings without materialising pixels, vectorised over strings.

    Returns, per string, ``(pixels covered by all runs, foreground pixels, well_formed)``. A string
    is a valid mask of size HxW exactly when it is well formed and its run total equals H*W, which
    is what checking "every RLE decodes" needs, at a fraction of the cost of decoding every mask
    (pycocotools' decoder does not even check the total). Format (pycocotools' ``rleToString``):
    each count is a little-endian sequence of 5-bit chunks stored as ``chr(48 + chunk)``, 0x20
    meaning "more chunks follow" and 0x10 in the last chunk meaning negative; counts from the
    fourth on are stored as the difference to the count two places earlier.
    """
    counts = [c if isinstance(c, str) else "" for c in counts]
    parts = [_run_totals_batch(counts[i : i + _PARSE_BATCH]) for i in range(0, len(counts), _PARSE_BATCH)]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    return tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))  # type: ignore[return-value]


def _run_totals_batch(counts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(counts)
    lengths = np.fromiter((len(c) for c in counts), dtype=np.int64, count=n)
    well_formed = (lengths > 0) & np.fromiter((c.isascii() for c in counts), dtype=bool, count=n)
    if not lengths.sum():
        return np.zeros(n, np.int64), np.zeros(n, np.int64), well_formed
    string_end = np.cumsum(lengths)  # exclusive end offset of each string
    # "replace" keeps one byte per character, so offsets stay aligned for non-ASCII garbage.
    chars = (
        np.frombuffer("".join(counts).encode("ascii", errors="replace"), dtype=np.uint8).astype(np.int16) - 48
    )
    bad_char = (chars < 0) | (chars > 63)
    if bad_char.any():
        well_formed[np.unique(np.searchsorted(string_end, np.flatnonzero(bad_char), side="right"))] = False
        chars[bad_char] = 0

    ends = (chars & 0x20) == 0
    string_last = string_end[lengths > 0] - 1
    well_formed[lengths > 0] &= ends[string_last]  # a string must not stop mid-count
    ends[string_last] = True  # ...and a broken one must not bleed into the next string
    token_end = np.flatnonzero(ends)
    token_start = np.r_[0, token_end[:-1] + 1]
    token_len = token_end - token_start + 1
    token_owner = np.searchsorted(string_end, token_end, side="right")
    too_long = token_len > _MAX_TOKEN_CHUNKS
    if too_long.any():
        well_formed[np.unique(token_owner[too_long])] = False
        token_len = np.minimum(token_len, _MAX_TOKEN_CHUNKS)

    # Assemble each count from its chunks, one chunk position at a time (almost all counts are
    # one or two chunks, so later passes touch few tokens).
    values = (chars[token_start] & 0x1F).astype(np.int64)
    for k in range(1, int(token_len.max())):
        sel = np.flatnonzero(token_len > k)
        values[sel] |= (chars[token_start[sel] + k] & 0x1F).astype(np.int64) << (5 * k)
    negative = (chars[token_end] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * token_len[negative])

    first_token = np.searchsorted(token_owner, np.arange(n))
    position = np.arange(len(values)) - first_token[token_owner]
    # Undo the delta coding: counts at odd positions (from 1) and at even positions from 2 are
    # running sums of their stored values, per string.
    runs = values.copy()
    for selected in (position % 2 == 1, (position % 2 == 0) & (position >= 2)):
        idx = np.flatnonzero(selected)
        cumulative = np.cumsum(values[idx])
        group_start = np.r_[True, token_owner[idx][1:] != token_owner[idx][:-1]]
        before_group = (cumulative - values[idx])[group_start]
        runs[idx] = cumulative - before_group[np.cumsum(group_start) - 1]
    negative_runs = runs < 0
    if negative_runs.any():
        well_formed[np.unique(token_owner[negative_runs])] = False
    total = np.bincount(token_owner, weights=runs, minlength=n).astype(np.int64)
    foreground = position % 2 == 1  # COCO RLE starts with a background run
    area = np.bincount(token_owner[foreground], weights=runs[foreground], minlength=n).astype(np.int64)
    return total, area, well_formed


# ---- masks -> COCO polygons ("box to polygon") ----------------------------------------------------


def polygons(rle: dict[str, Any], tolerance: float = 0.0) -> list[list[float]]:
    """One mask (a pycocotools RLE dict; ``counts`` as str or bytes) -> COCO polygon segmentation.

    Returns ``[[x0, y0, x1, y1, ...], ...]``: one closed polygon per 8-connected part of the mask,
    largest first, in COCO's continuous pixel-edge coordinates (pixel ``(x, y)`` spans ``[x, x + 1) x
    [y, y + 1)``, as ``pycocotools.mask.frPyObjects`` rasterises). An empty mask gives ``[]``.

    The polygons trace the pixels' outer EDGES, not their centres: ``cv2.findContours`` (external
    contours, ``CHAIN_APPROX_SIMPLE``) runs on the grid of pixel corners of the mask upsampled 2x, a
    corner being set when any pixel touching it is set. Plain contours of the mask would run through
    the boundary pixels' centres and lose half a pixel all round (a 3 px wide stem would come back 2 px
    wide); upsampling first keeps parts one pixel apart from being bridged. Rasterised back by
    pycocotools, the polygons give exactly the mask's pixels, holes filled (tests/test_polygons.py).

    Holes are FILLED: COCO polygons have no holes (a segmentation's polygons are unioned), so only
    external contours are kept and a ring comes back as a disc. Use the RLE itself where holes matter.
    Contours with fewer than 3 vertices cannot enclose area and are dropped (pycocotools would also
    read a 4-number list as a box). ``tolerance`` > 0 simplifies each polygon with Douglas-Peucker
    (``cv2.approxPolyDP``): no vertex moves the outline by more than ``tolerance`` pixels.
    """
    import cv2  # deferred: only polygon export needs OpenCV

    mask = mask_utils.decode(rle_object(rle["counts"], *rle["size"]))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return []
    top, left = int(rows[0]), int(cols[0])
    crop = mask[top : rows[-1] + 1, left : cols[-1] + 1].astype(bool)
    up = crop.repeat(2, axis=0).repeat(2, axis=1)
    # corners[v, u]: corner (u, v) of the upsampled pixel grid, set when one of the <= 4 pixels around it is.
    corners = np.zeros((up.shape[0] + 1, up.shape[1] + 1), bool)
    for dy in (0, 1):
        for dx in (0, 1):
            corners[dy : dy + up.shape[0], dx : dx + up.shape[1]] |= up
    contours, _ = cv2.findContours(corners.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    found = []
    for contour in contours:
        if tolerance > 0:
            contour = cv2.approxPolyDP(contour, 2 * tolerance, True)
        points = contour.reshape(-1, 2)
        if len(points) < 3:
            continue
        found.append((cv2.contourArea(contour), points / 2.0 + (left, top)))
    found.sort(key=lambda item: -item[0])
    return [points.reshape(-1).tolist() for _, points in found]
