"""A deliberately naive, per-image Python re-labeller: the spec written as plain loops.

Not used by the pipeline. Tests check the vectorised :func:`~pseudolabel.labels.relabel.relabel_shard`
against it, and ``bench/relabel.py`` uses it as the baseline, so both compare like with like.
"""

from __future__ import annotations

import pandas as pd

from pseudolabel.labels.thresholds import PickPolicy, Thresholds


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = max(a[2] - a[0], 0) * max(a[3] - a[1], 0) + max(b[2] - b[0], 0) * max(b[3] - b[1], 0) - inter
    return inter / union if union > 0 else 0.0


def _passes_filters(c: dict, t: Thresholds) -> str | None:
    """The first failed filter's name, or None."""
    if c.get("rle_counts") is None or pd.isna(c.get("rle_counts")):
        return "no_mask"
    w, h = float(c["width"]), float(c["height"])
    if not c["box_score"] >= t.box_score:
        return "box_score"
    if not c["text_score"] >= t.text_score:
        return "text_score"
    bw = max(min(max(c["x1"], 0), w) - min(max(c["x0"], 0), w), 0)
    bh = max(min(max(c["y1"], 0), h) - min(max(c["y0"], 0), h), 0)
    if not (bw * bh) / (w * h) < t.max_box_coverage:
        return "box_coverage"
    if not c["mask_score"] >= t.mask_score:
        return "mask_score"
    if not c["mask_area"] / (w * h) >= t.min_mask_area_fraction:
        return "mask_area"
    return None


def _label_image(candidates: list[dict], t: Thresholds, rejected: dict[str, int]) -> list[dict]:
    survivors = []
    for c in candidates:
        reason = _passes_filters(c, t)
        if reason is None:
            survivors.append(c)
        else:
            rejected[reason] += 1
    # Class-aware greedy NMS, highest detector score first.
    survivors.sort(key=lambda c: (-c["box_score"], c["candidate_id"]))
    kept: list[dict] = []
    for c in survivors:
        box = (c["x0"], c["y0"], c["x1"], c["y1"])
        if any(
            k["phrase"] == c["phrase"] and _iou((k["x0"], k["y0"], k["x1"], k["y1"]), box) > t.nms_iou
            for k in kept
        ):
            rejected["nms"] += 1
        else:
            kept.append(c)
    if kept and t.pick_policy is PickPolicy.BEST_MASK_SCORE:
        best = max(kept, key=lambda c: (c["mask_score"], c["box_score"], -c["candidate_id"]))
        rejected["policy"] += len(kept) - 1
        kept = [best]
    elif kept and t.pick_policy is PickPolicy.BOTH_SCORES_AGREE:
        # Scan in the detector's output order (query_index) when stored, else in detector-score order.
        scan = kept
        if "query_index" in kept[0]:
            scan = sorted(kept, key=lambda c: (c["query_index"], c["candidate_id"]))
        best = scan[0]
        for c in scan[1:]:
            if c["mask_score"] > best["mask_score"] and c["box_score"] > best["box_score"]:
                best = c
        rejected["policy"] += len(kept) - 1
        kept = [best]
    rejected["max_instances"] += max(len(kept) - t.max_instances_per_image, 0)
    return kept[: t.max_instances_per_image]


def naive_relabel(
    detections: pd.DataFrame, masks: pd.DataFrame, thresholds: Thresholds
) -> tuple[pd.DataFrame, dict[str, int]]:
    """(kept rows with image_id + candidate_id, reject counts) computed one image at a time."""
    rejected = dict.fromkeys(
        (
            "no_mask",
            "box_score",
            "text_score",
            "box_coverage",
            "mask_score",
            "mask_area",
            "nms",
            "policy",
            "max_instances",
        ),
        0,
    )
    joined = detections.merge(masks, on=["image_id", "candidate_id"], how="left")
    joined["phrase"] = joined["phrase"].fillna("")
    kept_rows = []
    for _image_id, group in joined.groupby("image_id", sort=True):
        kept_rows.extend(_label_image(group.to_dict("records"), thresholds, rejected))
    kept = pd.DataFrame(kept_rows, columns=list(joined.columns))
    return kept[["image_id", "candidate_id"]].reset_index(drop=True), rejected
