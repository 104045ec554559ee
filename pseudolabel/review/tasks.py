"""The review queue as Label Studio tasks: one task per image, the chain's proposals as its prediction.

A task shows the image's kept instances plus the dropped candidates the queue chose for it, each a region
with id ``c<candidate_id>`` (how :mod:`pseudolabel.review.corrections` traces a reviewer's edit back).
``data.review_key`` is the image id: re-pushing the queue never duplicates a task. ``data`` also records
why the image is there (``reasons``), which candidates the chain kept, and the thresholds and models that
made them, so a review can be read without the pipeline's storage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from pseudolabel.exports.label_studio import prediction_result, task
from pseudolabel.labels.coco import EMPTY_PHRASE_NAME
from pseudolabel.labels.relabel import KEPT

REVIEW_KEY = "review_key"


def review_tasks(
    queue: pd.DataFrame,
    candidates: pd.DataFrame,
    *,
    image_url: Callable[[str, str], str],
    model_version: str,
    thresholds_fingerprint: str,
    mask_format: str = "brush",
) -> list[dict[str, Any]]:
    """Tasks for the queue's images of one or more shards.

    ``queue``: rows of :func:`pseudolabel.review.queue.select_for_review` (image_id, shard, phrase, reason,
    candidate_id); ``candidates``: those shards' relabelled candidates (a RelabelResult's ``candidates``,
    with ``decision`` and mask columns); ``image_url(shard, image_id)``: where Label Studio loads the image.
    """
    frame = candidates.assign(phrase=candidates["phrase"].fillna("").replace("", EMPTY_PHRASE_NAME))
    by_image = dict(tuple(frame.groupby("image_id", sort=False)))
    tasks = []
    for (image_id, shard), items in queue.groupby(["image_id", "shard"], sort=True):
        rows = by_image.get(image_id)
        if rows is None:
            continue
        kept = rows["decision"].astype(str) == KEPT
        chosen = set(items["candidate_id"].astype(int)) - {-1}
        shown = rows.loc[kept | rows["candidate_id"].astype(int).isin(chosen)]
        result = [
            prediction_result(
                candidate_id=int(r.candidate_id),
                label=str(r.phrase),
                rle_counts=str(r.rle_counts),
                height=int(r.height),
                width=int(r.width),
                score=_score(r),
                mask_format=mask_format,
            )
            for r in shown.itertuples(index=False)
        ]
        tasks.append(
            task(
                image_url(shard, image_id),
                image_id=image_id,
                split=None,
                results=result,
                model_version=model_version,
                data={
                    "shard": shard,
                    REVIEW_KEY: image_id,
                    "reasons": ",".join(sorted(set(items["reason"]))),
                    "classes": ",".join(sorted(set(items["phrase"]))),
                    "kept_candidates": sorted(int(c) for c in rows.loc[kept, "candidate_id"]),
                    "thresholds_fingerprint": thresholds_fingerprint,
                },
            )
        )
    return tasks


def _score(row: Any) -> float | None:
    value = float(row.mask_score)
    return None if value != value else value  # NaN: the segmenter made no score
