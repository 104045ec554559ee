"""Quality gates a dataset version must pass before it is published (the dataset's blocking asset checks).

Each gate looks at what is about to be published and says pass or fail, with what it found:

* ``labels_match_candidates``: every shard's labels were made from the detections and masks stored now
  (:mod:`pseudolabel.labels.lineage`); fails naming the stale shards (relabel them first).
* ``provenance_complete``: every image sample names the detector and segmenter that made its labels
  (verified samples are the reviewer's and need none).
* ``one_thresholds_version``: every shard was labelled with the same thresholds (a relabel backfill that
  is still running makes a mixed set), unless mixing is allowed explicitly.
* ``reviewed_precision``: per class with at least ``min_reviewed`` reviewed kept instances in the review
  queue's uniform sample, the estimated precision reaches the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

GATES = ("labels_match_candidates", "provenance_complete", "one_thresholds_version", "reviewed_precision")
GATE_DESCRIPTIONS = {
    "labels_match_candidates": "Every shard's labels were made from the detections and masks stored now.",
    "provenance_complete": "Every image sample names the detector and segmenter that made its labels.",
    "one_thresholds_version": "Every shard was labelled with the same thresholds file.",
    "reviewed_precision": "Reviewed precision per class (uniform sample) reaches the target.",
}
MAX_LISTED = 50


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


def _listed(items: list[str]) -> list[str]:
    return items[:MAX_LISTED] + ([f"... {len(items) - MAX_LISTED} more"] if len(items) > MAX_LISTED else [])


def dataset_gates(
    samples: pd.DataFrame,
    *,
    stale: dict[str, str],
    precision: pd.DataFrame,
    target_precision: float,
    min_reviewed: int,
    allow_mixed_thresholds: bool = False,
) -> list[GateResult]:
    """The gates over ``samples`` (SAMPLE_COLUMNS rows about to be published), ``stale`` shards
    (:func:`~pseudolabel.labels.lineage.stale_shards`) and per-class ``precision``
    (:func:`~pseudolabel.review.corrections.kept_precision`)."""
    images = samples.loc[~samples["source_key"].astype(str).str.startswith("video_frames/")]
    machine = images.loc[~images["verified"].astype(bool)] if "verified" in images else images
    missing = machine.loc[machine["detector_model"].isna() | machine["segmenter_model"].isna()]
    fingerprints = sorted(samples["thresholds_fingerprint"].dropna().unique())
    judged = precision.loc[precision["kept"] >= min_reviewed] if len(precision) else precision
    below = judged.loc[judged["precision"] < target_precision] if len(judged) else judged
    return [
        GateResult(
            "labels_match_candidates",
            not stale,
            f"{len(stale)} stale shard(s): relabel them (relabel_job) before publishing"
            if stale
            else "labels of every shard match its stored candidates",
            {"stale_shards": {k: stale[k] for k in _listed(sorted(stale)) if k in stale}},
        ),
        GateResult(
            "provenance_complete",
            missing.empty,
            f"{len(missing)} image sample(s) without detector/segmenter provenance",
            {"shards": _listed(sorted(missing["shard"].unique()))},
        ),
        GateResult(
            "one_thresholds_version",
            len(fingerprints) <= 1 or allow_mixed_thresholds,
            f"{len(fingerprints)} thresholds version(s)"
            + (
                " (mixing allowed by allow_mixed_thresholds)"
                if len(fingerprints) > 1 and allow_mixed_thresholds
                else ""
            ),
            {
                "shards_by_fingerprint": {
                    f: _listed(sorted(samples.loc[samples["thresholds_fingerprint"] == f, "shard"].unique()))
                    for f in fingerprints
                }
            },
        ),
        GateResult(
            "reviewed_precision",
            below.empty,
            f"{len(below)} of {len(judged)} judged class(es) below precision {target_precision}"
            f" (classes with >= {min_reviewed} reviewed kept instances in the uniform sample)",
            {"below_target": below.to_dict("records") if len(below) else [], "judged": len(judged)},
        ),
    ]
