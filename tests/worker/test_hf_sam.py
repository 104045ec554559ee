"""HfSamSegmenter on the real transformers EdgeTamModel (tiny config, random weights, 128 px inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from images import random_jpeg

from pseudolabel.models import tiny
from pseudolabel.models.checkpoints import CheckpointNotFound, ResolvedCheckpoint
from pseudolabel.models.hf_sam import EDGETAM, HfSamSegmenter, build_edgetam
from pseudolabel.models.interfaces import Candidates
from pseudolabel.models.loading import ModelConfigError, SegmenterSpec, load_segmenter
from pseudolabel.rle import decode_rle
from pseudolabel.testing.models import box_prompts

SIZE = tiny.TINY_EDGETAM_IMAGE_SIZE


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    """On the CPU in fp32 whatever the machine: these tests compare with fp32 references on the host
    (bf16 on CUDA: test_cuda_autocast.py)."""
    spec = SegmenterSpec(
        backend="edgetam",
        checkpoint="random",
        tiny=True,
        device="cpu",
        allow_download=False,
        cache_dir=str(tmp_path_factory.mktemp("c")),
    )
    return load_segmenter(spec)


def _mask(result: Candidates, j: int) -> np.ndarray:
    return decode_rle(result.masks.counts[j], result.masks.height, result.masks.width)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _with_clicks(item, boxes, points, labels, box_prompt) -> Candidates:
    found = box_prompts(item.image_id, item.width, item.height, np.asarray(boxes, np.float32))
    return found.with_prompts(np.asarray(points, np.float32), np.asarray(labels, np.int8), box_prompt)


def _mixed(items) -> list[Candidates]:
    """Boxes, box + a negative click, clicks only and single clicks (with padding), over two images."""
    pad = [0, 0]
    return [
        _with_clicks(
            items[0],
            [[10, 10, 120, 100], [50, 20, 190, 140], [30, 30, 90, 90], [100, 75, 100, 75]],
            [[pad, pad], [[120, 80], pad], [[40, 40], [80, 85]], [pad, [100, 75]]],
            [[-1, -1], [0, -1], [1, 0], [-1, 1]],
            [True, True, False, False],
        ),
        _with_clicks(  # two box prompts around a click: one call for both boxes, rows put back in order
            items[1],
            [[5, 30, 80, 150], [45, 80, 45, 80], [10, 10, 60, 60]],
            [[pad], [[45, 80]], [pad]],
            [[-1], [1], [-1]],
            [True, False, True],
        ),
    ]


@pytest.mark.model
def test_loads_offline_and_describes_itself(segmenter, tmp_path, monkeypatch):
    from transformers import EdgeTamModel

    assert isinstance(segmenter, HfSamSegmenter) and isinstance(segmenter.model, EdgeTamModel)
    identity = segmenter.describe()
    assert (
        identity["backend"] == "edgetam" and identity["model"] == "edgetam" and identity["variant"] == "tiny"
    )
    assert identity["weights"] == "random" and identity["smoke_run"] is True and identity["tiny"] is True
    assert identity["input_size"] == f"{SIZE}x{SIZE}" and identity["device"] == "cpu"
    # no released checkpoint fits the tiny architecture
    with pytest.raises(ModelConfigError, match="random"):
        load_segmenter(SegmenterSpec(backend="edgetam", tiny=True))
    # the released weights: the pinned hub revision, never fetched with downloads off
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointNotFound, match=f"{EDGETAM.repo_id}@{EDGETAM.revision}"):
        load_segmenter(SegmenterSpec(backend="edgetam", allow_download=False, cache_dir=str(tmp_path)))


@pytest.mark.model
def test_shapes_scores_and_original_sizes(segmenter):
    """Masks at each image's original size; multimask: 3 scores per prompt, the best kept; without: 1.
    An image without candidates gets none."""
    items = [
        segmenter.prepare(f"s{k}", random_jpeg(w, h, seed=k))
        for k, (w, h) in enumerate([(200, 150), (90, 160), (64, 64)])
    ]
    boxes = [
        np.array([[10, 10, 120, 100], [0, 0, 200, 150]], np.float32),
        np.array([[5, 30, 80, 150]], np.float32),
    ]
    candidates = [
        *(box_prompts(i.image_id, i.width, i.height, b) for i, b in zip(items, boxes, strict=False)),
        Candidates.empty("s2", 64, 64),
    ]
    multi = segmenter.segment(items, candidates, multimask=True)
    single = segmenter.segment(items, candidates, multimask=False)
    for result, item, found in zip(multi, items, candidates, strict=True):
        assert (result.masks.height, result.masks.width) == (item.height, item.width) and len(
            result.masks
        ) == len(found)
        assert (
            result.multimask_scores.shape == (len(found), 3) and result.multimask_scores.dtype == np.float32
        )
        np.testing.assert_array_equal(result.multimask_index, result.multimask_scores.argmax(axis=1))
        np.testing.assert_array_equal(result.mask_scores, result.multimask_scores.max(axis=1))
        for j in range(len(found)):
            assert _mask(result, j).shape == (item.height, item.width)
            assert result.masks.areas[j] == _mask(result, j).sum()
    for result, found in zip(single, candidates, strict=True):
        assert result.multimask_scores.shape == (len(found), 1) and not result.multimask_index.any()
    assert len(multi[2].masks) == 0 and multi[2].multimask_scores.shape == (0, 3)


@pytest.mark.model
def test_prompt_kinds_match_the_model_called_per_prompt(segmenter):
    """Boxes, box + clicks, clicks only and single clicks mixed in one batch over images of different
    sizes: each candidate's scores and mask equal EdgeTamModel's forward for that prompt alone, its
    prompt built by transformers' Sam2Processor from the original-pixel box and clicks."""
    from transformers import Sam2ImageProcessorFast, Sam2Processor

    processor = Sam2Processor(image_processor=Sam2ImageProcessorFast(), target_size=SIZE)
    model = segmenter.model
    items = [
        segmenter.prepare("p0", random_jpeg(200, 150, seed=1)),
        segmenter.prepare("p1", random_jpeg(90, 160, seed=2)),
    ]
    candidates = _mixed(items)
    results = segmenter.segment(items, candidates, multimask=True)
    for item, found, result in zip(items, candidates, results, strict=True):
        pixels = item.pixels[None].float() * segmenter._scale - segmenter._shift
        for j in range(len(found)):
            keep = found.point_labels[j] >= 0
            prompt = {"original_sizes": [[item.height, item.width]], "return_tensors": "pt"}
            if found.box_prompts()[j]:
                prompt["input_boxes"] = [[found.boxes[j].tolist()]]
            if keep.any():
                prompt["input_points"] = [[found.points[j][keep].tolist()]]
                prompt["input_labels"] = [[found.point_labels[j][keep].tolist()]]
            inputs = processor(**prompt)
            inputs.pop("original_sizes")
            with torch.inference_mode():
                out = model(pixel_values=pixels, multimask_output=True, **inputs)
            scores = out.iou_scores[0, 0].numpy()
            np.testing.assert_allclose(result.multimask_scores[j], scores, atol=1e-5)
            best = int(scores.argmax())
            assert result.multimask_index[j] == best
            logits = F.interpolate(
                out.pred_masks[0, :, best : best + 1],
                (item.height, item.width),
                mode="bilinear",
                align_corners=False,
            )
            assert _iou(_mask(result, j), (logits[0, 0] > 0).numpy()) > 0.99, (item.image_id, j)


@pytest.mark.model
def test_a_negative_click_changes_the_box_mask(segmenter):
    item = segmenter.prepare("r", random_jpeg(200, 150, seed=4))
    alone = box_prompts("r", 200, 150, np.array([[20, 15, 170, 130]], np.float32))
    refined = alone.with_prompts(np.array([[[90, 70]]], np.float32), np.array([[0]], np.int8))
    first, second = segmenter.segment([item, item], [alone, refined], multimask=True)
    assert not np.allclose(first.multimask_scores, second.multimask_scores, atol=1e-3)
    assert (_mask(first, 0) != _mask(second, 0)).any()


@pytest.mark.model
def test_a_local_checkpoint_directory_loads_the_same_model_offline(segmenter, tmp_path, monkeypatch):
    """save_pretrained() output as `checkpoint`, with the hub unreachable (transformers' own EdgeTAM
    config defaults would read the timm backbone's config from the hub): the same weights give the same
    masks, and their digest enters the identity."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("transformers.utils.hub._is_offline_mode", True)
    model = build_edgetam(ResolvedCheckpoint(None, None, "random", "random"), tiny=True, seed=0)
    model.save_pretrained(tmp_path / "edgetam")
    # device "auto" on a machine without CUDA: EdgeTAM runs on the CPU (SAM2 would refuse pretrained weights)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = load_segmenter(
        SegmenterSpec(backend="edgetam", checkpoint=str(tmp_path / "edgetam"), allow_download=False)
    )
    identity = loaded.describe()
    assert identity["device"] == "cpu"
    assert identity["weights"] == "pretrained" and len(identity["checkpoint_sha256"]) == 64
    assert identity["input_size"] == f"{SIZE}x{SIZE}" and "tiny" not in identity
    item = segmenter.prepare("l", random_jpeg(120, 90, seed=5))
    found = box_prompts("l", 120, 90, np.array([[10, 10, 100, 80]], np.float32))
    (ours,) = segmenter.segment([item], [found], multimask=True)
    (theirs,) = loaded.segment([item], [found], multimask=True)
    np.testing.assert_allclose(theirs.multimask_scores, ours.multimask_scores, atol=1e-6)
    assert theirs.masks.counts == ours.masks.counts
