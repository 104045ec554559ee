"""Instance precision of pseudo-labels against reviewed (gold) instances, and per-class thresholds
chosen from that evidence.

Reviewed images have gold instances: masks a person accepted, corrected or added, each with its class
(the detector's phrase). The chain's stored candidates for the same images are scored against them
once, as a whole (every candidate, kept or not), so that the kept set of any threshold choice can be
scored without matching again.

Matching, and the approximation it makes. COCO evaluation matches the *kept* detections of an image
and class greedily by score, one-to-one, so whether a candidate counts as correct depends on which
others are kept. Here instead:

1. :func:`gold_matches` matches every candidate independently to its best gold instance of the same
   image and class (mask IoU on the RLEs, pycocotools, no decoding); it is *correct* when that IoU is
   ``>= iou_threshold``, and records which gold instance it is.
2. For a kept set, the true positives are the *distinct* gold instances matched by its correct
   candidates: a second kept candidate on the same gold instance is a false positive, as in COCO.
   Precision is true positives / kept, recall is true positives / gold instances of the class.

This equals COCO's greedy one-to-one result whenever no candidate reaches the IoU threshold with two
gold instances. For ``iou_threshold >= 0.5`` and gold instances of one class that do not overlap (as
reviewed instance masks are drawn) that holds: a mask with IoU >= 0.5 against a gold instance covers
at least half of itself with it, so it can do so for two disjoint ones only in the degenerate tie at
exactly 0.5. Greedy matching could then give the lower-scored duplicate the other instance; here it
stays a false positive (slightly pessimistic). Without ``matched_gold`` (a plain ``correct`` series)
every correct kept candidate counts as its own true positive, which is the same as long as no two kept
candidates match one gold instance (class-aware NMS makes that rare, but not impossible).

Precision is an instance-level ratio: with the reviewed images a uniform random sample of the shard's
images, it estimates the class's precision over all images. The Wilson interval treats instances as
independent; errors that cluster within images make the true uncertainty somewhat larger.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd
import yaml
from pycocotools import mask as mask_utils

from pseudolabel.labels.relabel import KEPT, ShardCandidates, relabel_shard
from pseudolabel.labels.thresholds import Thresholds
from pseudolabel.rle import rle_objects

KEY = ["image_id", "candidate_id"]
NO_MATCH = -1

DEFAULT_BOX_SCORES = tuple(round(0.2 + 0.05 * i, 2) for i in range(13))  # 0.20 .. 0.80
DEFAULT_MASK_SCORES = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50 .. 0.95

CLASS_PRECISION_COLUMNS = ["phrase", "kept", "correct", "precision", "ci_low", "ci_high"]
CURVE_COLUMNS = ["phrase", "box_score", "mask_score", "kept", "correct", "gold", "precision", "recall"]
TABLE_COLUMNS = [
    "phrase",
    "box_score",
    "mask_score",
    "precision",
    "recall",
    "ci_low",
    "ci_high",
    "kept",
    "correct",
    "gold",
    "reached_target",
    "best_precision",
    "target_precision",
]

# The precision-recall figure: one panel per class, at most this many panels in a row.
PANEL_PIXELS = (400, 320)  # width, height of one panel
PLOT_DPI = 100
MAX_PANEL_COLUMNS = 3


# -- matching --------------------------------------------------------------------------------------


def candidate_table(candidates: ShardCandidates) -> pd.DataFrame:
    """Detections joined with their masks: the table :func:`match_candidates` scores.

    Candidates without a mask row have no RLE; they stay in the table (never correct, and the label
    decision rejects them as ``no_mask`` anyway)."""
    masks = candidates.masks[[*KEY, "rle_counts", "height", "width", "mask_score"]]
    return candidates.detections.merge(masks, on=KEY, how="left", sort=False)


def _rles(frame: pd.DataFrame) -> list[dict]:
    """pycocotools RLE dicts of ``frame``'s masks (validated by :func:`rle_objects`; no decoding)."""
    return rle_objects(frame["rle_counts"].tolist(), frame["height"].tolist(), frame["width"].tolist())


def gold_matches(candidates: pd.DataFrame, gold: pd.DataFrame, iou_threshold: float = 0.5) -> pd.DataFrame:
    """Each candidate's best gold instance of the same image and class (see the module docstring).

    ``candidates`` has ``image_id, candidate_id, phrase, rle_counts, height, width`` (more columns are
    ignored; a missing RLE never matches), ``gold`` has ``image_id, phrase, rle_counts, height, width``.
    Returns one row per candidate, indexed by ``(image_id, candidate_id)``: ``gold_index`` (row
    position in ``gold`` of the best match, :data:`NO_MATCH` when below the threshold or none),
    ``iou`` (the best IoU, 0 when the class has no gold instance in the image) and ``correct``.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    index = pd.MultiIndex.from_frame(candidates[KEY])
    if not index.is_unique:
        raise ValueError("candidates must have unique (image_id, candidate_id) keys")
    best_iou = np.zeros(len(candidates))
    best_gold = np.full(len(candidates), NO_MATCH, dtype=np.int64)
    has_rle = candidates["rle_counts"].notna().to_numpy()
    gold_groups = gold.reset_index(drop=True).groupby(["image_id", "phrase"], sort=False).indices
    candidate_groups = candidates.reset_index(drop=True).groupby(["image_id", "phrase"], sort=False).indices
    for key, rows in candidate_groups.items():
        gold_rows = gold_groups.get(key)
        rows = rows[has_rle[rows]]
        if gold_rows is None or len(rows) == 0:
            continue
        dt, gt = _rles(candidates.iloc[rows]), _rles(gold.iloc[gold_rows])
        sizes = {tuple(r["size"]) for r in dt + gt}
        if len(sizes) > 1:
            raise ValueError(
                f"image {key[0]!r}, class {key[1]!r}: candidate and gold masks differ in size {sizes}"
            )
        ious = np.asarray(mask_utils.iou(dt, gt, [0] * len(gt)), dtype=np.float64).reshape(len(dt), len(gt))
        best = ious.argmax(axis=1)
        best_iou[rows] = ious[np.arange(len(rows)), best]
        best_gold[rows] = gold_rows[best]
    correct = best_iou >= iou_threshold
    return pd.DataFrame(
        {"gold_index": np.where(correct, best_gold, NO_MATCH), "iou": best_iou, "correct": correct},
        index=index,
    )


def match_candidates(candidates: pd.DataFrame, gold: pd.DataFrame, iou_threshold: float = 0.5) -> pd.Series:
    """Whether each candidate matches a gold instance of its class with mask IoU >= ``iou_threshold``:
    a bool series indexed by ``(image_id, candidate_id)`` (see :func:`gold_matches`)."""
    return gold_matches(candidates, gold, iou_threshold)["correct"]


def _lookup(series: pd.Series, keys: pd.DataFrame, what: str) -> np.ndarray:
    """``series`` (indexed by image_id, candidate_id) at ``keys``' rows; a key it lacks is an error."""
    values = series.reindex(pd.MultiIndex.from_frame(keys[KEY]))
    if values.isna().any():
        missing = keys.loc[values.isna().to_numpy(), KEY].head(3).to_dict("records")
        raise ValueError(f"{int(values.isna().sum())} candidates have no {what}, e.g. {missing}")
    return values.to_numpy()


# -- precision -------------------------------------------------------------------------------------


def precision_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct / total`` (``(0, 1)`` when ``total`` is 0).

    Unlike the normal approximation it stays inside [0, 1] and is sensible near 0 and 1 and for
    small counts, which is what per-class precision on a few reviewed images looks like."""
    if not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total, got {correct} of {total}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if total == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def class_precision(kept: pd.DataFrame, correct: pd.Series, confidence: float = 0.95) -> pd.DataFrame:
    """Per class (phrase) of the ``kept`` labels (``image_id, candidate_id, phrase``): kept, correct,
    precision and its Wilson interval. ``correct`` is :func:`match_candidates`' series; each correct
    kept label counts once. With the reviewed images a uniform random sample, this estimates each
    class's instance precision over all images (see the module docstring)."""
    flags = _lookup(correct, kept, "match verdict").astype(bool)
    counts = (
        pd.DataFrame({"phrase": kept["phrase"].to_numpy(), "correct": flags})
        .groupby("phrase", sort=True)["correct"]
        .agg(kept="size", correct="sum")
    )
    rows = []
    for phrase, row in counts.iterrows():
        n, k = int(row["kept"]), int(row["correct"])
        low, high = precision_interval(k, n, confidence)
        rows.append(
            {
                "phrase": phrase,
                "kept": n,
                "correct": k,
                "precision": _ratio(k, n),
                "ci_low": low,
                "ci_high": high,
            }
        )
    return pd.DataFrame(rows, columns=CLASS_PRECISION_COLUMNS)


# -- threshold proposal ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Proposal:
    """Per-class thresholds chosen from reviewed evidence.

    ``thresholds``: the base with a ``classes`` override (box_score, mask_score) for every class that
    reached the target at values other than its current ones; ``table``: one row per class
    (:data:`TABLE_COLUMNS`; a class that did not reach the target shows its current values and its
    ``best_precision`` over the grid); ``curves``: every grid point per class (:data:`CURVE_COLUMNS`).
    """

    thresholds: Thresholds
    table: pd.DataFrame
    curves: pd.DataFrame


def _restrict(candidates: ShardCandidates, image_ids: np.ndarray) -> ShardCandidates:
    """The candidates of ``image_ids`` only. Every step of the label decision acts within an image,
    so a class's decisions are the same whether other images are present or not."""
    detections = candidates.detections[candidates.detections["image_id"].isin(image_ids)]
    masks = candidates.masks[candidates.masks["image_id"].isin(image_ids)]
    images = candidates.images[candidates.images["image_id"].isin(image_ids)]
    return ShardCandidates(detections=detections, images=images, masks=masks)


@dataclass(frozen=True)
class _ClassEvidence:
    """One class's share of the evidence: the candidates of the images where it was detected, and
    each candidate's verdict aligned with ``candidates.detections`` rows."""

    phrase: str
    gold: int
    candidates: ShardCandidates
    correct: np.ndarray  # bool per detection row
    gold_index: np.ndarray | None  # matched gold instance per detection row (NO_MATCH when none)


def _class_evidence(
    candidates: ShardCandidates,
    phrase: str,
    gold: int,
    correct: pd.Series,
    matched_gold: pd.Series | None,
) -> _ClassEvidence:
    detections = candidates.detections
    images = detections.loc[(detections["phrase"].fillna("") == phrase).to_numpy(), "image_id"].unique()
    subset = _restrict(candidates, images)
    flags = _lookup(correct, subset.detections, "match verdict").astype(bool)
    gold_index = None if matched_gold is None else _lookup(matched_gold, subset.detections, "matched gold")
    return _ClassEvidence(phrase, gold, subset, flags, gold_index)


def _grid_point(evidence: _ClassEvidence, thresholds: Thresholds) -> dict:
    """The class's kept instances, true positives, precision and recall under ``thresholds``."""
    detections = evidence.candidates.detections
    decided = relabel_shard(detections, evidence.candidates.masks, thresholds).candidates
    # relabel_shard keeps the detections' row order (a left join), so verdicts align by position.
    assert len(decided) == len(detections)
    assert (decided["candidate_id"].to_numpy() == detections["candidate_id"].to_numpy()).all()
    kept = (decided["decision"] == KEPT).to_numpy() & (decided["phrase"] == evidence.phrase).to_numpy()
    hits_mask = kept & evidence.correct
    if evidence.gold_index is None:
        hits = int(hits_mask.sum())
    else:  # distinct gold instances: a duplicate on an already matched instance is a false positive
        hits = len(np.unique(evidence.gold_index[hits_mask]))
    limits = thresholds.for_class(evidence.phrase)
    return {
        "phrase": evidence.phrase,
        "box_score": limits.box_score,
        "mask_score": limits.mask_score,
        "kept": int(kept.sum()),
        "correct": hits,
        "gold": evidence.gold,
        "precision": _ratio(hits, int(kept.sum())),
        "recall": _ratio(hits, evidence.gold),
    }


def _choose(points: pd.DataFrame, target_precision: float) -> pd.Series | None:
    """The qualifying point with the most recall (ties: higher precision, then the stricter
    thresholds, box score first), or None when no point reaches the target."""
    qualifying = points[points["precision"] >= target_precision]
    if qualifying.empty:
        return None
    ordered = qualifying.sort_values(
        ["recall", "precision", "box_score", "mask_score"], ascending=False, kind="stable", na_position="last"
    )
    return ordered.iloc[0]


def propose_thresholds(
    candidates: ShardCandidates,
    correct: pd.Series,
    gold_counts: Mapping[str, int],
    base: Thresholds,
    *,
    target_precision: float = 0.9,
    box_scores: Sequence[float] = DEFAULT_BOX_SCORES,
    mask_scores: Sequence[float] = DEFAULT_MASK_SCORES,
    matched_gold: pd.Series | None = None,
    confidence: float = 0.95,
) -> Proposal:
    """Per class, the (box_score, mask_score) with precision >= ``target_precision`` and the most recall.

    ``candidates`` are the stored candidates of the reviewed images, ``correct`` their
    :func:`match_candidates` verdicts and ``gold_counts`` the gold instances per class (e.g.
    ``gold["phrase"].value_counts()``). Each grid point runs the real label decision
    (:func:`relabel_shard`) with only that class's trial overrides, so the pick policy, NMS and cap
    act exactly as in production, other classes included. ``matched_gold`` (``gold_matches(...)
    ["gold_index"]``) makes two kept candidates on one gold instance count once (see the module
    docstring). A class no point lifts to the target keeps its current values and is reported with
    ``reached_target`` False.
    """
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    phrases = candidates.detections["phrase"].fillna("")
    classes = sorted(set(phrases) | {str(c) for c in gold_counts})
    proposed = base
    curves, table = [], []
    for phrase in classes:
        evidence = _class_evidence(candidates, phrase, int(gold_counts.get(phrase, 0)), correct, matched_gold)
        points = pd.DataFrame(
            [
                _grid_point(evidence, base.with_class_overrides(phrase, box_score=b, mask_score=m))
                for b in box_scores
                for m in mask_scores
            ],
            columns=CURVE_COLUMNS,
        )
        curves.append(points)
        chosen = _choose(points, target_precision)
        reached = chosen is not None
        if reached:
            current = base.for_class(phrase)
            if (chosen["box_score"], chosen["mask_score"]) != (current.box_score, current.mask_score):
                proposed = proposed.with_class_overrides(
                    phrase, box_score=float(chosen["box_score"]), mask_score=float(chosen["mask_score"])
                )
            row = chosen.to_dict()
        else:
            # The class keeps its current values: report how they do.
            row = _grid_point(evidence, base)
        low, high = precision_interval(int(row["correct"]), int(row["kept"]), confidence)
        best = points["precision"].max()
        table.append(
            {
                **row,
                "ci_low": low,
                "ci_high": high,
                "reached_target": reached,
                "best_precision": float(best) if pd.notna(best) else math.nan,
                "target_precision": target_precision,
            }
        )
    curve_table = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=CURVE_COLUMNS)
    return Proposal(thresholds=proposed, table=pd.DataFrame(table, columns=TABLE_COLUMNS), curves=curve_table)


# -- outputs ---------------------------------------------------------------------------------------


def plot_precision_recall(curves: pd.DataFrame, chosen: pd.DataFrame, title: str = "") -> bytes:
    """PNG bytes: one panel per class, precision against recall of every grid point, the chosen point
    marked (a star when it reached the target, a cross for the unchanged current values) and the
    target precision (``chosen``'s ``target_precision``) as a dashed line.

    ``curves`` and ``chosen`` are a :class:`Proposal`'s ``curves`` and ``table``. The figure is
    :data:`PANEL_PIXELS` per panel, :data:`MAX_PANEL_COLUMNS` panels a row. Uses a bare Agg Figure
    (no pyplot state), so it is safe in any process or thread."""
    # matplotlib is imported when a figure is drawn, not by every process that loads the code location.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    classes = list(chosen["phrase"]) if len(chosen) else list(dict.fromkeys(curves["phrase"]))
    panels = max(len(classes), 1)
    columns = min(panels, MAX_PANEL_COLUMNS)
    rows = math.ceil(panels / columns)
    width, height = PANEL_PIXELS
    figure = Figure(figsize=(columns * width / PLOT_DPI, rows * height / PLOT_DPI), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat[len(classes) :]:
        ax.set_axis_off()
    by_class = chosen.set_index("phrase") if len(chosen) else None
    for ax, phrase in zip(axes.flat, classes, strict=False):
        points = curves[curves["phrase"] == phrase]
        scatter = ax.scatter(
            points["recall"], points["precision"], c=points["box_score"], cmap="viridis", s=14, vmin=0, vmax=1
        )
        if by_class is not None:
            row = by_class.loc[phrase]
            ax.axhline(row["target_precision"], color="tab:red", linestyle="--", linewidth=1)
            marker, label = (
                ("*", "chosen") if row["reached_target"] else ("X", "current (target not reached)")
            )
            ax.scatter(
                [row["recall"]], [row["precision"]], marker=marker, s=160, color="tab:red", label=label
            )
            ax.set_title(
                f"{phrase}: box >= {row['box_score']:g}, mask >= {row['mask_score']:g}", fontsize="medium"
            )
            ax.legend(fontsize="x-small", loc="lower left")
        else:
            ax.set_title(str(phrase))
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
    if classes:
        figure.colorbar(scatter, ax=axes, label="box score threshold", shrink=0.8)
    if title:
        figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI)
    return buffer.getvalue()


def thresholds_yaml(thresholds: Thresholds, evidence: str) -> str:
    """A thresholds file's text for ``thresholds`` that :func:`parse_thresholds` reads back equal,
    headed by comments saying it is a proposal and from what ``evidence`` (free text, any lines)."""
    header = [
        "Proposed pseudo-label thresholds, chosen per class from reviewed labels.",
        "Not in use: review it, then replace thresholds.yaml (or point PSEUDOLABEL_THRESHOLDS here).",
        *(
            f"Evidence: {line}" if i == 0 else f"  {line}"
            for i, line in enumerate(evidence.strip().splitlines())
        ),
    ]
    body = yaml.safe_dump(thresholds.to_dict(), sort_keys=False, default_flow_style=None)
    return "".join(f"# {line}".rstrip() + "\n" for line in header) + body
