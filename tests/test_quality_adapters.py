"""Label quality through the GPU-stage model interfaces: the adapter feeds the same sweep."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
from quality_helpers import (
    BASE,
    FAKE,
    GT,
    FakeDetector,
    FakeSegmenter,
    H,
    W,
    eval_images,
    rect_mask,
    shifted,
)

from pseudolabel.labels.relabel import relabel_shard
from pseudolabel.labels.synthetic import encode_mask
from pseudolabel.labels.thresholds import PickPolicy
from pseudolabel.quality.adapters import StageModelCandidates
from pseudolabel.quality.candidates import run_candidates
from pseudolabel.quality.sweep import make_scorer, threshold_sweep

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
