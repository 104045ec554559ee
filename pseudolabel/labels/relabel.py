"""Re-threshold one shard's stored candidates: detections + masks + thresholds -> kept instances.

This is the whole label decision, and it never decodes an RLE: scores, mask area and boxes are
stored columns, so re-labelling 100k images after a threshold edit is a handful of vectorised
passes (see ``bench/relabel.py``). Steps, in order (2-5 are in :mod:`pseudolabel.labels.picking`):

1. join candidates with their masks (a candidate without a mask row is rejected as ``no_mask``);
2. per-candidate filters, first failure wins (thresholds per candidate: its phrase's ``classes``
   overrides in the thresholds file, else the global values);
3. class-aware NMS on detector boxes among survivors of the same image and phrase;
4. the pick policy; ``both_scores_agree`` scans each image's candidates in the detector's output
   order, the stored ``query_index`` (see :func:`relabel_shard` for candidates stored without it);
5. the per-image instance cap, by detector score.

Each rejected candidate is counted under exactly one reason, so ``kept + sum(rejected)`` equals the
number of candidates.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.fingerprint import THRESHOLDS_METADATA_KEY, with_fingerprint
from pseudolabel.labels.picking import (
    FILTER_ORDER,
    PASSED,
    apply_policy,
    box_coverage,
    cap_per_image,
    filter_limits,
    first_failed_filter,
    grouped_nms,
    mask_area_fraction,
)
from pseudolabel.labels.thresholds import Thresholds, thresholds_fingerprint
from pseudolabel.schemas import PSEUDO_LABELS

KEPT = "kept"
REJECT_REASONS = (*FILTER_ORDER, "nms", "policy", "max_instances")
DECISIONS = (KEPT, *REJECT_REASONS)

# The stored columns the label decision reads (what the asset loads from Parquet).
DETECTION_INPUT_COLUMNS = [
    "image_id",
    "candidate_id",
    "x0",
    "y0",
    "x1",
    "y1",
    "box_score",
    "text_score",
    "phrase",
]
# Read when the stored detections have them: shards written before a column existed lack it.
# query_index: the detector's output order, the scan order of the both_scores_agree policy.
OPTIONAL_DETECTION_INPUT_COLUMNS = ["query_index"]
MASK_INPUT_COLUMNS = [
    "image_id",
    "candidate_id",
    "rle_counts",
    "height",
    "width",
    "mask_area",
    "mask_x",
    "mask_y",
    "mask_w",
    "mask_h",
    "mask_score",
]


@dataclass(frozen=True)
class ShardCandidates:
    """One shard's stored model outputs, as read from storage."""

    detections: pd.DataFrame  # DETECTIONS rows
    images: pd.DataFrame  # DETECTION_IMAGES rows
    masks: pd.DataFrame  # MASKS rows


@dataclass(frozen=True)
class RelabelResult:
    """Outcome for one shard.

    ``candidates`` holds every candidate (joined with its mask columns) with a ``decision`` column
    (``"kept"`` or the reject reason); ``kept`` is the label table in :data:`PSEUDO_LABELS` columns.
    """

    candidates: pd.DataFrame
    kept: pd.DataFrame
    rejected: dict[str, int]
    num_images: int
    fingerprint: str

    @property
    def num_kept(self) -> int:
        return len(self.kept)

    @property
    def num_images_labelled(self) -> int:
        return int(self.kept["image_id"].nunique())

    @property
    def empty_image_rate(self) -> float:
        return 1.0 - self.num_images_labelled / self.num_images if self.num_images else 0.0


def detection_input_columns(available: Iterable[str]) -> list[str]:
    """The detection columns to read from a stored table whose columns are ``available``: all of
    :data:`DETECTION_INPUT_COLUMNS` plus the optional ones it has (e.g. ``query_index``)."""
    present = set(available)
    return DETECTION_INPUT_COLUMNS + [c for c in OPTIONAL_DETECTION_INPUT_COLUMNS if c in present]


def read_detections(data: bytes) -> pd.DataFrame:
    """The detection columns the label decision reads, from stored DETECTIONS Parquet bytes. Optional
    columns (``query_index``) are read only when the file has them, so shards stored before they
    existed still load (and :func:`relabel_shard` falls back for them)."""
    columns = detection_input_columns(pq.read_schema(io.BytesIO(data)).names)
    return pq.read_table(io.BytesIO(data), columns=columns).to_pandas()


def _join_masks(detections: pd.DataFrame, masks: pd.DataFrame) -> pd.DataFrame:
    joined = detections[detection_input_columns(detections.columns)].merge(
        masks[MASK_INPUT_COLUMNS],
        on=["image_id", "candidate_id"],
        how="left",
        sort=False,
        indicator="_has_mask",
    )
    joined["_has_mask"] = joined["_has_mask"].to_numpy() == "both"
    return joined


def relabel_shard(
    detections: pd.DataFrame,
    masks: pd.DataFrame,
    thresholds: Thresholds,
    images: pd.DataFrame | None = None,
) -> RelabelResult:
    """Apply ``thresholds`` to one shard's candidates (DETECTIONS rows) and masks (MASKS rows).

    ``images`` (DETECTION_IMAGES rows) only provides the image count, so zero-candidate images
    count as empty; without it, the images are those that have candidates.

    The ``both_scores_agree`` policy scans each image's candidates in ascending ``query_index`` (the
    detector's output order, as the seed did). When ``detections`` has no ``query_index`` column
    (shards stored before it existed, or evaluation detectors that do not report it) it falls back to
    the stored order, detector score descending, which keeps each image's top-detector-score
    survivor. A ``query_index`` column with missing values is an error.
    """
    frame = _join_masks(detections, masks)
    frame["phrase"] = frame["phrase"].fillna("")
    n = len(frame)

    has_mask = frame["_has_mask"].to_numpy()
    width = frame["width"].to_numpy(dtype=np.float64, na_value=np.nan)
    height = frame["height"].to_numpy(dtype=np.float64, na_value=np.nan)
    x0, y0, x1, y1 = (frame[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in ("x0", "y0", "x1", "y1"))
    box_score = frame["box_score"].to_numpy(dtype=np.float64, na_value=np.nan)
    mask_score = frame["mask_score"].to_numpy(dtype=np.float64, na_value=np.nan)
    candidate_id = frame["candidate_id"].to_numpy(dtype=np.int64)
    query_index = _query_index(frame)
    coverage = box_coverage(x0, y0, x1, y1, width, height)
    area_fraction = mask_area_fraction(
        frame["mask_area"].to_numpy(dtype=np.float64, na_value=np.nan), width, height
    )

    # Integer codes make the groupwise steps pure numpy (no string comparisons).
    image_code = pd.factorize(frame["image_id"])[0]
    phrase_code, phrases = pd.factorize(frame["phrase"])

    decision = first_failed_filter(
        has_mask=has_mask,
        box_score=box_score,
        text_score=frame["text_score"].to_numpy(dtype=np.float64, na_value=np.nan),
        coverage=coverage,
        mask_score=mask_score,
        area_fraction=area_fraction,
        limits=filter_limits(thresholds, phrase_code, phrases),
    )

    def stage(reason: str, step: Callable[[np.ndarray], np.ndarray]) -> None:
        """Run a groupwise step on the rows still alive; the rows it does not keep get ``reason``."""
        alive = np.flatnonzero(decision == PASSED)
        if len(alive):
            decision[alive[~step(alive)]] = REJECT_REASONS.index(reason)

    boxes = np.stack([x0, y0, x1, y1], axis=1)
    stage(
        "nms",
        lambda rows: grouped_nms(
            boxes[rows],
            box_score[rows],
            image_code[rows].astype(np.int64) * (int(phrase_code.max()) + 1) + phrase_code[rows],
            thresholds.nms_iou,
            tiebreak=candidate_id[rows],
        ),
    )
    stage(
        "policy",
        lambda rows: apply_policy(
            thresholds.pick_policy,
            image_code[rows],
            mask_score[rows],
            box_score[rows],
            candidate_id[rows],
            query_index=None if query_index is None else query_index[rows],
        ),
    )
    stage(
        "max_instances",
        lambda rows: cap_per_image(
            image_code[rows], box_score[rows], candidate_id[rows], thresholds.max_instances_per_image
        ),
    )

    codes = np.where(decision == PASSED, 0, decision.astype(np.int64) + 1)
    frame = frame.drop(columns="_has_mask")
    frame["decision"] = pd.Categorical.from_codes(codes, categories=list(DECISIONS))
    frame["area_fraction"] = area_fraction
    frame["box_coverage"] = coverage

    fingerprint = thresholds_fingerprint(thresholds)
    counts = np.bincount(codes, minlength=len(DECISIONS))
    rejected = {reason: int(counts[i + 1]) for i, reason in enumerate(REJECT_REASONS)}
    num_images = (
        int(images["image_id"].nunique()) if images is not None else int(image_code.max(initial=-1) + 1)
    )
    assert int(counts[0]) + sum(rejected.values()) == n
    return RelabelResult(
        candidates=frame,
        kept=_kept_table(frame, codes == 0, fingerprint),
        rejected=rejected,
        num_images=num_images,
        fingerprint=fingerprint,
    )


def _query_index(frame: pd.DataFrame) -> np.ndarray | None:
    """The detector output order per candidate, or None when the candidates do not record it."""
    if "query_index" not in frame.columns:
        return None
    column = frame["query_index"]
    if column.isna().any():
        raise ValueError(
            f"query_index is missing for {int(column.isna().sum())} of {len(column)} candidates; "
            "a shard's candidates must all record it or none"
        )
    return column.to_numpy(dtype=np.int64)


def _kept_table(frame: pd.DataFrame, kept: np.ndarray, fingerprint: str) -> pd.DataFrame:
    table = frame.loc[kept].sort_values(
        ["image_id", "box_score", "candidate_id"], ascending=[True, False, True]
    )
    table = table.reset_index(drop=True)
    table["rank"] = table.groupby("image_id", sort=False).cumcount()
    table["thresholds_fingerprint"] = fingerprint
    # Round-trip through the schema so dtypes are the same for empty and non-empty shards.
    return pseudo_labels_table(table).to_pandas()


def pseudo_labels_table(kept: pd.DataFrame, fingerprint: str | None = None) -> pa.Table:
    """Arrow table in :data:`PSEUDO_LABELS` columns; the fingerprint also goes in the schema metadata
    so a shard with no kept instance still says which thresholds made it."""
    table = pa.Table.from_pandas(kept[PSEUDO_LABELS.names], schema=PSEUDO_LABELS, preserve_index=False)
    if fingerprint is not None:
        table = with_fingerprint(table, fingerprint, THRESHOLDS_METADATA_KEY)
    return table


def combine_results(results: list[RelabelResult]) -> RelabelResult:
    """One summary over several shards (image ids are unique across shards), for multi-shard runs."""
    if len(results) == 1:
        return results[0]
    rejected: dict[str, int] = {}
    for result in results:
        for reason, count in result.rejected.items():
            rejected[reason] = rejected.get(reason, 0) + count
    return RelabelResult(
        candidates=pd.concat([r.candidates for r in results], ignore_index=True),
        kept=pd.concat([r.kept for r in results], ignore_index=True),
        rejected=rejected,
        num_images=sum(r.num_images for r in results),
        fingerprint=results[0].fingerprint,
    )


# -- summaries for run metadata --------------------------------------------------------------------

SCORE_COLUMNS = ("box_score", "text_score", "mask_score")


def score_histograms(result: RelabelResult, bins: int = 10) -> pd.DataFrame:
    """Counts per score bin on [0, 1] for all candidates and for kept ones: one row per bin."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    candidates = result.candidates
    kept = candidates["decision"].to_numpy() == KEPT
    table = {
        "bin": [
            f"[{lo:.2f}, {hi:.2f}{']' if i == bins - 1 else ')'}"
            for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True))
        ]
    }
    for column in SCORE_COLUMNS:
        values = candidates[column].to_numpy(dtype=np.float64, na_value=np.nan)
        table[f"{column} all"] = np.histogram(values[np.isfinite(values)], bins=edges)[0]
        kept_values = values[kept & np.isfinite(values)]
        table[f"{column} kept"] = np.histogram(kept_values, bins=edges)[0]
    return pd.DataFrame(table)


def decision_table(result: RelabelResult) -> pd.DataFrame:
    rows: Mapping[str, int] = {KEPT: result.num_kept, **result.rejected}
    total = max(sum(rows.values()), 1)
    return pd.DataFrame(
        {
            "decision": list(rows),
            "candidates": list(rows.values()),
            "share": [count / total for count in rows.values()],
        }
    )
