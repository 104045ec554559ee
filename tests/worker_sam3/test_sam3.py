"""SAM 3 (transformers Sam3Model) as a detector that makes masks: the real architecture from the tiny
configuration with random weights (smoke runs: nothing here says anything about label quality)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers
from cuda_autocast import bf16_exact
from images import random_jpeg
from transformers import Sam3Model, Sam3Processor

from pseudolabel.models import tiny
from pseudolabel.models.loading import DetectorSpec, load_detector
from pseudolabel.models.runtime import inference
from pseudolabel.models.sam3 import MASK_THRESHOLD, Sam3Detector
from pseudolabel.rle import decode_rle

SIZES = [(160, 120), (96, 128), (200, 100)]  # mixed aspect ratios, all stretched to 112 x 112
CAPTIONS = ["plant . flower ."]
# transformers 5.0 names it Sam3ImageProcessorFast (the only one); later releases Sam3ImageProcessor.
Sam3ImageProcessor = getattr(transformers, "Sam3ImageProcessor", None) or transformers.Sam3ImageProcessorFast


def _spec(**overrides) -> DetectorSpec:
    return DetectorSpec(backend="sam3", checkpoint="random", tiny=True, batch_size=4, **overrides)


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Sam3Detector:
    """On the CPU in fp32 whatever the machine: these tests compare with fp32 references on the host
    (bf16 on CUDA: test_sam3_under_bf16_autocast)."""
    cache = tmp_path_factory.mktemp("cache")
    found = load_detector(_spec(cache_dir=str(cache), device="cpu"))
    assert not any(cache.iterdir())  # offline: nothing downloaded or generated on disk
    return found


@pytest.fixture(scope="module")
def batch(detector):
    return [detector.prepare(f"{i:016x}", random_jpeg(w, h, seed=i)) for i, (w, h) in enumerate(SIZES)]


def test_tiny_sam3_finds_instances_with_masks_in_original_pixels(detector, batch):
    results = detector.detect(batch, CAPTIONS, box_floor=0.05, text_floor=0.05, max_candidates=25)
    assert [r.image_id for r in results] == [item.image_id for item in batch]
    queries = detector.model.config.detr_decoder_config.num_queries
    for found, (width, height) in zip(results, SIZES, strict=True):
        n = len(found)
        assert (found.width, found.height) == (width, height)
        assert n == 25  # 2 phrases x 20 queries above the floors, cut to max_candidates
        assert found.boxes.shape == (n, 4) and found.boxes.dtype == np.float32
        assert (found.boxes[:, :2] >= 0).all() and (found.boxes[:, 2] <= width).all()
        assert (found.boxes[:, 3] <= height).all() and (found.boxes[:, 2:] >= found.boxes[:, :2]).all()
        assert np.all(np.diff(found.box_scores) <= 0)  # best first
        assert ((found.box_scores > 0.05) & (found.box_scores <= 1)).all()
        assert ((found.text_scores > 0.05) & (found.text_scores <= 1)).all()
        assert (found.box_scores <= found.text_scores + 1e-6).all()  # the score includes the presence
        assert set(found.phrases) == {"plant", "flower"}
        for phrase in ("plant", "flower"):  # one presence score per phrase and image
            assert len(set(found.text_scores[[p == phrase for p in found.phrases]].tolist())) == 1
        assert len(set(found.query_indices.tolist())) == n and found.query_indices.max() < 2 * queries
        # Masks: RLE at the original size, one per instance; K = 1, scored by the detection score.
        assert found.masks is not None and len(found.masks) == n
        assert (found.masks.height, found.masks.width) == (height, width)
        for counts, area in zip(found.masks.counts, found.masks.areas, strict=True):
            assert decode_rle(counts, height, width).sum() == area
        np.testing.assert_array_equal(found.mask_scores, found.box_scores)
        assert found.multimask_scores.shape == (n, 1) and not found.multimask_index.any()


def test_scores_boxes_and_masks_match_sam3s_own_post_processing(detector, batch):
    """One phrase on one image through ``Sam3Model.forward`` + ``post_process_instance_segmentation``."""
    item = batch[0]
    found = detector.detect([item], ["flower ."], box_floor=0.05, text_floor=0.0, max_candidates=300)[0]
    input_ids, attention_mask = detector.phrase_tokens("flower")
    pixels = item.pixels.float() * detector._scale - detector._shift
    with torch.inference_mode():
        outputs = detector.model(
            pixel_values=pixels[None], input_ids=input_ids, attention_mask=attention_mask
        )
    (reference,) = Sam3ImageProcessor().post_process_instance_segmentation(
        outputs, threshold=0.05, mask_threshold=MASK_THRESHOLD, target_sizes=[(item.height, item.width)]
    )
    order = torch.argsort(reference["scores"], descending=True, stable=True)
    assert len(found) == len(order) > 0
    np.testing.assert_allclose(found.box_scores, reference["scores"][order].numpy(), rtol=1e-5)
    frame = np.array([item.width, item.height] * 2, np.float32)  # SAM 3's boxes may cross the border
    np.testing.assert_allclose(found.boxes, np.clip(reference["boxes"][order].numpy(), 0, frame), atol=1e-3)
    masks = np.stack([decode_rle(c, item.height, item.width) for c in found.masks.counts])
    np.testing.assert_array_equal(masks, reference["masks"][order].numpy().astype(bool))
    presence = torch.sigmoid(outputs.presence_logits).item()
    np.testing.assert_allclose(found.text_scores, presence, rtol=1e-5)


def test_a_batch_of_mixed_sizes_gives_what_each_image_gives_alone(detector, batch):
    together = detector.detect(batch, CAPTIONS, box_floor=0.05, text_floor=0.05, max_candidates=10)
    for item, found in zip(batch, together, strict=True):
        (alone,) = detector.detect([item], CAPTIONS, box_floor=0.05, text_floor=0.05, max_candidates=10)
        assert alone.phrases == found.phrases
        np.testing.assert_array_equal(alone.query_indices, found.query_indices)
        np.testing.assert_allclose(alone.boxes, found.boxes, atol=1e-3)
        np.testing.assert_allclose(alone.box_scores, found.box_scores, atol=1e-5)
        np.testing.assert_allclose(alone.masks.areas, found.masks.areas, rtol=0.01)


def test_floors_apply_to_detection_and_presence_scores(detector, batch):
    everything = detector.detect(batch[:1], CAPTIONS, box_floor=0.0, text_floor=0.0, max_candidates=300)[0]
    assert len(everything) == 40  # every query of both phrases
    middle = float(np.median(everything.box_scores))
    above = detector.detect(batch[:1], CAPTIONS, box_floor=middle, text_floor=0.0, max_candidates=300)[0]
    assert len(above) == int((everything.box_scores > middle).sum()) and (above.box_scores > middle).all()
    presence = {p: s for p, s in zip(everything.phrases, everything.text_scores, strict=True)}
    low = min(presence.values())
    one_phrase = detector.detect(batch[:1], CAPTIONS, box_floor=0.0, text_floor=low, max_candidates=300)[0]
    assert set(one_phrase.phrases) == {p for p, s in presence.items() if s > low} and len(one_phrase) == 20
    (none,) = detector.detect(batch[:1], CAPTIONS, box_floor=1.0, text_floor=0.0, max_candidates=300)
    assert len(none) == 0 and len(none.masks) == 0 and none.multimask_scores.shape == (0, 1)
    assert (none.masks.height, none.masks.width) == (SIZES[0][1], SIZES[0][0])


def test_describe_is_the_stage_identity(detector):
    identity = detector.describe()
    assert (
        identity["backend"] == "sam3" and identity["model"] == "sam3" and identity["variant"] == "sam3-tiny"
    )
    assert identity["weights"] == "random" and identity["smoke_run"] and identity["seed"] == 0
    assert identity["input_size"] == "112x112" and identity["mask_threshold"] == MASK_THRESHOLD
    other = load_detector(_spec(seed=1, device="cpu"))
    assert other.describe() != identity  # another init is another model: the fingerprints differ


def test_a_saved_checkpoint_directory_loads_as_pretrained_and_gives_the_same_candidates(
    detector, batch, tmp_path
):
    """The local-directory path users take with the released weights: model + processor directory."""
    detector.model.save_pretrained(tmp_path)
    image_processor = Sam3ImageProcessor(size={"height": 112, "width": 112})
    Sam3Processor(image_processor=image_processor, tokenizer=tiny.sam3_tokenizer()).save_pretrained(tmp_path)
    loaded = load_detector(DetectorSpec(backend="sam3", checkpoint=str(tmp_path), device="cpu", batch_size=4))
    assert isinstance(loaded.model, Sam3Model)
    identity = loaded.describe()
    assert identity["weights"] == "pretrained" and identity["checkpoint"] == str(tmp_path)
    assert len(identity["checkpoint_sha256"]) == 64 and identity["variant"] == "sam3"
    expected = detector.detect(batch[:2], CAPTIONS, box_floor=0.05, text_floor=0.05, max_candidates=10)
    got = loaded.detect(batch[:2], CAPTIONS, box_floor=0.05, text_floor=0.05, max_candidates=10)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(a.box_scores, b.box_scores, rtol=1e-5)
        assert a.masks.counts == b.masks.counts


def test_sam3_under_bf16_autocast(detector, batch, bf16):
    """precision "bf16" as CUDA runs it (emulated on the CPU; on CUDA too where there is one): the
    score, box and presence heads in fp32 (not bf16-rounded), everything reaching the host fp32.
    Random weights; measured drift from the fp32 run: scores <= 0.019, boxes <= 10 px (median 0.5),
    mask IoU >= 0.87 (median 0.97)."""
    half = load_detector(replace(_spec(), device=bf16.device.type, precision="bf16"))
    half.model.load_state_dict(detector.model.state_dict())
    every = {"box_floor": 0.0, "text_floor": 0.0, "max_candidates": 300}
    expected = detector.detect(batch[:2], CAPTIONS, **every)
    with bf16.running() as report:
        found = half.detect(batch[:2], CAPTIONS, **every)
    assert not report.undecided
    # The heads' own outputs (the detector's scores multiply two sigmoids: fp32 either way).
    input_ids, attention_mask = half.phrase_tokens("plant")
    with bf16.running(), inference(half.device, half.precision):
        pixels = batch[0].pixels.to(half.device)[None].float() * half._scale - half._shift
        out = half.model(pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask)
    for logits in (out.pred_logits, out.presence_logits):
        assert logits.dtype == torch.float32 and not bf16_exact(logits.float().cpu().numpy())
    for a, b in zip(found, expected, strict=True):
        assert len(a) == len(b) == 40 and a.box_scores.dtype == a.boxes.dtype == np.float32
        assert not bf16_exact(a.box_scores) and not bf16_exact(a.boxes) and not bf16_exact(a.text_scores)
        rows = {q: i for i, q in enumerate(b.query_indices)}
        order = [rows[q] for q in a.query_indices]
        assert np.abs(a.box_scores - b.box_scores[order]).max() < 0.05
        assert np.median(np.abs(a.boxes - b.boxes[order]).max(axis=1)) < 2
        ious = []
        for j, k in enumerate(order):
            mine = decode_rle(a.masks.counts[j], a.height, a.width)
            theirs = decode_rle(b.masks.counts[k], b.height, b.width)
            ious.append((mine & theirs).sum() / max(1, (mine | theirs).sum()))
        assert min(ious) > 0.7 and np.median(ious) > 0.9
