"""A gold set and the mask agreement metrics predictions are scored with against it: IoU and CD-IoU.

A gold set on disk is ``images/`` and ``masks/`` whose files share a stem; masks are white on black.

Contour-discounted IoU (CD-IoU), precisely. For a ground-truth mask G and a prediction P on the
same H x W grid, a band width ``w >= 0`` (pixels) and a factor ``f`` in [0, 1]:

* the *contour band* B is every pixel within Chebyshev distance ``w`` of G's edge, on either side:
  ``B = dilate(G, S) \\ erode(G, S)`` with S the (2w+1) x (2w+1) square. The image border is not an
  edge (pixels outside the image count as "unknown", so G touching the border is not eroded there).
  For an axis-aligned rectangle G this is the ring between G grown by w and G shrunk by w, i.e. a
  band ``2w`` pixels thick centred on the edge; ``w = 0`` gives an empty band.
* each pixel has weight ``1 - f`` inside B and ``1`` elsewhere;
* ``CD-IoU = sum(weight over P & G) / sum(weight over P | G)``.

``f = 0`` (or ``w = 0``) is plain IoU; ``f = 1`` ignores the band entirely, so disagreement about
exactly where an ambiguous boundary lies is not penalised. When P | G has zero weight (both masks
empty, or everything in an ignored band) the score is 1.0: there is nothing to disagree about.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MASK_THRESHOLD = 128  # masks may be JPEGs: anything brighter than mid-grey is foreground


@dataclass(frozen=True)
class EvalImage:
    """One upright gold image: its id, encoded bytes (as stored) and RGB pixels (H, W, 3) uint8."""

    image_id: str
    data: bytes
    pixels: np.ndarray

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


@dataclass(frozen=True)
class GoldSet:
    images: list[EvalImage]
    masks: dict[str, np.ndarray]  # image_id -> bool (H, W)
    unmatched: list[str]  # image or mask files without a partner


def _by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def upright_rgb(data: bytes) -> np.ndarray:
    """Decode and apply EXIF orientation, like the pipeline's normalised images."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def load_gold_set(root: str | Path) -> GoldSet:
    root = Path(root)
    images, masks = _by_stem(root / "images"), _by_stem(root / "masks")
    if not images:
        raise ValueError(f"no images in {root / 'images'}")
    eval_images, gold = [], {}
    for stem in sorted(set(images) & set(masks)):
        data = images[stem].read_bytes()
        pixels = upright_rgb(data)
        with Image.open(masks[stem]) as mask_image:
            mask = np.asarray(ImageOps.exif_transpose(mask_image).convert("L")) >= MASK_THRESHOLD
        if mask.shape != pixels.shape[:2]:
            raise ValueError(f"{stem}: mask is {mask.shape[::-1]}, image is {pixels.shape[1::-1]} (w, h)")
        eval_images.append(EvalImage(image_id=stem, data=data, pixels=pixels))
        gold[stem] = mask
    unmatched = sorted(set(images) ^ set(masks))
    return GoldSet(images=eval_images, masks=gold, unmatched=unmatched)


# -- metrics ---------------------------------------------------------------------------------------


def _as_bool(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask).astype(bool, copy=False)


def contour_band(gt: np.ndarray, width: int) -> np.ndarray:
    """Boolean band of pixels within Chebyshev distance ``width`` of the GT edge (see module doc)."""
    gt = _as_bool(gt)
    if width < 0:
        raise ValueError(f"band width must be >= 0, got {width}")
    if width == 0:
        return np.zeros_like(gt)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    mask = gt.astype(np.uint8)
    # OpenCV's default border for dilate/erode leaves the image border neutral, as defined above.
    return cv2.dilate(mask, kernel).astype(bool) & ~cv2.erode(mask, kernel).astype(bool)


def contour_weights(gt: np.ndarray, factor: float, band_width: int) -> np.ndarray:
    """Per-pixel weights: ``1 - factor`` inside the contour band, 1 elsewhere (float64)."""
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"contour factor must be in [0, 1], got {factor}")
    weights = np.ones(np.shape(gt), dtype=np.float64)
    weights[contour_band(gt, band_width)] = 1.0 - factor
    return weights


def weighted_iou(pred: np.ndarray, gt: np.ndarray, weights: np.ndarray) -> float:
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape or weights.shape != gt.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape}, gt {gt.shape}, weights {weights.shape}")
    union = float(weights[pred | gt].sum())
    return float(weights[pred & gt].sum()) / union if union > 0 else 1.0


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Plain IoU; 1.0 when both masks are empty."""
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape}, gt {gt.shape}")
    union = int(np.count_nonzero(pred | gt))
    return np.count_nonzero(pred & gt) / union if union else 1.0


def contour_discounted_iou(pred: np.ndarray, gt: np.ndarray, factor: float, band_width: int) -> float:
    """CD-IoU as defined in the module docstring."""
    return weighted_iou(pred, gt, contour_weights(gt, factor, band_width))
