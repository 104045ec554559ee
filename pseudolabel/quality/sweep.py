"""Score threshold choices against a gold set, reusing one set of model candidates for every choice.

Each (pick policy, box threshold, mask threshold) runs the exact per-shard function the
pseudo_labels asset uses; an image's prediction is the union of its kept masks (what AutoSAM2's
binary mask would be), scored by IoU and CD-IoU against the gold mask. An image with no kept
instance predicts an empty mask. :func:`plot_sweep` draws a sweep as one PNG.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pseudolabel.labels.relabel import ShardCandidates, relabel_shard
from pseudolabel.labels.thresholds import PickPolicy, Thresholds
from pseudolabel.quality.gold import contour_weights, iou, weighted_iou
from pseudolabel.rle import decode_union, rle_object

SWEEP_COLUMNS = [
    "policy",
    "box_score",
    "mask_score",
    "mean_iou",
    "mean_cd_iou",
    "empty_rate",
    "mean_instances",
    "images",
]


@dataclass
class GoldScorer:
    """Scores predicted instance sets per gold image, memoising by the set of kept candidates
    (many threshold choices keep the same instances, so most look-ups skip decoding)."""

    gold: Mapping[str, np.ndarray]
    rles: Mapping[tuple[str, int], str]  # (image_id, candidate_id) -> RLE counts
    contour_factor: float
    band_width: int

    def __post_init__(self) -> None:
        self._weights = {
            k: contour_weights(m, self.contour_factor, self.band_width) for k, m in self.gold.items()
        }
        self._memo: dict[tuple[str, tuple[int, ...]], tuple[float, float]] = {}

    def score(self, image_id: str, candidate_ids: Iterable[int]) -> tuple[float, float]:
        key = (image_id, tuple(sorted(int(c) for c in candidate_ids)))
        if key not in self._memo:
            gt = self.gold[image_id]
            height, width = gt.shape
            pred = decode_union(
                [rle_object(self.rles[(image_id, c)], height, width) for c in key[1]], height, width
            )
            pred = pred.astype(bool)
            self._memo[key] = (iou(pred, gt), weighted_iou(pred, gt, self._weights[image_id]))
        return self._memo[key]


def per_image_scores(candidates: ShardCandidates, scorer: GoldScorer, thresholds: Thresholds) -> pd.DataFrame:
    """One row per gold image: its IoU, CD-IoU and number of kept instances under ``thresholds``."""
    kept = relabel_shard(candidates.detections, candidates.masks, thresholds, candidates.images).kept
    kept_ids = kept.groupby("image_id")["candidate_id"].agg(list).to_dict()
    rows = []
    for image_id in scorer.gold:
        ids = kept_ids.get(image_id, [])
        plain, discounted = scorer.score(image_id, ids)
        rows.append({"image_id": image_id, "iou": plain, "cd_iou": discounted, "instances": len(ids)})
    return pd.DataFrame(rows, columns=["image_id", "iou", "cd_iou", "instances"])


def summarise(scores: pd.DataFrame) -> dict[str, float]:
    return {
        "mean_iou": float(scores["iou"].mean()),
        "mean_cd_iou": float(scores["cd_iou"].mean()),
        "empty_rate": float((scores["instances"] == 0).mean()),
        "mean_instances": float(scores["instances"].mean()),
        "images": len(scores),
    }


def make_scorer(
    candidates: ShardCandidates, gold: Mapping[str, np.ndarray], contour_factor: float, band_width: int
) -> GoldScorer:
    masks = candidates.masks
    rles = dict(
        zip(
            zip(masks["image_id"], masks["candidate_id"].astype(int), strict=True),
            masks["rle_counts"],
            strict=True,
        )
    )
    return GoldScorer(gold=gold, rles=rles, contour_factor=contour_factor, band_width=band_width)


def threshold_sweep(
    candidates: ShardCandidates,
    scorer: GoldScorer,
    base: Thresholds,
    *,
    box_scores: Sequence[float],
    mask_scores: Sequence[float],
    policies: Sequence[PickPolicy | str] = tuple(PickPolicy),
) -> pd.DataFrame:
    """Mean IoU / CD-IoU for every (policy, box threshold, mask threshold); other thresholds from ``base``."""
    rows = []
    for policy in policies:
        for box_score in box_scores:
            for mask_score in mask_scores:
                thresholds = base.with_overrides(
                    pick_policy=policy, box_score=box_score, mask_score=mask_score
                )
                summary = summarise(per_image_scores(candidates, scorer, thresholds))
                rows.append(
                    {
                        "policy": str(PickPolicy(policy)),
                        "box_score": float(box_score),
                        "mask_score": float(mask_score),
                        **summary,
                    }
                )
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)


def scores_by_policy(
    candidates: ShardCandidates,
    scorer: GoldScorer,
    thresholds: Thresholds,
    policies: Sequence[PickPolicy | str],
) -> pd.DataFrame:
    """Summary per pick policy at ``thresholds`` (e.g. the current file), one row each."""
    rows = [
        {
            "policy": str(PickPolicy(p)),
            **summarise(per_image_scores(candidates, scorer, thresholds.with_overrides(pick_policy=p))),
        }
        for p in policies
    ]
    return pd.DataFrame(rows, columns=["policy", *SWEEP_COLUMNS[3:]])


def best_per_policy(sweep: pd.DataFrame, metric: str = "mean_cd_iou") -> pd.DataFrame:
    """The best row per policy by ``metric`` (ties: the higher, i.e. stricter, thresholds)."""
    ordered = sweep.sort_values([metric, "box_score", "mask_score"], ascending=[False, False, False])
    return ordered.drop_duplicates("policy").sort_values("policy").reset_index(drop=True)


def plot_sweep(sweep: pd.DataFrame, title: str = "") -> bytes:
    """The sweep as PNG bytes: a column per pick policy, IoU and CD-IoU rows, a line per box threshold.

    Uses a bare Agg Figure (no pyplot state), so it is safe in any process or thread."""
    # matplotlib costs ~50 MB and a fraction of a second: paid when a sweep is drawn, not by every
    # process that loads the code location.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    policies = list(dict.fromkeys(sweep["policy"]))
    metrics = [("mean_iou", "mean IoU"), ("mean_cd_iou", "mean CD-IoU")]
    figure = Figure(figsize=(4.2 * max(len(policies), 1), 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(metrics), max(len(policies), 1), squeeze=False, sharex=True, sharey=True)
    for col, policy in enumerate(policies):
        rows = sweep[sweep["policy"] == policy]
        for row, (metric, label) in enumerate(metrics):
            ax = axes[row][col]
            for box_score, line in rows.groupby("box_score"):
                line = line.sort_values("mask_score")
                ax.plot(line["mask_score"], line[metric], marker="o", label=f"box >= {box_score:g}")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(policy)
            if row == len(metrics) - 1:
                ax.set_xlabel("mask score threshold")
            if col == 0:
                ax.set_ylabel(label)
    if policies:
        axes[0][0].legend(fontsize="small")
    if title:
        figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
