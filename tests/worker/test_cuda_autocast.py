"""bf16 autocast as CUDA applies it: the emulation itself (cuda_autocast.py), then every backend's tiny
random architecture run with ``precision="bf16"`` under it (and on CUDA where there is one).

What a GPU run would meet first is checked here on the CPU: bf16 tensors reaching numpy or the host copy,
dtype mismatches between autocast and fp32 code, and heads losing precision (their outputs bf16-rounded).
Random weights: the drift against the fp32 run is a regression guard, not a quality figure.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cuda_autocast import autocast_operators, bf16_exact, cuda_autocast_on_cpu
from images import random_jpeg

from pseudolabel.models import tiny
from pseudolabel.models.grounding_dino import GroundingDinoDetector
from pseudolabel.models.grounding_dino_build import build_grounding_dino
from pseudolabel.models.loading import (
    DetectorSpec,
    SegmenterSpec,
    TrackerSpec,
    load_detector,
    load_segmenter,
    load_tracker,
)
from pseudolabel.rle import decode_rle
from pseudolabel.testing.models import box_prompts

CPU = torch.device("cpu")
CAPTION = "potted plant . flower ."
SIZES = [(200, 150), (90, 160)]
EVERY = {"box_floor": 0.0, "text_floor": 0.0, "max_candidates": 10_000}


# ---- the emulation --------------------------------------------------------------------------------------


def _dtypes(device: torch.device) -> dict[str, torch.dtype]:
    """Output dtypes of ops from CUDA's lower-precision, fp32 and promote lists and of ops on none,
    under bf16 autocast of ``device``'s type (fp32 inputs unless said)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 8, generator=g).to(device), torch.randn(16, 8, generator=g).to(device)
    image, kernel = torch.randn(1, 3, 8, 8).to(device), torch.randn(4, 3, 3, 3).to(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        half = F.linear(x, w)  # bf16 on CUDA
        q = torch.randn(1, 2, 5, 8).to(device)
        return {
            "linear": half.dtype,
            "matmul": (x @ w.T).dtype,
            "conv2d": F.conv2d(image, kernel).dtype,
            "sdpa": F.scaled_dot_product_attention(q, q, q).dtype,
            "layer_norm(bf16)": F.layer_norm(half, (16,)).dtype,
            "softmax(bf16)": half.softmax(-1).dtype,
            "sum(bf16)": half.sum().dtype,
            "interpolate(bf16)": F.interpolate(half[None, None], scale_factor=2, mode="bilinear").dtype,
            "exp(bf16)": half.exp().dtype,
            "grid_sample(bf16, fp32)": F.grid_sample(
                half[None, None], torch.zeros(1, 2, 2, 2, device=device), align_corners=False
            ).dtype,
            "cat(bf16, fp32)": torch.cat([half, x.repeat(1, 2)]).dtype,
            "sigmoid(bf16)": half.sigmoid().dtype,
            "add(bf16, fp32)": (half + x.repeat(1, 2)).dtype,
        }


CUDA_RULES = {  # torch 2.14's CUDA autocast, bf16
    "linear": torch.bfloat16,
    "matmul": torch.bfloat16,
    "conv2d": torch.bfloat16,
    "sdpa": torch.bfloat16,
    "layer_norm(bf16)": torch.float32,
    "softmax(bf16)": torch.float32,
    "sum(bf16)": torch.float32,
    "interpolate(bf16)": torch.float32,
    "exp(bf16)": torch.float32,
    "grid_sample(bf16, fp32)": torch.float32,
    "cat(bf16, fp32)": torch.float32,
    "sigmoid(bf16)": torch.bfloat16,
    "add(bf16, fp32)": torch.float32,
}


def test_bf16_autocast_follows_cuda_s_rules(bf16):
    """The emulated CPU (and a real GPU, where there is one) give CUDA's dtypes op by op."""
    with bf16.running() as report:
        assert _dtypes(bf16.device) == CUDA_RULES
    assert not report.undecided


def test_plain_cpu_autocast_differs_and_the_emulation_leaves_no_trace():
    """CPU autocast's own lists keep bf16 layer norms, softmaxes and sums (what a CPU bf16 run would
    wrongly tell about a GPU); after the emulated region they are back."""
    own = _dtypes(CPU)
    assert own["layer_norm(bf16)"] == own["softmax(bf16)"] == own["sum(bf16)"] == torch.bfloat16
    with cuda_autocast_on_cpu():
        assert _dtypes(CPU) == CUDA_RULES
    assert _dtypes(CPU) == own


def test_cuda_autocast_switched_off_in_library_code_switches_the_emulation_off():
    """groundingdino runs its decoder FFN under ``torch.cuda.amp.autocast(enabled=False)``: fp32 on CUDA."""
    x, w = torch.randn(4, 8), torch.randn(16, 8)
    with cuda_autocast_on_cpu(), torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cuda", enabled=False):
            assert F.linear(x, w).dtype == torch.float32
        with torch.cuda.amp.autocast(enabled=False):
            assert F.linear(x, w).dtype == torch.float32
        assert F.linear(x, w).dtype == torch.bfloat16


def test_every_cuda_autocast_operator_is_emulated():
    cuda, cpu_only = autocast_operators()
    assert {"aten::linear", "aten::layer_norm", "aten::softmax.int", "aten::upsample_bilinear2d"} <= set(cuda)
    assert "aten::cat" in cpu_only and not set(cuda) & set(cpu_only)


def test_bf16_exact_tells_bf16_rounded_values():
    values = np.array([0.1234567, 0.987654], np.float32)
    assert not bf16_exact(values)
    assert bf16_exact(torch.from_numpy(values).bfloat16().float().numpy())


# ---- every backend under bf16 autocast --------------------------------------------------------------------


def _check_candidates(found, width: int, height: int) -> None:
    """fp32, finite boxes inside the image and scores in [0, 1] (NaN where the backend makes none)."""
    assert found.boxes.dtype == found.box_scores.dtype == found.text_scores.dtype == np.float32
    assert np.isfinite(found.boxes).all() and np.isfinite(found.box_scores).all()
    assert (found.boxes >= 0).all() and (found.boxes[:, [0, 2]] <= width).all()
    assert (found.boxes[:, [1, 3]] <= height).all()
    assert ((found.box_scores >= 0) & (found.box_scores <= 1)).all()


def _by_query(a, b) -> tuple[np.ndarray, np.ndarray]:
    """(box drift in pixels, score drift) per query both hold."""
    common = np.intersect1d(a.query_indices, b.query_indices)
    ia = {q: i for i, q in enumerate(a.query_indices)}
    ib = {q: i for i, q in enumerate(b.query_indices)}
    rows_a, rows_b = [ia[q] for q in common], [ib[q] for q in common]
    boxes = np.abs(a.boxes[rows_a] - b.boxes[rows_b]).max(axis=1)
    return boxes, np.abs(a.box_scores[rows_a] - b.box_scores[rows_b])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.model
def test_grounding_dino(bf16, tmp_path):
    """Heads in fp32 (boxes and scores not bf16-rounded). The tiny random model's 30 boxes are its
    encoder proposals and its scores saturate: bf16 swaps which proposals win the top-k (measured: up to
    all 30 queries move, scores by up to 0.84), so beyond the heads only the shapes are checked."""
    bert = tiny.write_bert_dir(tmp_path / "bert")
    model = build_grounding_dino("swint_ogc", None, str(bert), overrides=tiny.TINY_GROUNDING_DINO)
    sizes = {"image_size": 128, "max_size": 224, "batch_size": 2}
    reference = GroundingDinoDetector(model, device=CPU, **sizes)
    items = [reference.prepare(f"img{i}", random_jpeg(w, h, seed=i)) for i, (w, h) in enumerate(SIZES)]
    expected = reference.detect(items, [CAPTION], **EVERY)
    half = GroundingDinoDetector(model, device=bf16.device, precision="bf16", **sizes)
    with bf16.running() as report:
        found = half.detect(items, [CAPTION], **EVERY)
    assert not report.undecided
    for a, b, (width, height) in zip(found, expected, SIZES, strict=True):
        assert len(a) == len(b) == tiny.TINY_GROUNDING_DINO["num_queries"]
        _check_candidates(a, width, height)
        assert set(a.phrases) <= {"potted plant", "flower"}
        assert not bf16_exact(a.boxes) and not bf16_exact(a.box_scores) and not bf16_exact(a.text_scores)


@pytest.mark.model
@pytest.mark.parametrize("backend", ["owlv2", "owlvit"])
def test_owl(bf16, backend):
    """Heads in fp32. Measured drift from the fp32 run: boxes <= 0.27 px, scores <= 0.0016."""
    spec = DetectorSpec(backend=backend, checkpoint="random", tiny=True, device="cpu", batch_size=2)
    reference = load_detector(spec)
    half = load_detector(replace(spec, device=bf16.device.type, precision="bf16"))
    items = [reference.prepare(f"img{i}", random_jpeg(w, h, seed=i)) for i, (w, h) in enumerate(SIZES)]
    expected = reference.detect(items, [CAPTION], **EVERY)
    with bf16.running() as report:
        found = half.detect(items, [CAPTION], **EVERY)
    assert not report.undecided
    for a, b, (width, height) in zip(found, expected, SIZES, strict=True):
        assert len(a) == len(b) == half.num_patches  # one caption: its best phrase per patch
        _check_candidates(a, width, height)
        assert not bf16_exact(a.boxes) and not bf16_exact(a.box_scores)
        boxes, scores = _by_query(a, b)
        assert len(boxes) == len(a) and boxes.max() < 1.5 and scores.max() < 0.01


@pytest.mark.model
def test_dinov2_saliency(bf16):
    """The CLS attention row in fp32 (region scores not bf16-rounded). Measured: the same regions, box
    edges within 1 px, mass shares within 0.0012."""
    spec = DetectorSpec(backend="dinov2_saliency", checkpoint="random", tiny=True, device="cpu")
    reference = load_detector(spec)
    half = load_detector(replace(spec, device=bf16.device.type, precision="bf16"))
    items = [reference.prepare(f"img{i}", random_jpeg(w, h, seed=i)) for i, (w, h) in enumerate(SIZES)]
    expected = reference.detect(items, [])
    with bf16.running() as report:
        found, maps = half.detect_with_maps(items, [])
    assert not report.undecided
    for a, b, saliency, (width, height) in zip(found, expected, maps, SIZES, strict=True):
        assert len(a) == len(b) > 0 and saliency.dtype == np.float32 and saliency.shape == (height, width)
        _check_candidates(a, width, height)
        assert not bf16_exact(a.box_scores)
        boxes, scores = _by_query(a, b)
        assert boxes.max() <= 4 and scores.max() < 0.01


def _segment_both(spec: SegmenterSpec, bf16) -> tuple[list, list]:
    """(fp32 results, bf16 results) of one mixed batch: boxes, multimask."""
    reference = load_segmenter(spec)
    half = load_segmenter(replace(spec, device=bf16.device.type, precision="bf16"))
    items = [reference.prepare(f"img{i}", random_jpeg(w, h, seed=i)) for i, (w, h) in enumerate(SIZES)]
    boxes = np.array([[10, 10, 80, 100], [30, 20, 90, 140], [0, 0, 60, 60]], np.float32)
    candidates = [box_prompts(i.image_id, i.width, i.height, boxes) for i in items]
    expected = reference.segment(items, candidates, multimask=True)
    with bf16.running() as report:
        found = half.segment(items, candidates, multimask=True)
    assert not report.undecided
    return expected, found


def _check_masks(expected: list, found: list, score_drift: float, min_iou: float) -> None:
    """Predicted IoUs in fp32 (not bf16-rounded: bf16 ones tie), within ``score_drift`` of the fp32 run,
    the same mask kept, masks overlapping the fp32 ones by ``min_iou`` at least."""
    for a, b in zip(found, expected, strict=True):
        assert a.multimask_scores.dtype == np.float32 and a.multimask_scores.shape == (len(b), 3)
        assert not bf16_exact(a.multimask_scores)
        assert np.abs(a.multimask_scores - b.multimask_scores).max() < score_drift
        np.testing.assert_array_equal(a.multimask_index, b.multimask_index)
        for j in range(len(b)):
            mine = decode_rle(a.masks.counts[j], a.height, a.width)
            assert _iou(mine, decode_rle(b.masks.counts[j], b.height, b.width)) > min_iou


@pytest.mark.model
def test_sam2(bf16):
    """Measured: IoU scores within 0.0003 of the fp32 run, the same masks kept, mask IoU >= 0.985."""
    spec = SegmenterSpec(backend="sam2", variant="tiny", checkpoint="random", tiny=True, device="cpu")
    _check_masks(*_segment_both(spec, bf16), score_drift=0.005, min_iou=0.95)


@pytest.mark.model
def test_edgetam(bf16):
    """Measured: IoU scores within 0.015 of the fp32 run, the same masks kept, mask IoU >= 0.98."""
    spec = SegmenterSpec(backend="edgetam", checkpoint="random", tiny=True, device="cpu")
    _check_masks(*_segment_both(spec, bf16), score_drift=0.05, min_iou=0.95)


@pytest.mark.model
def test_sam2_video(bf16, tmp_path):
    """A window propagated with box and mask prompts. Measured: presence scores within 0.0004 of the
    fp32 run, mask areas within 3 px of ~300."""
    from PIL import Image, ImageDraw

    width, height = 80, 48
    for n in range(4):
        image = Image.new("RGB", (width, height), (40, 40, 40))
        ImageDraw.Draw(image).rectangle([10 + 4 * n, 10, 30 + 4 * n, 30], fill=(230, 30, 30))
        image.save(tmp_path / f"{n:06d}.jpg", quality=95)
    mask = np.zeros((height, width), bool)
    mask[5:20, 50:70] = True

    def track(tracker):
        tracker.init(str(tmp_path))
        tracker.add_box(0, 7, np.array([10, 10, 31, 31], np.float32))
        tracker.add_mask(0, 9, mask)
        frames = list(tracker.propagate(0))
        tracker.reset()
        return frames

    spec = TrackerSpec(checkpoint="random", tiny=True, variant="tiny", device="cpu")
    expected = track(load_tracker(spec))
    half = load_tracker(replace(spec, device=bf16.device.type, precision="bf16"))
    with bf16.running() as report:
        found = track(half)
    assert not report.undecided
    assert [f.frame for f in found] == [f.frame for f in expected] == [0, 1, 2, 3]
    for a, b in zip(found, expected, strict=True):
        assert a.track_ids == b.track_ids == [7, 9] and a.scores.dtype == np.float32
        assert np.abs(a.scores - b.scores).max() < 0.01
        assert (
            np.abs(a.masks.areas.astype(int) - b.masks.areas.astype(int)).max() <= 0.05 * b.masks.areas.max()
        )
