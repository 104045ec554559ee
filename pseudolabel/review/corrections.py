"""A reviewer's Label Studio annotation -> reviewed instances: accepted, corrected, rejected, added.

The review tasks show predictions whose region ids are ``c<candidate_id>`` (see
:mod:`pseudolabel.exports.label_studio`); Label Studio keeps a region's id when a reviewer starts from the
predictions. So, per task, comparing the latest submitted annotation with the task's prediction:

* a predicted region still present with the same class and the same mask -> ``accepted``;
* present with another mask or class -> ``corrected`` (the reviewer's mask and class are kept);
* missing -> ``rejected`` (the prediction's mask is kept for reference, it is not gold);
* a region with an id no prediction had -> ``added`` (an object the chain missed).

Gold instances are the accepted, corrected and added ones (:data:`GOLD_OUTCOMES`). A skipped
(cancelled) annotation reviews nothing. Masks are COCO RLE strings in the image's pixel grid, like every
other mask table of the project.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pycocotools import mask as mask_utils

from pseudolabel import layout
from pseudolabel.exports.label_studio import brush_rle_decode
from pseudolabel.quality.precision import precision_interval
from pseudolabel.schemas import REVIEWED_LABELS
from pseudolabel.storage import ObjectNotFound, ObjectStore, read_parquet

OUTCOMES = ("accepted", "corrected", "rejected", "added")
GOLD_OUTCOMES = ("accepted", "corrected", "added")
CANDIDATE_PREFIX = "c"


def region_mask(item: Mapping[str, Any]) -> tuple[str, np.ndarray] | None:
    """(class, bool mask HxW) of one Label Studio result item (brush RLE or polygon); None for items
    that are not masks (e.g. a choice or a text area)."""
    value = item.get("value") or {}
    height, width = int(item["original_height"]), int(item["original_width"])
    if item.get("type") == "brushlabels" and value.get("format") == "rle":
        labels = value.get("brushlabels") or []
        return (labels[0] if labels else ""), brush_rle_decode(value["rle"], height, width)
    if item.get("type") == "polygonlabels":
        labels = value.get("polygonlabels") or []
        points = np.asarray(value.get("points") or [], dtype=np.float64).reshape(-1, 2)
        mask = np.zeros((height, width), bool)
        if len(points) >= 3:  # percent -> pixel-edge coordinates, rasterised the way COCO polygons are
            flat = (points * [width / 100.0, height / 100.0]).ravel().tolist()
            mask = mask_utils.decode(mask_utils.frPyObjects([flat], height, width)[0]).astype(bool)
        return (labels[0] if labels else ""), mask
    return None


def _regions(result: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, np.ndarray]]:
    regions = {}
    for item in result:
        decoded = region_mask(item)
        if decoded is not None:
            regions[str(item.get("id", ""))] = decoded
    return regions


def _candidate_id(region_id: str) -> int | None:
    suffix = region_id.removeprefix(CANDIDATE_PREFIX)
    return int(suffix) if region_id.startswith(CANDIDATE_PREFIX) and suffix.isdigit() else None


def encode(mask: np.ndarray) -> tuple[str, int]:
    """COCO compressed RLE counts string and area of a bool mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return rle["counts"].decode("ascii"), int(mask_utils.area(rle))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.count_nonzero(a | b))
    return float(np.count_nonzero(a & b)) / union if union else 1.0


def latest_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The task's most recently updated submitted annotation, or None (none, or the latest was skipped)."""
    annotations = sorted(task.get("annotations") or [], key=lambda a: str(a.get("updated_at") or ""))
    if not annotations or annotations[-1].get("was_cancelled"):
        return None
    return annotations[-1]


def _reviewer(annotation: Mapping[str, Any]) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, Mapping):
        return str(who.get("email") or who.get("id") or "")
    return "" if who is None else str(who)


def reviewed_instances(task: Mapping[str, Any]) -> pd.DataFrame:
    """:data:`REVIEWED_LABELS` rows of one reviewed task (empty when it has no usable annotation)."""
    annotation = latest_annotation(task)
    if annotation is None:
        return pd.DataFrame(columns=REVIEWED_LABELS.names)
    data = task.get("data") or {}
    kept_ids = {int(c) for c in data.get("kept_candidates") or []}
    predicted = [item for p in task.get("predictions") or [] for item in p.get("result") or []]
    shown, final = _regions(predicted), _regions(annotation.get("result") or [])
    # An untouched region is accepted as is (a polygon re-rasterised could differ by a pixel row).
    raw_shown = {str(i.get("id", "")): i.get("value") for i in predicted}
    raw_final = {str(i.get("id", "")): i.get("value") for i in annotation.get("result") or []}
    common = {
        "image_id": str(data.get("image_id", "")),
        "shard": str(data.get("shard", "")),
        "task_id": int(task["id"]),
        "uniform_sample": "uniform" in str(data.get("reasons", "")).split(","),
        "annotation_id": int(annotation["id"]),
        "reviewer": _reviewer(annotation),
        "reviewed_at": str(annotation.get("updated_at") or annotation.get("created_at") or ""),
    }
    rows = []

    def row(outcome: str, region_id: str, phrase: str, mask: np.ndarray) -> None:
        candidate = _candidate_id(region_id) if outcome != "added" else None
        counts, area = encode(mask)
        predicted = shown.get(region_id)
        rows.append(
            {
                **common,
                "outcome": outcome,
                "candidate_id": -1 if candidate is None else candidate,
                "pipeline_kept": candidate in kept_ids if candidate is not None else False,
                "phrase": phrase,
                "predicted_phrase": predicted[0] if predicted else None,
                "iou_with_prediction": (
                    0.0 if outcome == "rejected" else mask_iou(mask, predicted[1]) if predicted else np.nan
                ),
                "rle_counts": counts,
                "height": mask.shape[0],
                "width": mask.shape[1],
                "mask_area": area,
            }
        )

    for region_id, (phrase, mask) in shown.items():
        if region_id not in final:
            row("rejected", region_id, phrase, mask)
            continue
        final_phrase, final_mask = final[region_id]
        same = final_phrase == phrase and (
            raw_final[region_id] == raw_shown[region_id] or np.array_equal(final_mask, mask)
        )
        row("accepted" if same else "corrected", region_id, final_phrase, final_mask)
    for region_id, (phrase, mask) in final.items():
        if region_id not in shown:
            row("added", region_id, phrase, mask)
    return pd.DataFrame(rows, columns=REVIEWED_LABELS.names)


def reviewed_table(tasks: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """:data:`REVIEWED_LABELS` rows of many tasks."""
    frames = [reviewed_instances(task) for task in tasks]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=REVIEWED_LABELS.names)
    return pd.concat(frames, ignore_index=True)


def merge_reviews(
    previous: pd.DataFrame, new: pd.DataFrame, reviewed_task_ids: Iterable[int]
) -> pd.DataFrame:
    """The stored table with every task in ``reviewed_task_ids`` replaced by its rows in ``new`` (a task
    reviewed again, or its annotation edited, counts once, as last submitted)."""
    task_ids = set(int(t) for t in reviewed_task_ids)
    kept = previous.loc[~previous["task_id"].astype(np.int64).isin(task_ids)] if len(previous) else previous
    merged = (
        pd.concat([f for f in (kept, new) if len(f)], ignore_index=True) if len(kept) or len(new) else new
    )
    if merged.empty:
        return pd.DataFrame(columns=REVIEWED_LABELS.names)
    return merged.sort_values(["image_id", "task_id", "candidate_id"], kind="stable").reset_index(drop=True)


def gold_instances(reviewed: pd.DataFrame) -> pd.DataFrame:
    """The human-verified instances: accepted, corrected and added."""
    return reviewed.loc[reviewed["outcome"].isin(GOLD_OUTCOMES)].reset_index(drop=True)


def reviewed_arrow(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame[REVIEWED_LABELS.names], schema=REVIEWED_LABELS, preserve_index=False)


def kept_precision(
    reviewed: pd.DataFrame, iou_threshold: float = 0.5, uniform_only: bool = True
) -> pd.DataFrame:
    """Per class, the share of the chain's kept instances a reviewer confirmed: accepted, or corrected to a
    mask of the same class with IoU >= ``iou_threshold`` with the one shown; with a Wilson interval.

    ``uniform_only`` counts only images of the queue's uniform random sample, the unbiased estimate of
    the precision of all labels of the class (the informative items over-represent hard cases)."""
    rows = reviewed.loc[reviewed["pipeline_kept"].astype(bool) & (reviewed["outcome"] != "added")]
    if uniform_only:
        rows = rows.loc[rows["uniform_sample"].astype(bool)]
    confirmed = (
        rows["outcome"].isin(("accepted", "corrected"))
        & (rows["phrase"] == rows["predicted_phrase"])
        & (rows["iou_with_prediction"].astype(float) >= iou_threshold)
    )
    table = (
        pd.DataFrame({"class": rows["predicted_phrase"], "correct": confirmed})
        .groupby("class")["correct"]
        .agg(kept="size", correct="sum")
        .reset_index()
    )
    intervals = [
        precision_interval(int(c), int(n)) for c, n in zip(table["correct"], table["kept"], strict=True)
    ]
    table["precision"] = table["correct"] / table["kept"]
    table["ci_low"] = [low for low, _ in intervals]
    table["ci_high"] = [high for _, high in intervals]
    return table


def read_reviewed(store: ObjectStore) -> pd.DataFrame:
    """The stored reviewed instances (an empty table before the first review)."""
    try:
        return read_parquet(store, layout.REVIEWED_LABELS).to_pandas()
    except ObjectNotFound:
        return pd.DataFrame(columns=REVIEWED_LABELS.names)
