"""Label-quality candidates and the threshold sweep, checked against closed-form answers;
the gold set loader and the sweep plot.

Gold masks are axis-aligned rectangles and the fake models return the same rectangle shifted by
known offsets with known scores, so every IoU and CD-IoU has an exact expected value.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
from quality_helpers import (
    BASE,
    FAKE,
    GT,
    H,
    W,
    area,
    closed_form_cd_iou,
    intersect,
    known_candidates,
    rect_mask,
    shifted,
)

from pseudolabel.labels.thresholds import PickPolicy
from pseudolabel.quality.gold import iou, load_gold_set
from pseudolabel.quality.sweep import (
    best_per_policy,
    make_scorer,
    plot_sweep,
    scores_by_policy,
    threshold_sweep,
)


def expected_scores(policy: str, box_t: float, mask_t: float, factor: float, w: int) -> tuple[float, float]:
    """Mean (IoU, CD-IoU) over the gold images, from the spec: filter, pick, union, closed form."""
    ious, cds = [], []
    for cands in FAKE.values():
        alive = [c for c in cands if c[2] >= box_t and c[3] >= mask_t]
        if policy == "best_mask_score" and alive:
            alive = [max(alive, key=lambda c: c[3])]
        elif policy == "both_scores_agree" and alive:
            alive = [max(alive, key=lambda c: c[2])]  # detector-order scan keeps the top detector box
        if not alive:
            ious.append(0.0)
            cds.append(0.0)
        elif len(alive) == 1:
            pred = shifted(GT, alive[0][0], alive[0][1])
            inter = area(intersect(pred, GT))
            ious.append(inter / (area(pred) + area(GT) - inter))
            cds.append(closed_form_cd_iou(pred, GT, factor, w))
        else:  # union of several rectangles: count pixels with the band built from slices, no OpenCV
            pred = np.zeros((H, W), bool)
            for c in alive:
                pred |= rect_mask(shifted(GT, c[0], c[1]))
            gt = rect_mask(GT)
            weights = np.ones((H, W))
            ring = rect_mask((GT[0] - w, GT[1] - w, GT[2] + w, GT[3] + w)) & ~rect_mask(
                (GT[0] + w, GT[1] + w, GT[2] - w, GT[3] - w)
            )
            weights[ring] = 1 - factor
            ious.append((pred & gt).sum() / (pred | gt).sum())
            cds.append(weights[pred & gt].sum() / weights[pred | gt].sum())
    return float(np.mean(ious)), float(np.mean(cds))


def test_sweep_matches_closed_form_for_every_policy_and_threshold():
    factor, w = 0.5, 2
    candidates = known_candidates()
    gold = {i: rect_mask(GT) for i in FAKE}
    scorer = make_scorer(candidates, gold, factor, w)
    box_grid, mask_grid = [0.25, 0.5, 0.85], [0.65, 0.85]
    sweep = threshold_sweep(candidates, scorer, BASE, box_scores=box_grid, mask_scores=mask_grid)
    assert len(sweep) == 3 * len(box_grid) * len(mask_grid)
    for row in sweep.itertuples():
        want_iou, want_cd = expected_scores(row.policy, row.box_score, row.mask_score, factor, w)
        assert row.mean_iou == pytest.approx(want_iou, abs=1e-12), row
        assert row.mean_cd_iou == pytest.approx(want_cd, abs=1e-12), row
        assert row.images == 3
    # Spot-check one row by hand: box >= 0.5, mask >= 0.65, best_mask_score picks img0's (0, 3)
    # shift (IoU 1080/1320) and img1's (-6, 2) shift (IoU 952/1448); "none" scores 0.
    row = sweep.query("policy == 'best_mask_score' and box_score == 0.5 and mask_score == 0.65").iloc[0]
    assert row.mean_iou == pytest.approx((1080 / 1320 + 952 / 1448 + 0) / 3, abs=1e-12)
    assert row.empty_rate == pytest.approx(1 / 3)

    best = best_per_policy(sweep)
    assert best["policy"].tolist() == sorted(p.value for p in PickPolicy)
    current = scores_by_policy(
        candidates, scorer, BASE.with_overrides(box_score=0.5, mask_score=0.65), ["all"]
    )
    assert current.iloc[0]["mean_iou"] == pytest.approx(
        expected_scores("all", 0.5, 0.65, factor, w)[0], abs=1e-12
    )


def test_gold_set_loads_images_and_thresholds_masks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for stem in ("a", "b", "lonely"):
        cv2.imwrite(str(tmp_path / "images" / f"{stem}.jpg"), np.full((H, W, 3), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), rect_mask(GT).astype(np.uint8) * 255)
    cv2.imwrite(str(tmp_path / "masks" / "b.jpg"), rect_mask(GT).astype(np.uint8) * 255)  # JPEG ringing
    gold = load_gold_set(tmp_path)
    assert [i.image_id for i in gold.images] == ["a", "b"] and gold.unmatched == ["lonely"]
    assert gold.images[0].pixels.shape == (H, W, 3)
    np.testing.assert_array_equal(gold.masks["a"], rect_mask(GT))
    assert iou(gold.masks["b"], rect_mask(GT)) > 0.99


def test_gold_masks_must_match_their_image(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.jpg"), np.zeros((H, W, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), np.zeros((H, W + 1), np.uint8))
    with pytest.raises(ValueError, match="a: mask is"):
        load_gold_set(tmp_path)


def test_plot_is_a_png():
    sweep = pd.DataFrame(
        {
            "policy": ["all", "all", "best_mask_score", "best_mask_score"],
            "box_score": 0.3,
            "mask_score": [0.5, 0.7, 0.5, 0.7],
            "mean_iou": [0.5, 0.6, 0.7, 0.8],
            "mean_cd_iou": [0.55, 0.65, 0.75, 0.85],
        }
    )
    png = plot_sweep(sweep, title="t")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[1] > image.shape[0] > 300
