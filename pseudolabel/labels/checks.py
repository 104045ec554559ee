"""Data-quality checks on a shard's kept instances (the pseudo_labels asset checks call these)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from pseudolabel.rle import rle_object, rle_run_totals, union_area

MAX_REPORTED_FAILURES = 20
DECODE_SAMPLE = 64  # RLEs per shard also fully decoded by pycocotools


@dataclass(frozen=True)
class RleCheck:
    checked: int
    failures: list[str] = field(default_factory=list)  # first MAX_REPORTED_FAILURES problems
    num_failures: int = 0

    @property
    def passed(self) -> bool:
        return self.num_failures == 0


def check_rles(kept: pd.DataFrame, decode_sample: int = DECODE_SAMPLE) -> RleCheck:
    """Every kept RLE must be a well-formed string whose runs cover exactly height x width pixels,
    with exactly the stored ``mask_area`` foreground pixels.

    All strings are parsed at once (:func:`~pseudolabel.rle.rle_run_totals`, no pixels);
    ``decode_sample`` of them, evenly spread, are also decoded with pycocotools as a cross-check.
    """
    failures: list[str] = []
    count = 0

    def fail(i: int, problem: str) -> None:
        nonlocal count
        count += 1
        if len(failures) < MAX_REPORTED_FAILURES:
            failures.append(f"{ids[i]}/{candidates[i]}: {problem}")

    ids, candidates = kept["image_id"].tolist(), kept["candidate_id"].tolist()
    strings = kept["rle_counts"].tolist()
    heights = kept["height"].to_numpy(np.int64)
    widths = kept["width"].to_numpy(np.int64)
    areas = kept["mask_area"].to_numpy(np.int64)
    totals, foreground, well_formed = rle_run_totals(strings)
    bad = ~well_formed | (totals != heights * widths) | (foreground != areas)
    for i in np.flatnonzero(bad):
        if not well_formed[i]:
            fail(i, "empty RLE string" if not strings[i] else "malformed RLE string")
        elif totals[i] != heights[i] * widths[i]:
            fail(
                i,
                f"runs cover {totals[i]} pixels, size {heights[i]}x{widths[i]} needs {heights[i] * widths[i]}",
            )
        else:
            fail(i, f"decodes to {foreground[i]} pixels, mask_area says {areas[i]}")
    for i in np.unique(np.linspace(0, len(kept) - 1, num=min(decode_sample, len(kept))).astype(int)):
        if bad[i]:  # already reported
            continue
        try:
            mask = mask_utils.decode(rle_object(strings[i], heights[i], widths[i]))
        except ValueError as exc:
            fail(i, f"pycocotools cannot decode it: {exc}")
            continue
        if mask.shape != (heights[i], widths[i]) or int(np.count_nonzero(mask)) != areas[i]:
            fail(i, f"pycocotools decodes a {mask.shape} mask with {int(np.count_nonzero(mask))} pixels")
    return RleCheck(checked=len(kept), failures=failures, num_failures=count)


def image_mask_fractions(kept: pd.DataFrame) -> pd.Series:
    """Fraction of each labelled image covered by the union of its kept masks (indexed by image_id).

    Single-instance images use the stored area; overlapping instances are merged as RLEs
    (pycocotools, no decoding) so overlaps are not double-counted.
    """
    if kept.empty:
        return pd.Series(dtype=np.float64, name="mask_fraction")
    frame = kept.sort_values("image_id", kind="stable")
    ids = frame["image_id"].to_numpy(dtype=object)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    heights = frame["height"].to_numpy(np.int64)
    widths = frame["width"].to_numpy(np.int64)
    covered = frame["mask_area"].to_numpy(np.float64)[starts]
    counts = frame["rle_counts"].tolist()
    for g in np.flatnonzero(ends - starts > 1):  # only images with several instances need a merge
        s, e = starts[g], ends[g]
        covered[g] = union_area([rle_object(counts[j], heights[s], widths[s]) for j in range(s, e)])
    return pd.Series(covered / (heights[starts] * widths[starts]), index=ids[starts], name="mask_fraction")


def within(value: float, low: float, high: float) -> bool:
    return bool(low <= value <= high)
