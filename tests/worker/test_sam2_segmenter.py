"""Sam2Segmenter on the real SAM2.1 architecture (tiny config, random weights, 128 px inputs)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from images import random_jpeg
from PIL import Image

from pseudolabel import schemas
from pseudolabel.models import tiny
from pseudolabel.models.interfaces import Candidates
from pseudolabel.models.loading import ModelConfigError, SegmenterSpec, load_segmenter
from pseudolabel.models.sam2_segmenter import Sam2Segmenter, build_sam2_model
from pseudolabel.models.stages import SegmentationSettings, run_segmentation
from pseudolabel.rle import decode_rle
from pseudolabel.testing.models import FakeSegmenter, box_prompts

SIZE = 128


@pytest.fixture(scope="module")
def model():
    return build_sam2_model("tiny", None, overrides=tiny.tiny_sam2_overrides(SIZE))


@pytest.fixture(scope="module")
def segmenter(model):
    return Sam2Segmenter(model, device=torch.device("cpu"), batch_size=4)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _mask(result, j) -> np.ndarray:
    return decode_rle(result.masks.counts[j], result.masks.height, result.masks.width)


def _prompts(items, boxes) -> list[Candidates]:
    """Box-only candidates for each prepared image."""
    return [
        box_prompts(item.image_id, item.width, item.height, b) for item, b in zip(items, boxes, strict=True)
    ]


@pytest.mark.model
@pytest.mark.parametrize("multimask", [False, True])
def test_matches_the_stock_predictor(model, segmenter, multimask):
    """Same masks and scores as SAM2ImagePredictor.set_image + predict (the seeds' per-image loop)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    data = [random_jpeg(200, 150, seed=1), random_jpeg(90, 160, seed=2)]
    boxes = [
        np.array([[10, 10, 120, 100], [50, 20, 190, 140]], np.float32),
        np.array([[5, 30, 80, 150]], np.float32),
    ]
    items = [segmenter.prepare(f"i{k}", d) for k, d in enumerate(data)]
    ours = segmenter.segment(items, _prompts(items, boxes), multimask=multimask)

    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [
        (SIZE // 4,) * 2,
        (SIZE // 8,) * 2,
        (SIZE // 16,) * 2,
    ]  # stock assumes 1024 px
    for d, b, result in zip(data, boxes, ours, strict=True):
        predictor.set_image(np.array(Image.open(io.BytesIO(d)).convert("RGB")))
        masks, scores, _ = predictor.predict(box=b, multimask_output=multimask)
        masks, scores = masks.reshape(len(b), -1, *masks.shape[-2:]), scores.reshape(len(b), -1)
        assert result.multimask_scores.shape == scores.shape == (len(b), 3 if multimask else 1)
        np.testing.assert_allclose(
            result.multimask_scores, scores, atol=2e-3
        )  # inputs differ only by uint8 resize rounding
        for j in range(len(b)):
            chosen = int(scores[j].argmax())
            assert result.multimask_index[j] == chosen and result.mask_scores[j] == pytest.approx(
                scores[j, chosen], abs=2e-3
            )
            reference = masks[j, chosen] > 0
            assert _mask(result, j).shape == reference.shape == (result.masks.height, result.masks.width)
            assert _iou(_mask(result, j), reference) > 0.98


@pytest.mark.model
def test_boxes_are_read_in_original_pixels(segmenter):
    """One scene at 1x and at 2x (exact pixel doubling: both become the SAME 128 px model input), in one
    batch. 2x boxes on the 2x image must be the same prompt as 1x boxes on the 1x image."""
    small = Image.open(io.BytesIO(random_jpeg(256, 192, seed=3)))
    large = small.resize((512, 384), Image.Resampling.NEAREST)
    png = []
    for image in (small, large):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        png.append(buffer.getvalue())
    items = [segmenter.prepare("small", png[0]), segmenter.prepare("large", png[1])]
    assert torch.equal(items[0].pixels, items[1].pixels)
    box = np.array([[40, 20, 140, 100]], np.float32)
    batch = [*items, items[1]]
    one, two, unscaled = segmenter.segment(batch, _prompts(batch, [box, box * 2, box]))
    assert (one.masks.height, one.masks.width, two.masks.height, two.masks.width) == (192, 256, 384, 512)
    np.testing.assert_allclose(
        two.multimask_scores, one.multimask_scores, atol=1e-6
    )  # identical prompt -> identical outputs
    assert not np.allclose(unscaled.multimask_scores, one.multimask_scores, atol=1e-6)
    doubled = _mask(one, 0).repeat(2, axis=0).repeat(2, axis=1)
    assert _iou(doubled, _mask(two, 0)) > 0.9 > _iou(doubled, _mask(unscaled, 0))


@pytest.mark.model
def test_empty_boxes_and_chunking_do_not_change_results(model, segmenter):
    items = [segmenter.prepare(f"i{k}", random_jpeg(160, 120, seed=k)) for k in range(2)]
    boxes = [np.array([[0, 0, 80, 60], [40, 30, 160, 120], [10, 50, 150, 110]], np.float32), np.zeros((0, 4))]
    reference = segmenter.segment(items, _prompts(items, boxes), multimask=True)
    assert len(reference[1].masks) == 0 and reference[1].multimask_scores.shape == (0, 3)
    assert (reference[1].masks.height, reference[1].masks.width) == (120, 160)

    chunked = Sam2Segmenter(model, device=torch.device("cpu"), max_boxes_per_call=2, chunk_pixels=160 * 120)
    again = chunked.segment(items, _prompts(items, boxes), multimask=True)
    np.testing.assert_allclose(again[0].multimask_scores, reference[0].multimask_scores, atol=1e-5)
    for j in range(3):
        assert _iou(_mask(again[0], j), _mask(reference[0], j)) > 0.999
    assert len(again[1].masks) == 0


def test_run_segmentation_refuses_a_different_image_frame():
    data = random_jpeg(40, 30)
    boxes = [box_prompts("a", 80, 60, np.array([[0, 0, 10, 10]], np.float32))]
    with pytest.raises(RuntimeError, match="re-run detections"):
        run_segmentation(boxes, lambda _: data, FakeSegmenter(), SegmentationSettings(), workers=1)


def test_candidates_from_tables_join_in_candidate_order():
    detections = pa.table(
        {
            "image_id": ["b", "a", "a"],
            "candidate_id": [0, 1, 0],
            "x0": [1.0, 2, 3],
            "y0": [0.0, 0, 0],
            "x1": [5.0, 6, 7],
            "y1": [5.0, 5, 5],
            "box_score": [0.9, 0.2, 0.8],
            "text_score": [0.9, 0.2, 0.8],
            "phrase": ["p"] * 3,
            "query_index": [5, 9, 2],
        },
        schema=schemas.DETECTIONS,
    )
    images = pa.table(
        {"image_id": ["c", "b", "a"], "width": [9, 9, 9], "height": [9, 9, 9], "num_candidates": [0, 1, 2]},
        schema=schemas.DETECTION_IMAGES,
    )
    joined = Candidates.from_tables(detections, images)
    assert [ref.image_id for ref in joined] == ["a", "b", "c"]
    assert joined[0].boxes[:, 0].tolist() == [3.0, 2.0] and joined[2].boxes.shape == (0, 4)
    assert joined[0].query_indices.tolist() == [2, 9] and joined[0].box_scores.tolist() == pytest.approx(
        [0.8, 0.2]
    )
    assert joined[1].phrases == ["p"] and len(joined[2]) == 0 and joined[2].query_indices.dtype == np.int32
    legacy = Candidates.from_tables(detections.drop_columns(["query_index"]), images)
    assert legacy[0].query_indices.tolist() == [0, 1]  # shards before query_index: candidate order
    nothing = Candidates.from_tables(detections.slice(0, 0), images)
    assert [len(found) for found in nothing] == [0, 0, 0] and nothing[0].boxes.shape == (0, 4)


@pytest.mark.model
def test_spec_identity_and_tiny_guard(tmp_path):
    spec = SegmenterSpec(checkpoint="random", tiny=True, variant="tiny", cache_dir=str(tmp_path))
    identity = load_segmenter(spec).describe()
    assert identity["smoke_run"] is True and identity["input_size"] == f"{SIZE}x{SIZE}"
    assert identity["variant"] == "tiny-tiny" and identity["weights"] == "random"
    with pytest.raises(ModelConfigError, match="random"):
        load_segmenter(SegmenterSpec(tiny=True, cache_dir=str(tmp_path)))
