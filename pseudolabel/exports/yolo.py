"""Ultralytics YOLO segmentation labels: one ``.txt`` per image, one line per instance, and ``data.yaml``.

A line is ``<class> x1 y1 x2 y2 ...``: the class index (0-based, the order of ``names`` in data.yaml) and
the instance's outline normalised to [0, 1] by the image width and height. The outline is the mask's
outer pixel-edge polygon (:func:`pseudolabel.rle.polygons`, the same geometry as the COCO polygon export,
holes filled); a mask of several parts becomes one polygon, the parts joined at their closest points
(:func:`join_parts`), because the format has one polygon per instance. An image without instances gets
an empty file: Ultralytics reads it as a background image.

Coordinates are pixel edges (a w-pixel-wide box spans w / W): the shape itself, for readers that treat
the polygon as geometry (CVAT, FiftyOne, a rasteriser sampling pixel centres). Ultralytics' own training
rasteriser (``polygon2mask``: truncate to int, ``cv2.fillPoly``, which fills the boundary too) covers every
mask pixel plus up to a one-pixel rim (on the right and bottom edges), at the training resolution and
before it downsamples the mask 4x.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np
import yaml

COORDINATE_DECIMALS = 6  # 1e-6 of a 10,000 px image is 0.01 px
_CHUNK = 1024  # outline points per distance block (bounds the pairwise-distance matrix)


def _closest_pair(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Indices (i, j) of the closest points ``a[i]``, ``b[j]`` of two (N, 2) point sets."""
    best, pair = np.inf, (0, 0)
    for start in range(0, len(a), _CHUNK):
        block = a[start : start + _CHUNK]
        distances = ((block[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
        if distances[i, j] < best:
            best, pair = float(distances[i, j]), (start + int(i), int(j))
    return pair


def join_parts(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Several closed outlines ((N_k, 2) each, largest first) -> one closed (N, 2) polygon.

    As Ultralytics' ``merge_multi_segment`` does, each part is connected by its closest points and the
    connecting segment is walked there and back, so the joined polygon encloses the same area (the
    connection has zero width). Each part is spliced into the outline built so far at the point of it
    closest to the part (``merge_multi_segment`` connects each part to the one before it).
    """
    if not parts:
        raise ValueError("no outline to join")
    joined = np.asarray(parts[0], np.float64).reshape(-1, 2)
    for part in parts[1:]:
        part = np.asarray(part, np.float64).reshape(-1, 2)
        i, j = _closest_pair(joined, part)
        loop = np.roll(part, -j, axis=0)  # starts at the closest point
        joined = np.concatenate([joined[: i + 1], loop, loop[:1], joined[i:]])
    return joined


@functools.lru_cache(maxsize=256)
def _half_pixel_strings(size: int) -> np.ndarray:
    """The text of k / 2 / ``size`` for k = 0 .. 2 * size: every coordinate an outline from
    :func:`pseudolabel.rle.polygons` can have along an axis of ``size`` pixels (it runs on half pixels)."""
    return np.array([f"{k / (2 * size):.{COORDINATE_DECIMALS}f}" for k in range(2 * size + 1)], dtype=object)


def label_line(class_index: int, outline: np.ndarray, width: int, height: int) -> str:
    """One label line: ``<class> x1 y1 ...`` with the (N, 2) pixel-edge outline normalised to [0, 1]
    (``COORDINATE_DECIMALS`` decimals; half-pixel coordinates are looked up, not formatted one by one)."""
    points = np.clip(np.asarray(outline, np.float64).reshape(-1, 2), 0.0, (width, height))
    halves = points * 2
    steps = np.rint(halves).astype(np.int64)
    if np.array_equal(steps, halves):
        text = np.empty(steps.size, dtype=object)
        text[0::2] = _half_pixel_strings(int(width))[steps[:, 0]]
        text[1::2] = _half_pixel_strings(int(height))[steps[:, 1]]
        numbers = " ".join(text.tolist())
    else:  # a simplified or otherwise off-grid outline
        normalised = points / (width, height)
        numbers = " ".join(f"{v:.{COORDINATE_DECIMALS}f}" for v in normalised.ravel().tolist())
    return f"{int(class_index)} {numbers}"


def label_file(lines: Iterable[str]) -> bytes:
    """The ``.txt`` of one image (empty for a background image)."""
    return "".join(f"{line}\n" for line in lines).encode()


def data_yaml(categories: Sequence[str], splits: Sequence[str]) -> str:
    """``data.yaml``: the image folder of each split and the class names by index.

    There is no ``path:`` key: Ultralytics then resolves the split folders against the folder of this
    file, wherever the dataset is copied (``path: .`` would mean the trainer's working directory).
    """
    body = {split: f"images/{split}" for split in splits}
    body["nc"] = len(categories)
    body["names"] = dict(enumerate(categories))
    header = (
        "# Ultralytics YOLO segmentation dataset: labels/<split>/<id>.txt next to images/<split>/<id>.jpg.\n"
        "# Split folders are relative to this file (no `path:` key).\n"
    )
    return header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)
