"""Precision against reviewed instances and per-class thresholds chosen from it.

Masks are rectangles, so every IoU is known; the candidates are built so that the right per-class
thresholds follow by construction (counted out next to each case).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pseudolabel.labels.relabel import ShardCandidates, relabel_shard
from pseudolabel.labels.thresholds import PickPolicy, Thresholds, parse_thresholds
from pseudolabel.quality.precision import (
    MAX_PANEL_COLUMNS,
    NO_MATCH,
    PANEL_PIXELS,
    candidate_table,
    class_precision,
    gold_matches,
    match_candidates,
    plot_precision_recall,
    precision_interval,
    propose_thresholds,
    thresholds_yaml,
)
from pseudolabel.testing.labels import encode_mask

H, W = 60, 80
CAT, DOG, BIRD = (5, 5, 25, 25), (30, 5, 50, 25), (55, 5, 75, 25)  # gold rectangles, x0 y0 x1 y1
OFF_CAT, OFF_BIRD = (5, 35, 25, 55), (55, 35, 75, 55)  # candidates that overlap no gold instance

BASE = Thresholds(
    version=1,
    box_score=0.3,
    text_score=0.0,
    mask_score=0.5,
    min_mask_area_fraction=0.0,
    max_box_coverage=0.8,
    nms_iou=0.5,
    max_instances_per_image=100,
    pick_policy=PickPolicy.ALL,
)
BOX_GRID = (0.3, 0.4, 0.5, 0.7, 0.8)
MASK_GRID = (0.5, 0.8, 0.95)


def rect_mask(box, height=H, width=W) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = 1
    return mask


def rle(box) -> str:
    return encode_mask(rect_mask(box))["counts"]


def build(rows) -> ShardCandidates:
    """rows: (image_id, phrase, detector box, mask box, box score, mask score); ids by order per image."""
    detections, masks, seen = [], [], {}
    for image_id, phrase, box, mask_box, box_score, mask_score in rows:
        cid = seen[image_id] = seen.get(image_id, -1) + 1
        detections.append(
            dict(
                image_id=image_id,
                candidate_id=cid,
                x0=box[0],
                y0=box[1],
                x1=box[2],
                y1=box[3],
                box_score=box_score,
                text_score=0.9,
                phrase=phrase,
            )
        )
        masks.append(
            dict(
                image_id=image_id,
                candidate_id=cid,
                rle_counts=rle(mask_box),
                height=H,
                width=W,
                mask_area=int(rect_mask(mask_box).sum()),
                mask_x=0.0,
                mask_y=0.0,
                mask_w=1.0,
                mask_h=1.0,
                mask_score=mask_score,
            )
        )
    images = pd.DataFrame({"image_id": sorted(seen), "width": W, "height": H})
    return ShardCandidates(pd.DataFrame(detections), images, pd.DataFrame(masks))


def gold_table(rows) -> pd.DataFrame:
    """rows: (image_id, phrase, box)."""
    return pd.DataFrame(
        [dict(image_id=i, phrase=p, rle_counts=rle(b), height=H, width=W) for i, p, b in rows]
    )


def scenario():
    """Ten reviewed images with one gold cat and one gold dog each, and three gold birds.

    cat: 8 good candidates at box 0.75 and 2 at 0.45; bad ones at 0.6 (one) and 0.35 (five). On the box
    grid: 0.3 -> 10/16 = 0.625; 0.4 -> 10/11 = 0.909, recall 1; 0.5 -> 8/9 = 0.889; 0.7 -> 8/8, recall 0.8;
    0.8 -> nothing. At target 0.9 the answer is box 0.4 (full recall), mask 0.8 (all cat masks score 0.9:
    0.5 and 0.8 tie, the stricter wins; 0.95 keeps nothing).
    dog: all good at box 0.5, mask 0.9 -> strictest full-recall point: box 0.5, mask 0.8.
    bird: two good and two bad candidates with equal scores: precision 0.5 everywhere, target out of reach.
    """
    rows, gold = [], []
    for i in range(10):
        image = f"img{i}"
        rows.append((image, "cat", CAT, CAT, 0.75 if i < 8 else 0.45, 0.9))
        rows.append((image, "dog", DOG, DOG, 0.5, 0.9))
        if i < 5:
            rows.append((image, "cat", OFF_CAT, OFF_CAT, 0.35, 0.9))
        if i == 5:
            rows.append((image, "cat", OFF_CAT, OFF_CAT, 0.6, 0.9))
        gold += [(image, "cat", CAT), (image, "dog", DOG)]
    for i in range(2):
        rows.append((f"img{i}", "bird", BIRD, BIRD, 0.6, 0.9))
        rows.append((f"img{i}", "bird", OFF_BIRD, OFF_BIRD, 0.6, 0.9))
    gold += [("img0", "bird", BIRD), ("img1", "bird", BIRD), ("img2", "bird", BIRD)]
    return build(rows), gold_table(gold)


# --- matching ----------------------------------------------------------------------------------------


def test_match_candidates_uses_mask_iou_within_image_and_class():
    shifted = (10, 5, 30, 25)  # 15 of 25 columns shared with CAT: IoU 15 / 25 = 0.6
    far = (13, 5, 33, 25)  # 12 / 28 = 0.43
    candidates = build(
        [
            ("a", "cat", CAT, shifted, 0.9, 0.9),
            ("a", "cat", CAT, far, 0.8, 0.9),
            ("a", "dog", CAT, CAT, 0.9, 0.9),  # right mask, wrong class
            ("b", "cat", CAT, CAT, 0.9, 0.9),  # right mask, but image b has no gold cat
        ]
    )
    gold = gold_table([("a", "cat", CAT), ("a", "dog", DOG), ("b", "dog", CAT)])
    table = candidate_table(candidates)
    matches = gold_matches(table, gold)
    np.testing.assert_allclose(matches["iou"], [0.6, 12 / 28, 0.0, 0.0])
    assert matches["gold_index"].tolist() == [0, NO_MATCH, NO_MATCH, NO_MATCH]
    correct = match_candidates(table, gold)
    assert correct.tolist() == [True, False, False, False]
    assert correct.index.tolist() == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    assert match_candidates(table, gold, iou_threshold=0.65).tolist() == [False] * 4


def greedy_true_positives(kept: pd.DataFrame, gold: pd.DataFrame, iou_threshold: float) -> int:
    """COCO's rule, on decoded pixels: per image and class, kept candidates by descending score each take
    the best still-unmatched gold instance with IoU >= the threshold."""
    hits = 0
    for (image_id, phrase), group in kept.sort_values("box_score", ascending=False).groupby(
        ["image_id", "phrase"], sort=False
    ):
        gts = [
            rect_mask(b).astype(bool)
            for b in gold.loc[(gold["image_id"] == image_id) & (gold["phrase"] == phrase), "box"]
        ]
        taken = set()
        for box in group["mask_box"]:
            pred = rect_mask(box).astype(bool)
            ious = [(pred & g).sum() / (pred | g).sum() for g in gts]
            free = [(v, j) for j, v in enumerate(ious) if j not in taken and v >= iou_threshold]
            if free:
                taken.add(max(free)[1])
                hits += 1
    return hits


def test_independent_matching_counts_like_coco_greedy_for_disjoint_gold():
    # The documented approximation: with non-overlapping gold instances and IoU >= 0.5, counting the
    # distinct gold instances hit by any kept subset equals COCO's greedy one-to-one true positives.
    rng = np.random.default_rng(0)
    rows, gold_rows = [], []
    for i in range(30):
        image = f"img{i}"
        golds = [(2 + 26 * k, 4, 22 + 26 * k, 24 + 8 * k) for k in range(3)]  # three disjoint boxes
        for g in golds:
            gold_rows.append((image, "cat", g))
        for _ in range(int(rng.integers(2, 8))):
            g = golds[int(rng.integers(0, 3))]
            dx, dy = (int(v) for v in rng.integers(-7, 8, size=2))
            box = (g[0] + dx, max(g[1] + dy, 0), g[2] + dx, g[3] + dy)
            rows.append((image, "cat", box, box, float(rng.uniform(0.1, 1)), 0.9))
    candidates = build(rows)
    gold = gold_table(gold_rows).assign(box=[b for _, _, b in gold_rows])
    matches = gold_matches(candidate_table(candidates), gold)
    assert 0 < matches["correct"].sum() < len(matches)  # some hit, some miss
    mask_boxes = pd.Series([r[3] for r in rows], index=matches.index)
    for trial in range(20):
        kept = candidates.detections.sample(frac=0.6, random_state=trial)
        keys = pd.MultiIndex.from_frame(kept[["image_id", "candidate_id"]])
        chosen = matches.loc[keys]
        distinct = chosen.loc[chosen["correct"], "gold_index"].nunique()
        coco = greedy_true_positives(kept.assign(mask_box=mask_boxes.loc[keys].to_numpy()), gold, 0.5)
        assert distinct == coco


def test_duplicates_on_one_gold_instance_count_once_with_matched_gold():
    # Two candidates whose masks both equal the gold cat, with boxes far enough apart to survive NMS.
    candidates = build([("a", "cat", CAT, CAT, 0.9, 0.9), ("a", "cat", OFF_CAT, CAT, 0.8, 0.9)])
    gold = gold_table([("a", "cat", CAT)])
    matches = gold_matches(candidate_table(candidates), gold)
    assert matches["correct"].all()  # each is right on its own
    args = (candidates, matches["correct"], {"cat": 1}, BASE)
    grid = dict(box_scores=[0.3], mask_scores=[0.5], target_precision=0.6)
    deduped = propose_thresholds(*args, matched_gold=matches["gold_index"], **grid).curves.iloc[0]
    assert (deduped["kept"], deduped["correct"], deduped["precision"], deduped["recall"]) == (2, 1, 0.5, 1.0)
    plain = propose_thresholds(*args, **grid).curves.iloc[0]
    assert (plain["correct"], plain["precision"], plain["recall"]) == (2, 1.0, 2.0)


# --- precision -----------------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)


def test_wilson_interval_matches_the_formula_and_known_values():
    low, high = precision_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)  # the textbook 8/10 at 95 %
    assert (low, high) == pytest.approx(wilson(8, 10, 1.959963984540054))
    assert precision_interval(8, 10, 0.90) == pytest.approx(wilson(8, 10, 1.6448536269514722))
    # All correct: the upper end is 1 and the lower end n / (n + z^2).
    low, high = precision_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(10 / (10 + 1.959963984540054**2))
    assert precision_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        precision_interval(3, 2)


def test_class_precision_of_kept_labels():
    candidates, gold = scenario()
    correct = match_candidates(candidate_table(candidates), gold)
    kept = relabel_shard(candidates.detections, candidates.masks, BASE.with_overrides(box_score=0.4)).kept
    table = class_precision(kept, correct).set_index("phrase")
    assert table.loc["cat", ["kept", "correct"]].tolist() == [11, 10]
    assert table.loc["dog", ["kept", "correct"]].tolist() == [10, 10]
    assert table.loc["bird", ["kept", "correct"]].tolist() == [4, 2]
    assert table.loc["cat", "precision"] == pytest.approx(10 / 11)
    assert (table.loc["cat", "ci_low"], table.loc["cat", "ci_high"]) == pytest.approx(
        wilson(10, 11, 1.959963984540054)
    )
    with pytest.raises(ValueError, match="1 candidates have no match verdict"):
        class_precision(kept, correct.drop(("img0", 0)))


# --- the proposal --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proposal():
    candidates, gold = scenario()
    matches = gold_matches(candidate_table(candidates), gold)
    counts = {**gold["phrase"].value_counts().to_dict(), "fish": 2}  # fish: reviewed, never detected
    return propose_thresholds(
        candidates,
        matches["correct"],
        counts,
        BASE,
        target_precision=0.9,
        box_scores=BOX_GRID,
        mask_scores=MASK_GRID,
        matched_gold=matches["gold_index"],
    )


def test_proposal_chooses_the_most_recall_above_the_target_per_class(proposal):
    table = proposal.table.set_index("phrase")
    assert table.loc["cat", ["box_score", "mask_score"]].tolist() == [0.4, 0.8]
    assert table.loc["cat", ["kept", "correct", "gold"]].tolist() == [11, 10, 10]
    assert table.loc["cat", "precision"] == pytest.approx(10 / 11)
    assert table.loc["cat", "recall"] == 1.0
    assert (table.loc["cat", "ci_low"], table.loc["cat", "ci_high"]) == pytest.approx(
        wilson(10, 11, 1.959963984540054)
    )
    assert table.loc["dog", ["box_score", "mask_score", "precision", "recall"]].tolist() == [
        0.5,
        0.8,
        1.0,
        1.0,
    ]
    assert table.loc[["cat", "dog"], "reached_target"].tolist() == [True, True]
    assert proposal.thresholds == BASE.with_class_overrides(
        "cat", box_score=0.4, mask_score=0.8
    ).with_class_overrides("dog", box_score=0.5, mask_score=0.8)


def test_a_class_that_cannot_reach_the_target_keeps_its_values(proposal):
    table = proposal.table.set_index("phrase")
    bird = table.loc["bird"]
    assert not bird["reached_target"]
    assert (bird["box_score"], bird["mask_score"]) == (BASE.box_score, BASE.mask_score)
    assert (bird["kept"], bird["correct"], bird["gold"]) == (4, 2, 3)
    assert bird["precision"] == 0.5 and bird["recall"] == pytest.approx(2 / 3)
    assert bird["best_precision"] == 0.5
    assert "bird" not in proposal.thresholds.class_overrides
    fish = table.loc["fish"]
    assert not fish["reached_target"] and fish["kept"] == 0 and math.isnan(fish["precision"])


def test_curves_hold_every_grid_point(proposal):
    curves = proposal.curves
    assert len(curves) == 4 * len(BOX_GRID) * len(MASK_GRID)
    cat = curves[(curves["phrase"] == "cat") & (curves["mask_score"] == 0.5)].set_index("box_score")
    assert cat["kept"].tolist() == [16, 11, 9, 8, 0]
    np.testing.assert_allclose(cat["precision"], [10 / 16, 10 / 11, 8 / 9, 1.0, np.nan])
    np.testing.assert_allclose(cat["recall"], [1.0, 1.0, 0.8, 0.8, 0.0])


def test_proposed_thresholds_relabel_to_the_reported_precision(proposal):
    candidates, gold = scenario()
    correct = match_candidates(candidate_table(candidates), gold)
    kept = relabel_shard(candidates.detections, candidates.masks, proposal.thresholds).kept
    measured = class_precision(kept, correct).set_index("phrase")["precision"]
    reported = proposal.table.set_index("phrase")["precision"]
    for phrase in ("cat", "dog", "bird"):
        assert measured[phrase] == pytest.approx(reported[phrase])


def test_the_pick_policy_acts_across_classes():
    # best_mask_score keeps one instance per image: the dog's higher mask score always wins, so no
    # cat threshold can keep a cat, and cat cannot reach any target.
    candidates = build(
        [(f"img{i}", "cat", CAT, CAT, 0.8, 0.9) for i in range(3)]
        + [(f"img{i}", "dog", DOG, DOG, 0.8, 0.95) for i in range(3)]
    )
    gold = gold_table([(f"img{i}", p, b) for i in range(3) for p, b in (("cat", CAT), ("dog", DOG))])
    correct = match_candidates(candidate_table(candidates), gold)
    result = propose_thresholds(
        candidates,
        correct,
        {"cat": 3, "dog": 3},
        BASE.with_overrides(pick_policy=PickPolicy.BEST_MASK_SCORE),
        box_scores=(0.3, 0.5),
        mask_scores=(0.5,),
    )
    table = result.table.set_index("phrase")
    assert table.loc["cat", "kept"] == 0 and not table.loc["cat", "reached_target"]
    assert table.loc["dog", "recall"] == 1.0 and table.loc["dog", "reached_target"]


# --- outputs -------------------------------------------------------------------------------------------


def test_thresholds_yaml_round_trips_with_a_proposal_header(proposal):
    text = thresholds_yaml(proposal.thresholds, "10 reviewed images of shard s001\nIoU >= 0.5, target 0.9")
    assert parse_thresholds(text) == proposal.thresholds
    lines = text.splitlines()
    assert lines[0].startswith("# Proposed")
    assert "# Evidence: 10 reviewed images of shard s001" in lines
    assert "#   IoU >= 0.5, target 0.9" in lines
    assert "classes:" in lines and "  cat: {box_score: 0.4, mask_score: 0.8}" in lines
    plain = thresholds_yaml(BASE, "none")
    assert parse_thresholds(plain) == BASE and "classes" not in plain


def test_precision_recall_plot_is_a_png_with_a_panel_per_class(proposal):
    png = plot_precision_recall(proposal.curves, proposal.table, title="proposal")
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        assert image.format == "PNG"
        # Four classes: a full row of MAX_PANEL_COLUMNS panels and a second row.
        assert MAX_PANEL_COLUMNS == 3
        assert image.size == (3 * PANEL_PIXELS[0], 2 * PANEL_PIXELS[1])
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # something was drawn
    one = proposal.table[proposal.table["phrase"] == "cat"]
    with Image.open(io.BytesIO(plot_precision_recall(proposal.curves, one))) as image:
        assert image.size == PANEL_PIXELS
