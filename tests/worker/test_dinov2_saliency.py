"""dinov2_saliency: the region rule on hand-made maps, and the detector on the real Dinov2Model built
from a tiny config with random weights (smoke runs: the regions themselves mean nothing)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from images import random_jpeg

from pseudolabel.models import tiny
from pseudolabel.models.checkpoints import CheckpointNotFound
from pseudolabel.models.dinov2_saliency import (
    PHRASE,
    Dinov2SaliencyDetector,
    input_size,
    mass_cutoff,
    regions_from_saliency,
)
from pseudolabel.models.loading import DetectorSpec, ModelConfigError, load_detector

SIZES = [(200, 150), (200, 150), (90, 160)]  # two share an input shape, one is portrait


# ---- the region rule on hand-made maps ---------------------------------------------------------


def two_blobs() -> np.ndarray:
    """100 x 120 map: blob A (rows 10-29, cols 10-39) at 1.0 holds 600, blob B (rows 60-79, cols 70-99)
    at 0.5 holds 300, and a 2 x 2 speck at 1.0 (rows 90-91, cols 5-6) holds 4: 904 in all."""
    saliency = np.zeros((100, 120), np.float32)
    saliency[10:30, 10:40] = 1.0
    saliency[60:80, 70:100] = 0.5
    saliency[90:92, 5:7] = 1.0
    return saliency


def test_mass_cutoff_keeps_the_smallest_set_holding_the_mass():
    values = np.array([[0.1, 0.5], [0.3, 0.1]])
    assert mass_cutoff(values, 0.5) == 0.5  # 0.5 alone holds exactly half
    assert mass_cutoff(values, 0.6) == 0.3  # 0.5 + 0.3 = 0.8 >= 0.6
    assert mass_cutoff(values, 0.85) == 0.1  # needs a 0.1: both ties are kept (>= cutoff)
    assert mass_cutoff(values, 1.0) == 0.1


def test_two_blobs_give_two_boxes_at_their_place():
    regions = regions_from_saliency(two_blobs(), attention_threshold=0.95, min_area=0.01, num_objects=5)
    np.testing.assert_array_equal(regions.boxes, [[10, 10, 40, 30], [70, 60, 100, 80]])
    np.testing.assert_allclose(regions.mass, [600 / 904, 300 / 904], rtol=1e-6)
    np.testing.assert_allclose(regions.points, [[24.5, 19.5], [84.5, 69.5]])  # the blobs' centroids
    np.testing.assert_array_equal(regions.areas, [600, 600])
    assert regions.boxes.dtype == np.float32 and regions.points.dtype == np.float32


def test_threshold_is_the_share_of_attention_mass_kept():
    # 60 % of 904 = 542.4 <= 604 (A + speck, both at 1.0): B (0.5) is background.
    regions = regions_from_saliency(two_blobs(), attention_threshold=0.6, min_area=0.0, num_objects=5)
    np.testing.assert_array_equal(regions.boxes, [[10, 10, 40, 30], [5, 90, 7, 92]])
    # The cutoff can come from a coarser grid on the same scale: here one that puts it at 0.5.
    grid = np.array([[1.0, 0.5]], np.float32)
    regions = regions_from_saliency(two_blobs(), attention_threshold=0.9, min_area=0.0, grid=grid)
    assert len(regions.boxes) == 3


def test_min_area_drops_specks_and_num_objects_keeps_the_heaviest():
    everything = regions_from_saliency(two_blobs(), attention_threshold=1.0, min_area=0.0, num_objects=5)
    assert len(everything.boxes) == 3 and everything.areas[-1] == 4
    # 0.01 of 12 000 px = 120 px: the 4 px speck goes, the blobs stay.
    assert len(regions_from_saliency(two_blobs(), attention_threshold=1.0, min_area=0.01).boxes) == 2
    assert len(regions_from_saliency(two_blobs(), attention_threshold=1.0, min_area=0.06).boxes) == 0
    (heaviest,) = regions_from_saliency(two_blobs(), attention_threshold=1.0, num_objects=1).boxes
    np.testing.assert_array_equal(heaviest, [10, 10, 40, 30])


def test_a_ring_gets_its_click_on_its_peak_not_its_hollow_centroid():
    rows, cols = np.mgrid[0:61, 0:61]
    radius = np.hypot(rows - 30, cols - 30)
    saliency = ((radius >= 20) & (radius <= 25)).astype(np.float32)
    saliency[30, 52] = 3.0  # the ring's peak, on its right side
    regions = regions_from_saliency(saliency, attention_threshold=1.0, min_area=0.0)
    assert len(regions.boxes) == 1
    np.testing.assert_array_equal(regions.points[0], [52, 30])


def test_empty_map_has_no_regions():
    regions = regions_from_saliency(np.zeros((10, 10), np.float32))
    assert regions.boxes.shape == (0, 4) and regions.points.shape == (0, 2) and len(regions.mass) == 0


# ---- the detector on the tiny random-weight model --------------------------------------------------


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """On the CPU in fp32 whatever the machine (bf16 on CUDA: test_cuda_autocast.py)."""
    spec = DetectorSpec(
        backend="dinov2_saliency",
        checkpoint="random",
        tiny=True,
        device="cpu",
        allow_download=False,
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    return load_detector(spec)


@pytest.fixture(scope="module")
def prepared(detector):
    return [detector.prepare(f"img{i}", random_jpeg(w, h, seed=i)) for i, (w, h) in enumerate(SIZES)]


def with_mode(detector: Dinov2SaliencyDetector, prompt_mode: str) -> Dinov2SaliencyDetector:
    return Dinov2SaliencyDetector(
        detector.model,
        device=detector.device,
        image_size=detector.image_size,
        max_size=detector.max_size,
        prompt_mode=prompt_mode,
    )


def test_loads_offline_as_a_described_smoke_run(detector):
    identity = detector.describe()
    assert identity["smoke_run"] is True and identity["weights"] == "random"
    assert identity["variant"] == "small-tiny" and identity["architecture"] == "Dinov2Model"
    assert identity["captions"] == "ignored (prompt-free)"
    assert (identity["num_objects"], identity["attention_threshold"], identity["min_area"]) == (5, 0.6, 0.01)
    assert identity["prompt_mode"] == "box"
    assert identity["input_size"] == "short 112 / max 196, multiple of 14"
    assert detector.model.config.num_hidden_layers == tiny.TINY_DINOV2["num_hidden_layers"]


@pytest.mark.parametrize(
    ("size", "expected"),
    [((200, 150), (154, 112)), ((90, 160), (112, 196)), ((1000, 100), (196, 14)), ((112, 112), (112, 112))],
)
def test_input_size_is_whole_patches(size, expected):
    assert input_size(*size, 112, 196, 14) == expected


def test_prepare_keeps_the_original_size(prepared):
    for item, (width, height) in zip(prepared, SIZES, strict=True):
        assert (item.width, item.height) == (width, height)
        assert item.pixels.dtype == torch.uint8 and item.pixels.shape[0] == 3
        assert item.pixels.shape[1] % 14 == 0 and item.pixels.shape[2] % 14 == 0


def test_cls_attention_equals_the_eager_output_attentions(detector, prepared):
    eager = copy.deepcopy(detector.model)
    eager.set_attn_implementation("eager")
    pixels = prepared[2].pixels[None].float() * detector._scale - detector._shift
    with torch.inference_mode():
        reference = eager(pixels, output_attentions=True).attentions[-1]  # (1, heads, N, N)
        mine = detector.cls_attention(pixels)
    assert mine.shape == (1, 2, 14, 8)
    torch.testing.assert_close(mine, reference[:, :, 0, 1:].reshape(mine.shape), atol=1e-6, rtol=1e-5)


def test_detect_returns_regions_and_maps_in_original_pixels(detector, prepared):
    found, maps = detector.detect_with_maps(prepared, ["ignored ."], box_floor=0.0, max_candidates=300)
    assert [f.image_id for f in found] == ["img0", "img1", "img2"]
    assert sum(len(f) for f in found) > len(found)  # the tiny model's maps give several regions
    for result, saliency, item in zip(found, maps, prepared, strict=True):
        assert saliency.shape == (item.height, item.width) and saliency.dtype == np.float32
        assert saliency.min() >= 0 and 0.5 < saliency.max() <= 1
        n = len(result)
        assert 0 < n <= detector.num_objects and result.boxes.shape == (n, 4)
        assert np.all(result.boxes[:, :2] >= 0) and np.all(result.boxes[:, :2] < result.boxes[:, 2:])
        assert np.all(result.boxes[:, [0, 2]] <= item.width) and np.all(
            result.boxes[:, [1, 3]] <= item.height
        )
        assert np.all(np.diff(result.box_scores) <= 0) and 0 < result.box_scores.sum() <= 1
        assert np.isnan(result.text_scores).all() and result.phrases == [PHRASE] * n
        np.testing.assert_array_equal(result.query_indices, np.arange(n))
        assert result.points is None and result.box_prompts().all()  # prompt_mode "box"
        # The boxes are the regions of the returned map, cut by the patch-level mass rule.
        grid = detector.patch_saliency([item])[0]
        regions = regions_from_saliency(saliency, num_objects=5, grid=grid / grid.max())
        np.testing.assert_array_equal(result.boxes, regions.boxes)
    # Prompt-free: the captions change nothing.
    again = detector.detect(prepared, [], box_floor=0.0)
    assert all(np.array_equal(a.boxes, b.boxes) for a, b in zip(found, again, strict=True))


def test_floors_and_caps(detector, prepared):
    capped = detector.detect(prepared, [], box_floor=0.0, max_candidates=1)
    assert [len(f) for f in capped] == [1, 1, 1]
    (empty,) = with_mode(detector, "point").detect(prepared[:1], [], box_floor=1.0)
    assert len(empty) == 0 and empty.boxes.shape == (0, 4) and empty.phrases == []
    (some,) = detector.detect(prepared[:1], [], box_floor=0.0)
    floor = float(np.median(some.box_scores))
    (above,) = detector.detect(prepared[:1], [], box_floor=floor)
    assert len(above) == int((some.box_scores > floor).sum()) and np.all(above.box_scores > floor)


def test_prompt_modes_set_the_prompt_fields(detector, prepared):
    boxes = detector.detect(prepared, [], box_floor=0.0)
    points = with_mode(detector, "point").detect(prepared, [], box_floor=0.0)
    both = with_mode(detector, "box+point").detect(prepared, [], box_floor=0.0)
    for plain, clicked, combined in zip(boxes, points, both, strict=True):
        n = len(plain)
        np.testing.assert_array_equal(clicked.boxes, plain.boxes)
        np.testing.assert_array_equal(combined.boxes, plain.boxes)
        assert clicked.points.shape == (n, 1, 2) and clicked.points.dtype == np.float32
        np.testing.assert_array_equal(clicked.point_labels, np.ones((n, 1), np.int8))
        assert not clicked.box_prompts().any() and clicked.has_clicks
        assert combined.box_prompts().all() and combined.has_clicks
        np.testing.assert_array_equal(combined.points, clicked.points)
        x, y = clicked.points[:, 0, 0], clicked.points[:, 0, 1]  # each click inside its own box
        assert np.all((plain.boxes[:, 0] <= x) & (x < plain.boxes[:, 2]))
        assert np.all((plain.boxes[:, 1] <= y) & (y < plain.boxes[:, 3]))


def test_a_mixed_batch_equals_per_image_runs(detector, prepared):
    batched, batched_maps = detector.detect_with_maps(prepared, [], box_floor=0.0)
    for item, result, saliency in zip(prepared, batched, batched_maps, strict=True):
        (alone,), (alone_map,) = detector.detect_with_maps([item], [], box_floor=0.0)
        np.testing.assert_allclose(saliency, alone_map, atol=1e-5)
        np.testing.assert_allclose(result.boxes, alone.boxes)
        np.testing.assert_allclose(result.box_scores, alone.box_scores, rtol=1e-4)


def test_a_registers_checkpoint_loads_from_a_local_directory(tmp_path, prepared):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(**tiny.TINY_DINOV2, num_register_tokens=4)
    Dinov2WithRegistersModel(config).save_pretrained(tmp_path / "model")
    spec = DetectorSpec(
        backend="dinov2_saliency", checkpoint=str(tmp_path / "model"), device="cpu", cache_dir=str(tmp_path)
    )
    detector = load_detector(spec)
    identity = detector.describe()
    assert identity["architecture"] == "Dinov2WithRegistersModel" and identity["weights"] == "pretrained"
    assert identity["checkpoint_status"] == "unpinned" and len(identity["checkpoint_sha256"]) == 64
    assert detector.first_patch == 5  # CLS, then 4 registers, then the patches
    item = detector.prepare("p", random_jpeg(90, 160))
    pixels = item.pixels[None].float() * detector._scale - detector._shift
    eager = copy.deepcopy(detector.model)
    eager.set_attn_implementation("eager")
    with torch.inference_mode():
        reference = eager(pixels, output_attentions=True).attentions[-1][:, :, 0, 5:]
        mine = detector.cls_attention(pixels)
    torch.testing.assert_close(mine, reference.reshape(mine.shape), atol=1e-6, rtol=1e-5)
    (found,) = detector.detect([item], [], box_floor=0.0)
    assert (found.width, found.height) == (90, 160) and len(found) >= 1


def test_bad_settings_fail_with_clear_errors(tmp_path):
    # The official weights, not cached and no download allowed: knobs must be refused before that.
    base = {"backend": "dinov2_saliency", "allow_download": False, "cache_dir": str(tmp_path)}
    for knob, message in [
        ({"attention_threshold": 0.0}, "attention_threshold"),
        ({"attention_threshold": 1.5}, "attention_threshold"),
        ({"min_area": 1.0}, "min_area"),
        ({"num_objects": 0}, "num_objects"),
        ({"variant": "huge"}, "small"),
    ]:
        with pytest.raises(ModelConfigError, match=message):
            load_detector(DetectorSpec(**base | knob))
    offline = DetectorSpec(backend="dinov2_saliency", cache_dir=str(tmp_path), allow_download=False)
    with pytest.raises(CheckpointNotFound, match="facebook/dinov2-small@ed25f3a3"):
        load_detector(offline)
    tiny.write_bert_dir(tmp_path / "bert")
    with pytest.raises(ModelConfigError, match="holds a 'bert' model; dinov2_saliency needs one of"):
        load_detector(
            DetectorSpec(backend="dinov2_saliency", checkpoint=str(tmp_path / "bert"), device="cpu")
        )
