"""Label-quality metrics and the threshold sweep, checked against closed-form answers.

Gold masks are axis-aligned rectangles and the fake models return the same rectangle shifted by
known offsets with known scores, so every IoU and CD-IoU has an exact expected value.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest

from pseudolabel.labels.relabel import relabel_shard
from pseudolabel.labels.synthetic import encode_mask
from pseudolabel.labels.thresholds import PickPolicy, Thresholds
from pseudolabel.quality.adapters import StageModelCandidates
from pseudolabel.quality.candidates import EvalImage, run_candidates
from pseudolabel.quality.gold import load_gold_set
from pseudolabel.quality.metrics import contour_band, contour_discounted_iou, iou
from pseudolabel.quality.plot import plot_sweep
from pseudolabel.quality.sweep import best_per_policy, make_scorer, scores_by_policy, threshold_sweep

H, W = 60, 80
GT = (20, 15, 60, 45)  # x0, y0, x1, y1: a 40 x 30 rectangle well inside the image


def rect_mask(box, height=H, width=W):
    mask = np.zeros((height, width), bool)
    x0, y0, x1, y1 = box
    mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return mask


def shifted(box, dx, dy):
    return (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)


def area(box) -> float:
    return max(box[2] - box[0], 0) * max(box[3] - box[1], 0)


def intersect(a, b):
    return (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))


def closed_form_cd_iou(pred, gt, factor: float, w: int) -> float:
    """CD-IoU of two rectangles from the definition: the band is the ring between gt grown by w
    and gt shrunk by w, weighted (1 - factor); all terms are rectangle areas."""
    outer = (gt[0] - w, gt[1] - w, gt[2] + w, gt[3] + w)
    inner = (gt[0] + w, gt[1] + w, gt[2] - w, gt[3] - w)

    def weighted(r):
        return area(r) - factor * (area(intersect(r, outer)) - area(intersect(r, inner)))

    inter = weighted(intersect(pred, gt))
    return inter / (weighted(pred) + weighted(gt) - inter)


# --- metrics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dx, dy", [(0, 0), (4, 0), (0, 3), (-6, 2), (10, 10), (45, 0)])
def test_iou_of_shifted_rectangles(dx, dy):
    w, h = GT[2] - GT[0], GT[3] - GT[1]
    inter = max(w - abs(dx), 0) * max(h - abs(dy), 0)
    assert iou(rect_mask(shifted(GT, dx, dy)), rect_mask(GT)) == pytest.approx(
        inter / (2 * w * h - inter), abs=1e-12
    )


def test_iou_edge_cases():
    empty = np.zeros((H, W), bool)
    assert iou(empty, empty) == 1.0
    assert iou(empty, rect_mask(GT)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        iou(empty, empty[:-1])


def test_contour_band_of_a_rectangle_is_the_ring_of_half_width_w():
    band = contour_band(rect_mask(GT), 2)
    expected = rect_mask((18, 13, 62, 47)) & ~rect_mask((22, 17, 58, 43))
    np.testing.assert_array_equal(band, expected)
    assert not contour_band(rect_mask(GT), 0).any()


def test_the_image_border_is_not_a_contour():
    touching = rect_mask((0, 0, 30, 60))  # left, top and bottom edges lie on the image border
    band = contour_band(touching, 3)
    np.testing.assert_array_equal(band, rect_mask((27, 0, 33, 60)))


@pytest.mark.parametrize("dx, dy", [(4, 0), (0, 3), (-6, 2), (10, 10), (1, 1)])
@pytest.mark.parametrize("factor, w", [(0.5, 2), (1.0, 3), (0.25, 1), (0.9, 5)])
def test_contour_discounted_iou_matches_the_closed_form(dx, dy, factor, w):
    pred = shifted(GT, dx, dy)
    got = contour_discounted_iou(rect_mask(pred), rect_mask(GT), factor, w)
    assert got == pytest.approx(closed_form_cd_iou(pred, GT, factor, w), abs=1e-12)


def test_contour_discount_zero_is_plain_iou_and_forgives_boundary_errors():
    pred, gt = rect_mask(shifted(GT, 2, 0)), rect_mask(GT)
    assert contour_discounted_iou(pred, gt, 0.0, 3) == iou(pred, gt)
    assert contour_discounted_iou(pred, gt, 0.5, 0) == iou(pred, gt)
    # A 2-px shift lies entirely inside a 3-px band: fully discounted, it is a perfect match.
    assert contour_discounted_iou(pred, gt, 1.0, 3) == 1.0
    assert iou(pred, gt) < contour_discounted_iou(pred, gt, 0.5, 3) < 1.0
    with pytest.raises(ValueError, match="factor"):
        contour_discounted_iou(pred, gt, 1.5, 3)


# --- fake models with known geometry -----------------------------------------------------------------

# image id -> candidates (dx, dy, box score, SAM2 score); "none" gets no candidate at all.
FAKE = {
    "img0": [(4, 0, 0.90, 0.60), (0, 3, 0.50, 0.95), (10, 10, 0.30, 0.80)],
    "img1": [(0, 0, 0.45, 0.70), (-6, 2, 0.80, 0.90)],
    "none": [],
}


class FakeDetector:
    def __init__(self):
        self.calls: list[list[str]] = []

    def detect(self, images: Sequence[EvalImage]) -> list[pd.DataFrame]:
        self.calls.append([i.image_id for i in images])
        frames = []
        for image in images:
            rows = []
            for dx, dy, box_score, mask_score in FAKE[image.image_id]:
                x0, y0, x1, y1 = shifted(GT, dx, dy)
                rows.append(
                    {
                        "x0": x0,
                        "y0": y0,
                        "x1": x1,
                        "y1": y1,
                        "box_score": box_score,
                        "text_score": 0.9,
                        "phrase": f"thing{len(rows)}",
                        "fake_mask_score": mask_score,
                    }
                )
            frames.append(
                pd.DataFrame(
                    rows,
                    columns=["x0", "y0", "x1", "y1", "box_score", "text_score", "phrase", "fake_mask_score"],
                )
            )
        return frames


class FakeSegmenter:
    """The mask of a box is exactly the box, with the score the fake detector planted."""

    def segment(self, image: EvalImage, boxes: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for box in boxes.itertuples():
            mask = rect_mask((int(box.x0), int(box.y0), int(box.x1), int(box.y1)), image.height, image.width)
            rows.append(
                {
                    "candidate_id": box.candidate_id,
                    "rle_counts": encode_mask(mask)["counts"],
                    "height": image.height,
                    "width": image.width,
                    "mask_area": int(mask.sum()),
                    "mask_score": box.fake_mask_score,
                }
            )
        return pd.DataFrame(rows)


def eval_images() -> list[EvalImage]:
    return [EvalImage(image_id=i, data=b"", pixels=np.zeros((H, W, 3), np.uint8)) for i in FAKE]


BASE = Thresholds(
    version=1,
    box_score=0.0,
    text_score=0.0,
    mask_score=0.0,
    min_mask_area_fraction=0.0,
    max_box_coverage=0.8,
    nms_iou=1.0,
    max_instances_per_image=10,
    pick_policy=PickPolicy.ALL,
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


def test_run_candidates_produces_pipeline_tables_in_batches():
    detector = FakeDetector()
    candidates = run_candidates(eval_images(), detector, FakeSegmenter(), batch_size=2)
    assert detector.calls == [["img0", "img1"], ["none"]]
    assert candidates.images["num_candidates"].tolist() == [3, 2, 0]
    assert candidates.detections.groupby("image_id")["candidate_id"].agg(list).to_dict() == {
        "img0": [0, 1, 2],
        "img1": [0, 1],
    }
    assert len(candidates.masks) == 5 and set(candidates.masks["image_id"]) == {"img0", "img1"}


def test_run_candidates_rejects_malformed_model_output():
    class Broken(FakeDetector):
        def detect(self, images):
            return [pd.DataFrame({"x0": [1.0]})] * len(images)

    with pytest.raises(ValueError, match="detector output is missing"):
        run_candidates(eval_images(), Broken(), FakeSegmenter())


def test_sweep_matches_closed_form_for_every_policy_and_threshold():
    factor, w = 0.5, 2
    candidates = run_candidates(eval_images(), FakeDetector(), FakeSegmenter())
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


# --- adapter over the GPU-stage model interfaces ------------------------------------------------------


class StagePrepared:
    def __init__(self, image_id, width, height):
        self.image_id, self.width, self.height = image_id, width, height


class StageDetector:
    """Mimics the stage detector: prepare(image_id, bytes) and detect(batch, captions, floors...)."""

    def __init__(self):
        self.seen = {}

    def prepare(self, image_id, data):
        return StagePrepared(image_id, W, H)

    def detect(self, batch, captions, *, box_floor, text_floor, max_candidates):
        self.seen = {"captions": captions, "box_floor": box_floor, "max_candidates": max_candidates}
        out = []
        for prepared in batch:
            cands = FAKE[prepared.image_id]
            out.append(
                SimpleNamespace(
                    boxes=np.array([shifted(GT, dx, dy) for dx, dy, _, _ in cands], np.float32).reshape(
                        -1, 4
                    ),
                    box_scores=np.array([c[2] for c in cands], np.float32),
                    text_scores=np.full(len(cands), 0.9, np.float32),
                    phrases=[f"thing{i}" for i in range(len(cands))],
                )
            )
        return out


class StageSegmenter:
    def prepare(self, image_id, data):
        return StagePrepared(image_id, W, H)

    def segment(self, batch, boxes, *, multimask):
        (prepared,), (xyxy,) = batch, boxes
        masks = [rect_mask(tuple(int(v) for v in box)) for box in xyxy]
        scores = [c[3] for c in FAKE[prepared.image_id]]
        encoded = SimpleNamespace(
            counts=[encode_mask(m)["counts"] for m in masks],
            height=H,
            width=W,
            areas=np.array([m.sum() for m in masks]),
        )
        return [SimpleNamespace(masks=encoded, scores=np.array(scores, np.float32))]


def test_stage_model_adapter_feeds_the_same_sweep():
    created = []
    adapter = StageModelCandidates(
        detector=lambda: created.append("detector") or StageDetector(),
        segmenter=lambda: created.append("segmenter") or StageSegmenter(),
        captions=["thing ."],
        box_floor=0.01,
    )
    assert created == []  # nothing is built until the evaluation runs
    via_adapter = run_candidates(eval_images(), adapter, adapter)
    direct = run_candidates(eval_images(), FakeDetector(), FakeSegmenter())
    assert created == ["detector", "segmenter"]
    assert adapter.detector.seen == {"captions": ["thing ."], "box_floor": 0.01, "max_candidates": 300}
    gold = {i: rect_mask(GT) for i in FAKE}
    sweeps = [
        threshold_sweep(c, make_scorer(c, gold, 0.5, 2), BASE, box_scores=[0.4], mask_scores=[0.65])
        for c in (via_adapter, direct)
    ]
    pd.testing.assert_frame_equal(sweeps[0], sweeps[1])


class QueryOrderStageDetector(StageDetector):
    """The stage detector reporting its output order, as Grounding DINO's ``query_indices``."""

    QUERIES = {"img0": [30, 12, 4], "img1": [7, 8], "none": []}  # img0 scans FAKE rows 2, 1, 0

    def detect(self, batch, captions, **floors):
        results = super().detect(batch, captions, **floors)
        return [
            SimpleNamespace(**vars(r), query_indices=np.array(self.QUERIES[p.image_id], np.int32))
            for r, p in zip(results, batch, strict=True)
        ]


def test_stage_model_adapter_passes_the_query_order_to_both_scores_agree():
    adapter = StageModelCandidates(QueryOrderStageDetector, StageSegmenter, captions=["thing ."])
    candidates = run_candidates(eval_images(), adapter, adapter)
    assert candidates.detections["query_index"].tolist() == [30, 12, 4, 7, 8]
    thresholds = BASE.with_overrides(pick_policy=PickPolicy.BOTH_SCORES_AGREE)
    kept = relabel_shard(candidates.detections, candidates.masks, thresholds, candidates.images).kept
    # img0 in query order: (.30, .80) seeds, (.50, .95) beats it on both, (.90, .60) does not -> row 1
    # (the score-order scan would keep row 0); img1: (.45, .70) then (.80, .90) -> row 1.
    assert kept[["image_id", "candidate_id"]].values.tolist() == [["img0", 1], ["img1", 1]]
    direct = run_candidates(eval_images(), FakeDetector(), FakeSegmenter())  # no query order reported
    kept = relabel_shard(direct.detections, direct.masks, thresholds, direct.images).kept
    assert kept[["image_id", "candidate_id"]].values.tolist() == [["img0", 0], ["img1", 1]]
