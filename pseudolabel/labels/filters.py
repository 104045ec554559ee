"""Per-candidate threshold filters, vectorised over a whole shard (no RLE decoding).

Every candidate gets the *first* filter it fails, in :data:`FILTER_ORDER`, so reject counts add up
to the number of candidates and the most basic reason wins (a low-score whole-image box counts as
``box_score``, not ``box_coverage``).
"""

from __future__ import annotations

import numpy as np

from pseudolabel.labels.thresholds import Thresholds

PASSED = -1
FILTER_ORDER = ("no_mask", "box_score", "text_score", "box_coverage", "mask_score", "mask_area")


def box_coverage(
    x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray, width: np.ndarray, height: np.ndarray
) -> np.ndarray:
    """Fraction of the image a box covers, after clipping the box to the image."""
    w = np.clip(x1, 0, width) - np.clip(x0, 0, width)
    h = np.clip(y1, 0, height) - np.clip(y0, 0, height)
    area = np.clip(w, 0, None) * np.clip(h, 0, None)
    image_area = np.asarray(width, dtype=np.float64) * np.asarray(height, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(image_area > 0, area / image_area, np.nan)


def mask_area_fraction(mask_area: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
    image_area = np.asarray(width, dtype=np.float64) * np.asarray(height, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(image_area > 0, np.asarray(mask_area, dtype=np.float64) / image_area, np.nan)


def first_failed_filter(
    *,
    has_mask: np.ndarray,
    box_score: np.ndarray,
    text_score: np.ndarray,
    coverage: np.ndarray,
    mask_score: np.ndarray,
    area_fraction: np.ndarray,
    thresholds: Thresholds,
) -> np.ndarray:
    """Index into :data:`FILTER_ORDER` of the first failed filter per candidate, or :data:`PASSED`.

    Scores pass when ``>=`` their threshold; coverage passes when ``<`` the maximum (a box covering
    exactly 80 % is dropped, as in the production pipeline). NaNs fail, so a candidate with a
    missing score is never kept by accident.
    """
    conditions = [
        ~has_mask,
        ~(box_score >= thresholds.box_score),
        ~(text_score >= thresholds.text_score),
        ~(coverage < thresholds.max_box_coverage),
        ~(mask_score >= thresholds.mask_score),
        ~(area_fraction >= thresholds.min_mask_area_fraction),
    ]
    assert len(conditions) == len(FILTER_ORDER)
    return np.select(conditions, list(range(len(FILTER_ORDER))), default=PASSED).astype(np.int8)
